/*
 * txn_safety v2 - an update must wait until transfer() returns (live
 * test: runtime/tests/apply_specs.rs).
 *
 * v1: transfer() first takes the amount out of one account unit by unit
 * (a loop: update points inside), holding it in a local, then pays it in.
 * Mid-transfer the sum of the accounts is short by the local "moved".
 * v2's transfer() charges a fee of 1 into "fees" and pays in amount - 1 in
 * one go: continuing an OLD transfer half-way in NEW's code (its loop#0 maps
 * by id) would lose or double money. The SPEC the user writes (SPEC.toml
 * beside this file):
 *
 *     [safety]
 *     inactive = ["transfer"]
 *
 * Invariant printed every tick: a + b + fees = 1000 (v1 has no fees).
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

long acct[2] = { 600, 400 };
long fees;

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void transfer(int from, int to, long amount)
{
    acct[from] -= amount;
    acct[to] += amount - 1;
    fees += 1;
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (t = 0; t < limit; t++) {
        transfer((int)(t % 2), (int)((t + 1) % 2), 5 + t % 3);
        printf("v2 t=%ld a=%ld b=%ld fees=%ld sum=%ld\n", t, acct[0], acct[1], fees,
               acct[0] + acct[1] + fees);
        if (pause > 0)
            pause_ms(pause);
    }
    printf("v2 done t=%ld\n", t);
    return 0;
}
