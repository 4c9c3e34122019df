/*
 * nested_array v2 - an array of structs whose nested struct changes.
 *
 * v1: struct cell { int id; struct point { short x; int y; } p; char name[8]; }
 *     grid[3].
 * v2: point.x widened short -> long (the nested struct grows, so p, name and
 * every element's stride move); x keeps its (negative) value.
 *
 * Each tick t applies step() once (n = t + 1 steps so far), for i = 0..2:
 *   id = i + 1, x = 10(i+1) - 3(i+1)n, y = -(i+1) + 100n, name = "c<i>".
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct point {
    long x; /* v1: short */
    int y;
};

struct cell {
    int id;
    struct point p;
    char name[8];
};

struct cell grid[3] = {
    { 1, { 10, -1 }, "c0" },
    { 2, { 20, -2 }, "c1" },
    { 3, { 30, -3 }, "c2" },
};

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* One tick's change of state. An update inside the loop carries `i` over
 * and the other version finishes the tick. */
static void step(long t)
{
    int i;
    (void)t;
    for (i = 0; i < 3; i++) {
        grid[i].p.x -= 3 * (i + 1);
        grid[i].p.y += 100;
    }
}

/* An update inside the loop finishes the line in the other version's code,
 * which prints the elements the same way. */
static void show(long t)
{
    int i;
    printf("v2 t=%ld", t);
    for (i = 0; i < 3; i++)
        printf(" [%d x=%ld y=%d %s]", grid[i].id, grid[i].p.x, grid[i].p.y, grid[i].name);
    printf("\n");
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
    printf("v2 done t=%ld\n", t);
    return 0;
}
