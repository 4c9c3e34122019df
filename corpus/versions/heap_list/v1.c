/*
 * heap_list v1 - a linked list on the heap whose node gains a member.
 *
 * v1: struct node { int value; struct node *next; }, four nodes built with
 *     calloc, values 10, 20, 30, 40, reached from the global head.
 * v2: struct node { int value; int weight; struct node *next; }: weight
 *     is new (0 in every converted node, and v2 builds its nodes with 0).
 *
 * Each tick t (n = t + 1 steps so far) every value grows by 1: the list
 * holds 40+n, 30+n, 20+n, 10+n; the line gives the count, the sum of the
 * values (100 + 4n) and (v2) the sum of the weights (0). At the end every
 * node is freed: "vN done t=N freed=4". Runs argv[1] ticks (default 10),
 * sleeping argv[2] ms after each (default 0). Every line starts "vN ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct node {
    int value;
    struct node *next;
};

struct node *head;
long freed;

static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void push(int v)
{
    struct node *n = calloc(1, sizeof *n);
    if (!n)
        exit(2);
    n->value = v;
    n->next = head;
    head = n;
}

static void step(long t)
{
    (void)t;
    for (struct node *n = head; n; n = n->next)
        n->value += 1;
}

static void show(long t)
{
    long count = 0, sum = 0;
    for (struct node *n = head; n; n = n->next) {
        count += 1;
        sum += n->value;
    }
    printf("v1 t=%ld count=%ld sum=%ld\n", t, count, sum);
}

/* Frees from the tail: every node is still linked when its call starts. */
static void free_list(struct node *n)
{
    if (!n)
        return;
    free_list(n->next);
    n->next = NULL;
    free(n);
    freed += 1;
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i <= 4; i++)
        push(10 * i);
    for (t = 0; t < limit; t++) {
        step(t);
        show(t);
        if (pause > 0)
            pause_ms(pause);
    }
    free_list(head);
    head = NULL;
    printf("v1 done t=%ld freed=%ld\n", t, freed);
    return 0;
}
