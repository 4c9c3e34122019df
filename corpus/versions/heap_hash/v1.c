/*
 * heap_hash v1 - a hash table on the heap: a heap array of bucket heads
 * (its count is the table's member nbuckets, which SPEC.toml names:
 *     [heap] "struct table.buckets" = { count = "struct table.nbuckets" })
 * of chained entries whose struct grows: every entry moves, every chain
 * is redirected, in every bucket.
 *
 * v1: struct entry { long key; long val; struct entry *next; }; the table
 *     (struct table { long nbuckets; long count; struct entry **buckets; },
 *     under the global tab) has 8 buckets and 12 entries, keys 1..12 in
 *     bucket key % 8 (four chains of 2, four of 1), val 10 * key.
 * v2: struct entry { long key; char name[16]; long val; long hits;
 *     struct entry *next; }: name and hits are new (empty and 0).
 *
 * Each tick t (n = t + 1 steps so far) every key is looked up and its val
 * grows by key: the line walks every bucket and gives entries=12 keys=78
 * (sum of keys) vals=780+78n longest=2 (longest chain) found=12 (lookups
 * that found their key), and (v2) names=0 (total name length) hits=0. At
 * the end every entry and the table are freed: "vN done t=N freed=12".
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0). Every line starts "vN ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct entry {
    long key;
    long val;
    struct entry *next;
};

struct table {
    long nbuckets;
    long count;
    struct entry **buckets;
};

struct table *tab;
long freed;

static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void insert(long key)
{
    struct entry *e = calloc(1, sizeof *e);
    long b = key % tab->nbuckets;
    if (!e)
        exit(2);
    e->key = key;
    e->val = 10 * key;
    e->next = tab->buckets[b];
    tab->buckets[b] = e;
    tab->count += 1;
}

static struct entry *lookup(long key)
{
    struct entry *e = tab->buckets[key % tab->nbuckets];
    while (e && e->key != key)
        e = e->next;
    return e;
}

static void setup(void)
{
    tab = calloc(1, sizeof *tab);
    if (!tab)
        exit(2);
    tab->buckets = calloc(8, sizeof *tab->buckets);
    if (!tab->buckets)
        exit(2);
    tab->nbuckets = 8;
    for (long k = 1; k <= 12; k++)
        insert(k);
}

static long step(long t)
{
    long found = 0;
    (void)t;
    for (long k = 1; k <= 12; k++) {
        struct entry *e = lookup(k);
        if (e) {
            e->val += k;
            found += 1;
        }
    }
    return found;
}

static void show(long t, long found)
{
    long entries = 0, keys = 0, vals = 0, longest = 0;
    for (long b = 0; b < tab->nbuckets; b++) {
        long chain = 0;
        for (struct entry *e = tab->buckets[b]; e; e = e->next) {
            entries += 1;
            keys += e->key;
            vals += e->val;
            chain += 1;
        }
        if (chain > longest)
            longest = chain;
    }
    printf("v1 t=%ld entries=%ld keys=%ld vals=%ld longest=%ld found=%ld\n", t, entries, keys,
           vals, longest, found);
}

/* Unlinks the first entry of bucket b and returns it. */
static struct entry *unlink_first(long b)
{
    struct entry *e = tab->buckets[b];
    tab->buckets[b] = e->next;
    return e;
}

/* Unlinks each entry as it frees it, and empties the table before its
 * buckets go: no variable or member leads to freed memory at any update
 * point. */
static void free_table(void)
{
    for (long b = 0; b < tab->nbuckets; b++) {
        while (tab->buckets[b]) {
            free(unlink_first(b));
            freed += 1;
        }
    }
    tab->nbuckets = 0;
    free(tab->buckets);
    tab->buckets = NULL;
    free(tab);
    tab = NULL;
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    setup();
    for (t = 0; t < limit; t++) {
        long found = step(t);
        show(t, found);
        if (pause > 0)
            pause_ms(pause);
    }
    free_table();
    printf("v1 done t=%ld freed=%ld\n", t, freed);
    return 0;
}
