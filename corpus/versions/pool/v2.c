/*
 * pool v2 - a worker pool on condition variables: 8 workers and 2
 * producers share a bounded queue (4 slots) of numbered jobs.
 *
 * Commands on stdin, one per line (read with read(2), one byte at a time):
 *   go N   each producer queues N more jobs; job ids are 1, 2, 3, ... in the
 *          order they enter the queue
 *   wait   main waits (pthread_cond_timedwait, 50 ms at a time) until every
 *          job queued so far is done, then prints "vK idle done=C sum=S"
 *   quit   stops the producers and the workers, joins them and prints
 *          "vK joined done=C sum=S"
 * Idle, every worker waits in pthread_cond_wait (queue empty) and every
 * producer in pthread_cond_wait (no orders); busy, producers also wait for
 * a free slot. Each job is run once by one worker, which prints
 * "vK job ID worker W value V" and adds ID to sum, 1 to done.
 * v1: value = ID * 3.  v2: value = ID * 5 + 1.
 * Every stdout line starts with "v2 ".
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 8
#define PRODUCERS 2
#define QCAP 4

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static pthread_cond_t orders = PTHREAD_COND_INITIALIZER;
static pthread_cond_t all_done = PTHREAD_COND_INITIALIZER;
static int queue[QCAP];
static int head, count;
static int ordered[PRODUCERS];
static int next_id;
static long total_ordered;
static long done_jobs, done_sum;
static int stopping;

/* The work of one job: a short sleep, then its line. */
static long run_job(int id, int worker)
{
    struct timespec ts;
    long value = id * 5L + 1;
    ts.tv_sec = 0;
    ts.tv_nsec = 1000000;
    nanosleep(&ts, NULL);
    printf("v2 job %d worker %d value %ld\n", id, worker, value);
    return value;
}

static void *worker(void *arg)
{
    int w = (int)(long)arg;
    for (;;) {
        int id;
        pthread_mutex_lock(&lock);
        while (count == 0 && !stopping)
            pthread_cond_wait(&not_empty, &lock);
        if (count == 0) {
            pthread_mutex_unlock(&lock);
            break;
        }
        id = queue[head];
        head = (head + 1) % QCAP;
        count--;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&lock);
        run_job(id, w);
        pthread_mutex_lock(&lock);
        done_jobs++;
        done_sum += id;
        if (done_jobs == total_ordered)
            pthread_cond_broadcast(&all_done);
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

static void *producer(void *arg)
{
    int p = (int)(long)arg;
    pthread_mutex_lock(&lock);
    for (;;) {
        while (ordered[p] == 0 && !stopping)
            pthread_cond_wait(&orders, &lock);
        if (ordered[p] == 0)
            break;
        while (count == QCAP)
            pthread_cond_wait(&not_full, &lock);
        next_id++;
        queue[(head + count) % QCAP] = next_id;
        count++;
        ordered[p]--;
        pthread_cond_signal(&not_empty);
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

/* One line of stdin into buf (without the newline); 0 at end of file. */
static int read_line(char *buf, int cap)
{
    int len = 0;
    char c;
    for (;;) {
        long n = read(0, &c, 1);
        if (n <= 0)
            return len > 0;
        if (c == '\n')
            break;
        if (len < cap - 1)
            buf[len++] = c;
    }
    buf[len] = 0;
    return 1;
}

static void wait_all_done(void)
{
    struct timespec until;
    pthread_mutex_lock(&lock);
    while (done_jobs < total_ordered) {
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 50000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&all_done, &lock, &until);
    }
    printf("v2 idle done=%ld sum=%ld\n", done_jobs, done_sum);
    pthread_mutex_unlock(&lock);
}

int main(void)
{
    pthread_t workers[WORKERS], producers[PRODUCERS];
    char line[64];
    long i;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (i = 0; i < WORKERS; i++)
        pthread_create(&workers[i], NULL, worker, (void *)i);
    for (i = 0; i < PRODUCERS; i++)
        pthread_create(&producers[i], NULL, producer, (void *)i);
    printf("v2 ready %d workers %d producers\n", WORKERS, PRODUCERS);
    while (read_line(line, sizeof line)) {
        if (strncmp(line, "go ", 3) == 0) {
            int n = atoi(line + 3);
            pthread_mutex_lock(&lock);
            for (i = 0; i < PRODUCERS; i++)
                ordered[i] += n;
            total_ordered += (long)n * PRODUCERS;
            pthread_cond_broadcast(&orders);
            pthread_mutex_unlock(&lock);
        } else if (strcmp(line, "wait") == 0) {
            wait_all_done();
        } else if (strcmp(line, "quit") == 0) {
            break;
        }
    }
    wait_all_done();
    pthread_mutex_lock(&lock);
    stopping = 1;
    pthread_cond_broadcast(&not_empty);
    pthread_cond_broadcast(&orders);
    pthread_mutex_unlock(&lock);
    for (i = 0; i < PRODUCERS; i++)
        pthread_join(producers[i], NULL);
    for (i = 0; i < WORKERS; i++)
        pthread_join(workers[i], NULL);
    printf("v2 joined done=%ld sum=%ld\n", done_jobs, done_sum);
    return 0;
}
