/*
 * struct_insert v1 - a global struct that gains a member in the middle.
 *
 * v1: struct account { id, balance, flags, total }.
 * v2 inserts `int bonus` between balance and flags (initializer 500), so
 * flags and total move; every member existing in both keeps its value.
 *
 * Each tick t (0, 1, ...) applies step() once and prints every member:
 *   id = 7, balance = -100 - 9(t+1), flags = 3 + 2(t+1), total = t(t+1)/2.
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v1 done t=N". Every line starts with "v1 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct account {
    long id;
    int balance;
    short flags;
    long total;
};

struct account acct = { 7, -100, 3, 0 };

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* One tick's change of state: straight-line code, no update point inside. */
static void step(long t)
{
    acct.balance -= 9;
    acct.flags += 2;
    acct.total += t;
}

static void show(long t)
{
    printf("v1 t=%ld id=%ld balance=%d flags=%d total=%ld\n", t, acct.id,
           acct.balance, acct.flags, acct.total);
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (t = 0; t < limit; t++) {
        step(t);
        show(t);
        if (pause > 0)
            pause_ms(pause);
    }
    printf("v1 done t=%ld\n", t);
    return 0;
}
