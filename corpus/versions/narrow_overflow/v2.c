/*
 * narrow_overflow v2 - a long that becomes a short while its value does not fit.
 *
 * v1: long big = 70000 (more than a short holds from the start), long ok.
 * v2: short big. The default narrowing is checked at update time and
 * refused (big never fits), naming the variable: the process must go on as
 * v1, untouched.
 *
 * Each tick t (n = t + 1 steps so far): big = B + n, ok = 1 + n, where B is
 * 70000 in v1 and 7000 in a fresh v2.
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

short big = 7000; /* v1: long big = 70000, which no short holds */
long ok = 1;

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
    big += 1;
    ok += 1;
}

static void show(long t)
{
    printf("v2 t=%ld big=%d ok=%ld\n", t, big, ok);
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
