/*
 * enum_renumber v1 - an enum whose enumerators are renumbered and reordered.
 *
 * v1: enum phase { IDLE, LOAD, RUN, DONE } (0..3).
 * v2: enum phase { RUN = 10, PAUSED = 15, IDLE = 20, LOAD = 30, DONE = 40 }:
 * every value is mapped by enumerator name (cur and each history entry);
 * show() prints names and numbers, so a value copied as bits shows.
 *
 * Each tick t: cur moves IDLE -> LOAD -> RUN -> DONE -> IDLE (cycle of 4,
 * starting from IDLE, so after n = t + 1 steps cur is cycle[n % 4]), and
 * history[t % 4] = cur. history starts all IDLE.
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v1 done t=N". Every line starts with "v1 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum phase { IDLE, LOAD, RUN, DONE };

enum phase cur = IDLE;
enum phase history[4] = { IDLE, IDLE, IDLE, IDLE };

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static enum phase next_phase(enum phase p)
{
    switch (p) {
    case IDLE:
        return LOAD;
    case LOAD:
        return RUN;
    case RUN:
        return DONE;
    default:
        return IDLE;
    }
}

static const char *name(enum phase p)
{
    switch (p) {
    case IDLE:
        return "IDLE";
    case LOAD:
        return "LOAD";
    case RUN:
        return "RUN";
    case DONE:
        return "DONE";
    default:
        return "?";
    }
}

/* One tick's change of state: next_phase's entry is the only update point
 * inside, and it comes before anything is written. */
static void step(long t)
{
    cur = next_phase(cur);
    history[t % 4] = cur;
}

/* The names are looked up first (name()'s entry is an update point) and the
 * numbers read in the printf call itself, after the last lookup: a number
 * read before an update would print OLD's encoding. */
static void show(long t)
{
    const char *c = name(cur), *h0 = name(history[0]), *h1 = name(history[1]);
    const char *h2 = name(history[2]), *h3 = name(history[3]);
    printf("v1 t=%ld cur=%s/%d history=%s/%d,%s/%d,%s/%d,%s/%d\n", t, c, (int)cur, h0,
           (int)history[0], h1, (int)history[1], h2, (int)history[2], h3, (int)history[3]);
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
