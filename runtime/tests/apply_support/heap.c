/* heap.c - callbacks and addresses of globals and statics kept only in
 * malloc'd memory (a cycle of two ops and a ring that points into it), used
 * on every step of a hot loop. An update that leaves those pointers aimed at
 * the old image crashes (its code is no longer executable) or counts into
 * the old image's globals. */
#include <stdio.h>
#include <stdlib.h>

struct op {
    const char *name;
    long (*fn)(long);
    long *hits;
    struct op *next;
};

struct ring {
    struct op *cur;
    long *slots[2];
};

static long hits_a, hits_b;

static long twice(long x)
{
    return (2 * x + 1) % 1000003;
}

static long square(long x)
{
    return (x * x + 7) % 1000003;
}

int main(int argc, char **argv)
{
    static long calls;
    long steps = argc > 1 ? atol(argv[1]) : 200, v = 3, i;
    struct op *a = malloc(sizeof *a), *b = malloc(sizeof *b);
    struct ring *r = malloc(sizeof *r);
    a->name = "twice";
    a->fn = twice;
    a->hits = &hits_a;
    a->next = b;
    b->name = "square";
    b->fn = square;
    b->hits = &hits_b;
    b->next = a;
    r->cur = a;
    r->slots[0] = &calls;
    r->slots[1] = &hits_a;
    a = b = NULL; /* only the heap knows them now */
    for (i = 0; i < steps; i++) {
        v = r->cur->fn(v);
        (*r->cur->hits)++;
        (*r->slots[0])++;
        r->cur = r->cur->next;
        if (i % 20 == 0)
            printf("%ld: v=%ld a=%ld b=%ld calls=%ld\n", i, v, hits_a, hits_b, calls);
    }
    printf("%s then %s: v=%ld a=%ld b=%ld calls=%ld slot=%ld\n", r->cur->name,
           r->cur->next->name, v, hits_a, hits_b, calls, *r->slots[1]);
    return 0;
}
