/*
 * callback_void_ptr v1 - a callback kept only in untyped memory: a heap
 * block reached through a `void *` global holds the function's address as
 * raw bytes. No typed walk can find it; only the sweep for values pointing
 * into the old image does (a function entry goes to the same function of
 * NEW).
 *
 * v2: the same program, every line starting with "v2 ".
 *
 * Each tick t (n = t + 1 steps so far): acc = fn(acc, t) = acc + 3t + 2,
 * so acc = n * (3n + 1) / 2. Runs argv[1] ticks (default 10), sleeping
 * argv[2] ms after each (default 0), then prints "v1 done t=N".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef long (*step_fn)(long, long);

void *opaque;
long acc;

static long step(long a, long t)
{
    return a + 3 * t + 2;
}

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* Calls the function whose address sits in the first 8 bytes of opaque. */
static long call_opaque(long a, long t)
{
    step_fn f;
    memcpy(&f, opaque, sizeof f);
    return f(a, t);
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    step_fn f = step;
    setvbuf(stdout, NULL, _IOLBF, 0);
    opaque = malloc(32);
    if (!opaque)
        return 1;
    memset(opaque, 0, 32);
    memcpy(opaque, &f, sizeof f);
    f = 0;
    for (t = 0; t < limit; t++) {
        acc = call_opaque(acc, t);
        printf("v1 t=%ld acc=%ld\n", t, acc);
        if (pause > 0)
            pause_ms(pause);
    }
    free(opaque);
    printf("v1 done t=%ld\n", t);
    return 0;
}
