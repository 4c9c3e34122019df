/*
 * int_widen v2 - ints that become longs, holding negative values.
 *
 * v1: int level, int temps[3], and a local "int acc" of main's running loop.
 * v2: all three are long (main's frame changes layout while it runs); every
 * value is sign-extended, so each stays negative.
 *
 * Each tick t (n = t + 1 steps so far):
 *   level = -5 - 7n, temps = -1 - n, -2 - 20n, -3 - 300n, acc = -1000 - 13n.
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N acc=A". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

long level = -5;
long temps[3] = { -1, -2, -3 };

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
    level -= 7;
    temps[0] -= 1;
    temps[1] -= 20;
    temps[2] -= 300;
}

static void show(long t, long acc)
{
    printf("v2 t=%ld level=%ld temps=%ld,%ld,%ld acc=%ld\n", t, level, temps[0], temps[1],
           temps[2], acc);
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    long acc = -1000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (t = 0; t < limit; t++) {
        step(t);
        acc -= 13;
        show(t, acc);
        if (pause > 0)
            pause_ms(pause);
    }
    printf("v2 done t=%ld acc=%ld\n", t, acc);
    return 0;
}
