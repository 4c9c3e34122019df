/*
 * prodcons.c - bounded work queue with two producers and three consumers.
 *
 * Exercises:
 *   - pthreads: create/join, a mutex and two condition variables
 *   - threads blocked in pthread_cond_wait (queue full / queue empty)
 *   - struct passed to a thread start routine, per-thread results
 *   - deterministic output: only order-independent totals, printed after join
 */
#include <pthread.h>
#include <stdio.h>

#define QCAP 4
#define PER_PRODUCER 500
#define PRODUCERS 2
#define CONSUMERS 3

struct queue {
    int items[QCAP];
    int head, count;
    int producers_left;
    pthread_mutex_t lock;
    pthread_cond_t not_full;
    pthread_cond_t not_empty;
};

struct worker {
    struct queue *q;
    int id;
    long sum;
    unsigned long xor_all;
    int taken;
};

static void q_put(struct queue *q, int v)
{
    pthread_mutex_lock(&q->lock);
    while (q->count == QCAP)
        pthread_cond_wait(&q->not_full, &q->lock);
    q->items[(q->head + q->count) % QCAP] = v;
    q->count++;
    pthread_cond_signal(&q->not_empty);
    pthread_mutex_unlock(&q->lock);
}

/* Returns 0 when the queue is drained and no producer is left. */
static int q_get(struct queue *q, int *out)
{
    int ok = 0;
    pthread_mutex_lock(&q->lock);
    while (q->count == 0 && q->producers_left > 0)
        pthread_cond_wait(&q->not_empty, &q->lock);
    if (q->count > 0) {
        *out = q->items[q->head];
        q->head = (q->head + 1) % QCAP;
        q->count--;
        ok = 1;
        pthread_cond_signal(&q->not_full);
    }
    pthread_mutex_unlock(&q->lock);
    return ok;
}

static void *producer(void *arg)
{
    struct worker *w = arg;
    int i;
    for (i = 0; i < PER_PRODUCER; i++) {
        int v = w->id * 100000 + i * i % 977;
        q_put(w->q, v);
        w->sum += v;
    }
    pthread_mutex_lock(&w->q->lock);
    w->q->producers_left--;
    pthread_cond_broadcast(&w->q->not_empty);
    pthread_mutex_unlock(&w->q->lock);
    return NULL;
}

static void *consumer(void *arg)
{
    struct worker *w = arg;
    int v;
    while (q_get(w->q, &v)) {
        w->sum += v;
        w->xor_all ^= (unsigned long)v * 2654435761u;
        w->taken++;
    }
    return NULL;
}

int main(void)
{
    static struct queue q = { { 0 }, 0, 0, PRODUCERS, PTHREAD_MUTEX_INITIALIZER,
                              PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER };
    struct worker prod[PRODUCERS], cons[CONSUMERS];
    pthread_t pt[PRODUCERS], ct[CONSUMERS];
    long produced = 0, consumed = 0;
    unsigned long x = 0;
    int taken = 0, i;

    for (i = 0; i < CONSUMERS; i++) {
        cons[i] = (struct worker){ &q, i, 0, 0, 0 };
        pthread_create(&ct[i], NULL, consumer, &cons[i]);
    }
    for (i = 0; i < PRODUCERS; i++) {
        prod[i] = (struct worker){ &q, i + 1, 0, 0, 0 };
        pthread_create(&pt[i], NULL, producer, &prod[i]);
    }
    for (i = 0; i < PRODUCERS; i++)
        pthread_join(pt[i], NULL);
    for (i = 0; i < CONSUMERS; i++)
        pthread_join(ct[i], NULL);

    for (i = 0; i < PRODUCERS; i++) {
        printf("producer %d sum=%ld\n", prod[i].id, prod[i].sum);
        produced += prod[i].sum;
    }
    for (i = 0; i < CONSUMERS; i++) {
        consumed += cons[i].sum;
        x ^= cons[i].xor_all;
        taken += cons[i].taken;
    }
    printf("consumed %d items, sum=%ld xor=%lx\n", taken, consumed, x);
    printf("%s\n", produced == consumed ? "balanced" : "MISMATCH");
    return produced == consumed ? 0 : 1;
}
