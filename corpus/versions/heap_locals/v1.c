/*
 * heap_locals v1 - heap arrays held only by locals: every active frame of
 * the recursive level() holds `struct item *items` and `size_t n`, its own
 * block of n elements, whose struct grows in v2 (each block moves whole).
 * SPEC.toml names the count, a local of the same frame:
 *     [heap] "level.items" = { count = "level.n" }
 *
 * v1: struct item { long id; long qty; }.
 * v2: struct item { long id; char tag[8]; long qty; long price; }: tag and
 *     price are new (empty and 0).
 *
 * level(d), d = 0, 1, 2, allocates n = d + 3 items (one calloc'ed block)
 * with ids 1..n and qty 10 * id. Levels 0 and 1 call level(d + 1); level 2
 * runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0): at each tick t (k = t + 1 steps so far) every qty of its 5 items
 * grows by its id, and the line gives count=5 ids=15 qty=150+15k and (v2)
 * tags=0 (total tag length) prices=0. Then every level, innermost first,
 * walks its whole array into the totals and frees it; main prints them
 * over the 3 levels (12 items, ids 6+10+15=31, qty 310+15N after N ticks):
 * "vN done t=N levels=3 count=12 ids=31 qty=Q (v2: tags=0 prices=0)
 * freed=3". Every line starts "vN ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define DEPTH 3

struct item {
    long id;
    long qty;
};

long levels, total_count, total_ids, total_qty, freed;

static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void show(long t, const struct item *items, size_t n)
{
    long ids = 0, qty = 0;
    for (size_t i = 0; i < n; i++) {
        ids += items[i].id;
        qty += items[i].qty;
    }
    printf("v1 t=%ld count=%zu ids=%ld qty=%ld\n", t, n, ids, qty);
}

static void tally(const struct item *items, size_t n)
{
    levels++;
    for (size_t i = 0; i < n; i++) {
        total_count++;
        total_ids += items[i].id;
        total_qty += items[i].qty;
    }
}

static long level(long d, long limit, long pause)
{
    size_t n = 0;
    struct item *items = NULL;
    long t = 0;
    n = (size_t)d + 3;
    items = calloc(n, sizeof *items);
    if (!items)
        exit(2);
    for (size_t i = 0; i < n; i++) {
        items[i].id = (long)i + 1;
        items[i].qty = 10 * ((long)i + 1);
    }
    if (d < DEPTH - 1) {
        t = level(d + 1, limit, pause);
    } else {
        for (t = 0; t < limit; t++) {
            for (size_t i = 0; i < n; i++)
                items[i].qty += items[i].id;
            show(t, items, n);
            if (pause > 0)
                pause_ms(pause);
        }
    }
    tally(items, n);
    free(items);
    freed++;
    return t;
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    t = level(0, limit, pause);
    printf("v1 done t=%ld levels=%ld count=%ld ids=%ld qty=%ld freed=%ld\n", t, levels,
           total_count, total_ids, total_qty, freed);
    return 0;
}
