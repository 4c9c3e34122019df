/* callback_other_file: the table, whose layout only this file knows. */
#include <stdlib.h>

struct table {
    long acc;
    long (*mix)(long, long);
    long calls;
};

struct table *table_new(long (*mix)(long, long))
{
    struct table *t = calloc(1, sizeof *t);
    if (t)
        t->mix = mix;
    return t;
}

/* One tick: straight-line code, no update point inside. */
long table_step(struct table *t, long tick)
{
    t->acc = t->mix(t->acc, tick);
    t->calls += 1;
    return t->acc;
}

long table_calls(const struct table *t)
{
    return t->calls;
}

void table_free(struct table *t)
{
    free(t);
}
