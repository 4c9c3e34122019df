/*
 * fn_rename v2 - a function with a running loop is renamed (live test:
 * runtime/tests/apply_specs.rs).
 *
 * v1: process_batch(t) sums 5 items, one loop iteration each (an update
 * point inside: its frame is often active). v2 renames it handle_batch with
 * the same body; by default OLD's process_batch frames have no continuation
 * in NEW. The SPEC the user writes (SPEC.toml beside this file); frames
 * of the renamed function and calls to it keep their continuation ids
 * (loop#0, call:handle_batch#0), so no [continuations] line is needed:
 *
 *     [rename.functions]
 *     process_batch = "handle_batch"
 *
 * Each tick t: total += sum of (t * 10 + i) for i in 0..4 = 50t + 10.
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

long total;

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void handle_batch(long t)
{
    long i;
    for (i = 0; i < 5; i++)
        total += t * 10 + i;
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (t = 0; t < limit; t++) {
        handle_batch(t);
        printf("v2 t=%ld total=%ld\n", t, total);
        if (pause > 0)
            pause_ms(pause);
    }
    printf("v2 done t=%ld\n", t);
    return 0;
}
