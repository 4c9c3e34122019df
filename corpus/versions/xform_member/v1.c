/*
 * xform_member v1 - a struct gains a member that a C transformer computes
 * from the old ones, for a global and for a local of main's running loop.
 *
 * v1: struct account { long deposits; long withdrawals; }, a global `acct`
 * and a local `mine` of main.
 * v2: struct account { long deposits; long withdrawals; long balance; },
 * and each tick keeps balance = deposits - withdrawals. The default rules
 * would start balance at NEW's initializer (0) for acct and at zero for
 * mine; transform.c (SPEC.toml) computes it from the old members instead.
 *
 * Each tick t (n = t + 1 steps so far): acct = 10n deposited, 3n withdrawn;
 * mine = 5n deposited, n withdrawn. v2 also prints both balances: 7n and
 * 4n. Runs argv[1] ticks (default 10), sleeping argv[2] ms after each
 * (default 0), then prints "v1 done t=N". Every line starts with "v1 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct account {
    long deposits;
    long withdrawals;
};

struct account acct;

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    struct account mine = { 0, 0 };
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (t = 0; t < limit; t++) {
        acct.deposits += 10;
        acct.withdrawals += 3;
        mine.deposits += 5;
        mine.withdrawals += 1;
        printf("v1 t=%ld acct=%ld/%ld mine=%ld/%ld\n", t, acct.deposits, acct.withdrawals,
               mine.deposits, mine.withdrawals);
        if (pause > 0)
            pause_ms(pause);
    }
    printf("v1 done t=%ld\n", t);
    return 0;
}
