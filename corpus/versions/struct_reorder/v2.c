/*
 * struct_reorder v2 - a global struct loses members and the rest move.
 *
 * v1: struct rec { int a; long b; short c; int d; char e; }.
 * v2: struct rec { char e; int d; long b; } - a and c removed, the others
 * reordered (every offset changes); each keeps its value.
 *
 * Each tick t applies step() once (n = t + 1 steps so far):
 *   b = 2 + 1000000007n, d = 4 - 7n, e = 5 + n.
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct rec {
    char e;
    int d;
    long b;
};

struct rec r = { 5, 4, 2 };

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
    r.b += 1000000007L;
    r.d -= 7;
    r.e += 1;
}

static void show(long t)
{
    printf("v2 t=%ld e=%d d=%d b=%ld\n", t, r.e, r.d, r.b);
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
