/*
 * heap_array v2 - an array of structs on the heap (one block of n_items
 * elements) whose struct grows: the block no longer fits and moves whole.
 * Its count is in the global n_items, which SPEC.toml names:
 *     [heap] "global.items" = { count = "global.n_items" }
 *
 * v1: struct item { long id; long qty; }, n_items = 5 items with ids 1..5
 *     and qty 10 * id, in one calloc'ed block under the global items; the
 *     global cur points at items[2] (an element inside the block).
 * v2: struct item { long id; char tag[8]; long qty; long price; }: tag and
 *     price are new (empty and 0).
 *
 * Each tick t (n = t + 1 steps so far) every qty grows by its id: the line
 * gives count=5 ids=15 (sum of ids) qty=150+15n (sum of qty), cur=3 (the
 * id cur points at) and (v2) tags=0 (total tag length) prices=0. At the
 * end the block is freed: "vN done t=N freed=1". Runs argv[1] ticks
 * (default 10), sleeping argv[2] ms after each (default 0). Every line
 * starts "vN ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct item {
    long id;
    char tag[8]; /* new */
    long qty;
    long price; /* new */
};

struct item *items;
long n_items;
struct item *cur;
long freed;

static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void setup(long n)
{
    items = calloc(n, sizeof *items);
    if (!items)
        exit(2);
    n_items = n;
    for (long i = 0; i < n; i++) {
        items[i].id = i + 1;
        items[i].qty = 10 * (i + 1);
    }
    cur = &items[2];
}

static void step(long t)
{
    (void)t;
    for (long i = 0; i < n_items; i++)
        items[i].qty += items[i].id;
}

static void show(long t)
{
    long ids = 0, qty = 0, tags = 0, prices = 0;
    for (long i = 0; i < n_items; i++) {
        ids += items[i].id;
        qty += items[i].qty;
        tags += (long)strnlen(items[i].tag, sizeof items[i].tag);
        prices += items[i].price;
    }
    printf("v2 t=%ld count=%ld ids=%ld qty=%ld cur=%ld tags=%ld prices=%ld\n", t, n_items, ids,
           qty, cur->id, tags, prices);
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    setup(5);
    for (t = 0; t < limit; t++) {
        step(t);
        show(t);
        if (pause > 0)
            pause_ms(pause);
    }
    cur = NULL;
    n_items = 0;
    free(items);
    items = NULL;
    freed = 1;
    printf("v2 done t=%ld freed=%ld\n", t, freed);
    return 0;
}
