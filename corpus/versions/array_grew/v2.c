/*
 * array_grew v2 - a written global array that grows.
 *
 * v1: int hist[4] = { 1, 2, 3, 4 }; every tick t adds t + 1 to hist[t % 4].
 * v2: int hist[7] = { 1, 2, 3, 4, 50, 60, 70 }, the same step (it never
 * writes past index 3): the four written elements keep their values, the
 * three new ones print NEW's initializer.
 *
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int hist[7] = { 1, 2, 3, 4, 50, 60, 70 }; /* v1: [4], the same prefix */

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
    hist[t % 4] += (int)t + 1;
}

/* One printf, no loop: an update never splits a line. */
static void show(long t)
{
    printf("v2 t=%ld hist=%d,%d,%d,%d,%d,%d,%d\n", t, hist[0], hist[1], hist[2], hist[3],
           hist[4], hist[5], hist[6]);
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
