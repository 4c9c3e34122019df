/*
 * threads4_local v2 - the same struct local alive in the frames of 4 threads.
 *
 * v1: struct acc { int id; long sum; int neg; }, a local of worker().
 * v2: struct acc { int id; int seen; long sum; long neg; } - seen inserted
 * (a new member of a frame's local starts at zero, and v2 never writes it),
 * neg widened int -> long; each thread's copy is converted in its own frame.
 *
 * Thread w (id = w + 1) at its tick t (n = t + 1 steps so far):
 *   sum = id * n + t(t+1)/2, neg = -id - (id + 1) n.
 * main starts 4 workers, waits (nanosleep) until all have finished, joins
 * them. Each worker runs argv[1] ticks (default 10), sleeping argv[2] ms
 * after each (default 0). Every line starts with "v2 ".
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NWORKERS 4

struct acc {
    int id;
    int seen; /* new: zero in every converted frame */
    long sum;
    long neg; /* v1: int */
};

static long limit = 10, pause_each;
static int finished;

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* One tick's change of a thread's state: straight-line code. */
static void step(struct acc *a, long t)
{
    a->sum += a->id + t;
    a->neg -= a->id + 1;
}

static void show(const struct acc *a, long t)
{
    printf("v2 w=%d t=%ld seen=%d sum=%ld neg=%ld\n", a->id, t, a->seen, a->sum, a->neg);
}

static void *worker(void *arg)
{
    struct acc a = { (int)(long)arg, 0, 0, 0 };
    long t;
    a.neg = -a.id;
    for (t = 0; t < limit; t++) {
        step(&a, t);
        show(&a, t);
        if (pause_each > 0)
            pause_ms(pause_each);
    }
    __atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t tids[NWORKERS];
    long i;
    if (argc > 1)
        limit = atol(argv[1]);
    if (argc > 2)
        pause_each = atol(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (i = 0; i < NWORKERS; i++)
        pthread_create(&tids[i], NULL, worker, (void *)(i + 1));
    /* Not pthread_join while they run: a thread parked in a join is not at
     * a safe point; nanosleep is. */
    while (__atomic_load_n(&finished, __ATOMIC_SEQ_CST) < NWORKERS)
        pause_ms(1);
    for (i = 0; i < NWORKERS; i++)
        pthread_join(tids[i], NULL);
    printf("v2 done workers=%d\n", NWORKERS);
    return 0;
}
