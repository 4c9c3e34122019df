/*
 * callback_other_file v2 - a heap struct holding a callback, whose type is
 * defined in another file (v2_table.c): this file only declares
 * `struct table;`, so its global `tab` points at a type this compilation
 * unit cannot see. An update that does not resolve the type by name in the
 * other unit never looks inside the object and leaves `mix` aimed at the
 * old image's code (which an update makes non-executable: SIGSEGV).
 *
 * v2: the same program, every line starting with "v2 ".
 *
 * Each tick t (n = t + 1 steps so far): acc = mix(acc, t) = acc + 2t + 1,
 * so acc = n * n, calls = n. Runs argv[1] ticks (default 10), sleeping
 * argv[2] ms after each (default 0), then prints "v2 done t=N".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct table;
struct table *table_new(long (*mix)(long, long));
long table_step(struct table *t, long tick);
long table_calls(const struct table *t);
void table_free(struct table *t);

struct table *tab;

/* The callback stored in the table (called from the other file). */
static long mix(long acc, long t)
{
    return acc + 2 * t + 1;
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

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    tab = table_new(mix);
    if (!tab)
        return 1;
    for (t = 0; t < limit; t++) {
        long acc = table_step(tab, t);
        printf("v2 t=%ld acc=%ld calls=%ld\n", t, acc, table_calls(tab));
        if (pause > 0)
            pause_ms(pause);
    }
    table_free(tab);
    printf("v2 done t=%ld\n", t);
    return 0;
}
