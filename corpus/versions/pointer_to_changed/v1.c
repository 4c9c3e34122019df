/*
 * pointer_to_changed v1 - a global pointer to a global struct whose type grows.
 *
 * v1: struct config { int port; int retries; } conf = { 8080, 3 };
 *     struct config *active = &conf; every access goes through active.
 * v2: struct config { int port; char name[8]; int retries; long timeout_ms; }
 *     conf = { 8080, "main", 3, 2500 }: the pointer must point at the
 * converted conf (same=1), the new members print NEW's initializer.
 *
 * Each tick t (n = t + 1 steps so far): port = 8080 + n, retries = 3 - 2n.
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v1 done t=N". Every line starts with "v1 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct config {
    int port;
    int retries;
};

struct config conf = { 8080, 3 };
struct config *active = &conf;

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
    active->port += 1;
    active->retries -= 2;
}

static void show(long t)
{
    printf("v1 t=%ld port=%d retries=%d same=%d\n", t, active->port, active->retries,
           active == &conf);
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
