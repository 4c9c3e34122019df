/*
 * narrow_fits v2 - longs that become shorts while every value fits.
 *
 * v1: long small, struct sample { long lo; long hi; } s.
 * v2: both shorts (the struct shrinks from 16 to 4 bytes); the values stay
 * within [-60, 40], so the default narrowing (checked at update time) applies.
 *
 * Each tick t (n = t + 1 steps so far): small = 10 - 5n, lo = -3 - 2n,
 * hi = 4 + 3n (argv[1] <= 10 keeps them in range).
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct sample {
    short lo;
    short hi;
};

short small = 10;
struct sample s = { -3, 4 };

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
    (void)t;
    small -= 5;
    s.lo -= 2;
    s.hi += 3;
}

static void show(long t)
{
    printf("v2 t=%ld small=%d lo=%d hi=%d\n", t, small, s.lo, s.hi);
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
    printf("v2 done t=%ld\n", t);
    return 0;
}
