/*
 * heap_shared v1 - one heap object pointed to from a global, from frames
 * and from another heap object at once (one pointer into its interior),
 * whose type grows beyond its allocation (it moves).
 *
 * v1: struct rec { long id; long hits; struct rec *self; }, one calloc'ed
 *     rec (id 7) held by the global g_rec, by main's local mine (passed to
 *     step and show), by itself (self) and by a heap struct holder
 *     { struct rec *r; long *hitsp = &rec->hits; long bumps; } under the
 *     global g_hold.
 * v2: struct rec { long id; char note[24]; long hits; struct rec *self;
 *     long extra; }: note and extra are new (empty and 0).
 *
 * Each tick t (n = t + 1 steps so far): step adds 1 to hits through mine
 * and 10 through hitsp, bumps += 1: id=7 hits=11n bumps=n same=1 (every
 * pointer still names the one rec, hitsp its hits), and (v2) note=0 (its
 * length) extra=0. At the end both objects are freed: "vN done t=N
 * freed=2". Runs argv[1] ticks (default 10), sleeping argv[2] ms after each
 * (default 0). Every line starts "vN ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct rec {
    long id;
    long hits;
    struct rec *self;
};

struct holder {
    struct rec *r;
    long *hitsp;
    long bumps;
};

struct rec *g_rec;
struct holder *g_hold;
long freed;

static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void setup(void)
{
    g_rec = calloc(1, sizeof *g_rec);
    g_hold = calloc(1, sizeof *g_hold);
    if (!g_rec || !g_hold)
        exit(2);
    g_rec->id = 7;
    g_rec->self = g_rec;
    g_hold->r = g_rec;
    g_hold->hitsp = &g_rec->hits;
}

static void step(struct rec *r, long t)
{
    (void)t;
    r->hits += 1;
    *g_hold->hitsp += 10;
    g_hold->bumps += 1;
}

static void show(struct rec *r, long t)
{
    int same = r == g_rec && g_hold->r == r && g_hold->hitsp == &r->hits && r->self == r;
    printf("v1 t=%ld id=%ld hits=%ld bumps=%ld same=%d\n", t, r->id, r->hits, g_hold->bumps,
           same);
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    struct rec *mine;
    setvbuf(stdout, NULL, _IOLBF, 0);
    setup();
    mine = g_rec;
    for (t = 0; t < limit; t++) {
        step(mine, t);
        show(mine, t);
        if (pause > 0)
            pause_ms(pause);
    }
    free(g_hold);
    g_hold = NULL;
    free(mine);
    g_rec = NULL;
    freed = 2;
    printf("v1 done t=%ld freed=%ld\n", t, freed);
    return 0;
}
