/*
 * threads8 v2 - eight threads, each parked in a different way.
 *
 *   0, 1  hot loops (pure computation, no system calls between reports)
 *   2     waits for the mutex `big` (pthread_mutex_lock)
 *   3     holds `big` while in nanosleep, 40 ms at a time
 *   4     blocked in read() on a pipe that main writes to every 250 ms
 *   5     nanosleep ticker; every 4th tick it signals the condition variable
 *   6     waits on the condition variable (pthread_cond_wait)
 *   7     pthread_cond_timedwait with a 100 ms timeout
 * Every thread calls worker_step(id, n) after each wake-up; it is what changes.
 * v2: worker_step gains a local and prints value = n * 5 + id + 1000 and its parity.
 * main paces in nanosleep (50 ms ticks) for argv[1] ticks (default 6000) or
 * until a line "quit" on stdin, then stops, wakes and joins every thread.
 * Every stdout line starts with "v2 ".
 */
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 8
#define HOT_REPORT (1UL << 22)

static volatile int stop;
static pthread_mutex_t big = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t cv_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cv_tickets;
static pthread_mutex_t timed_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t timed_cv = PTHREAD_COND_INITIALIZER;
static int pipe_fds[2];

/* Sleeps for `ms` milliseconds (the pacing of the progress lines). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* True once a line "quit" arrived on stdin; end-of-file is ignored. Never blocks. */
static int quit_requested(void)
{
    static char line[64];
    static int len, eof;
    struct pollfd p;
    char c;
    if (eof)
        return 0;
    p.fd = 0;
    p.events = POLLIN;
    p.revents = 0;
    while (poll(&p, 1, 0) > 0) {
        if (read(0, &c, 1) != 1) {
            eof = 1;
            return 0;
        }
        if (c == '\n') {
            line[len] = '\0';
            len = 0;
            if (strcmp(line, "quit") == 0)
                return 1;
        } else if (len < (int)sizeof line - 1) {
            line[len++] = c;
        }
    }
    return 0;
}

static void worker_step(int id, long n)
{
    long value = n * 5 + id + 1000;
    long parity = value % 2;
    printf("v2 worker %d step %ld value=%ld parity=%ld\n", id, n, value, parity);
}

static unsigned long crunch(unsigned long x)
{
    return x * 6364136223846793005UL + 1442695040888963407UL;
}

static void *hot(void *arg)
{
    int id = (int)(long)arg;
    unsigned long x = (unsigned long)id + 1, iter = 0;
    long n = 0;
    while (!stop) {
        x = crunch(x);
        if (++iter % HOT_REPORT == 0)
            worker_step(id, n++);
    }
    return (void *)(x & 1);
}

static void *mutex_waiter(void *arg)
{
    int id = (int)(long)arg;
    long n = 0;
    while (!stop) {
        pthread_mutex_lock(&big);
        worker_step(id, n++);
        pthread_mutex_unlock(&big);
        pause_ms(1);
    }
    return NULL;
}

static void *lock_holder(void *arg)
{
    int id = (int)(long)arg;
    long n = 0;
    while (!stop) {
        pthread_mutex_lock(&big);
        pause_ms(40);
        pthread_mutex_unlock(&big);
        worker_step(id, n++);
        pause_ms(2);
    }
    return NULL;
}

static void *pipe_reader(void *arg)
{
    int id = (int)(long)arg;
    long n = 0;
    char c;
    while (read(pipe_fds[0], &c, 1) == 1 && c != 'q')
        worker_step(id, n++);
    return NULL;
}

static void *ticker(void *arg)
{
    int id = (int)(long)arg;
    long n = 0;
    while (!stop) {
        pause_ms(50);
        worker_step(id, n++);
        if (n % 4 == 0) {
            pthread_mutex_lock(&cv_lock);
            cv_tickets++;
            pthread_cond_signal(&cv);
            pthread_mutex_unlock(&cv_lock);
        }
    }
    return NULL;
}

static void *cond_waiter(void *arg)
{
    int id = (int)(long)arg;
    long n = 0;
    pthread_mutex_lock(&cv_lock);
    while (!stop) {
        while (cv_tickets == 0 && !stop)
            pthread_cond_wait(&cv, &cv_lock);
        if (cv_tickets > 0) {
            cv_tickets--;
            worker_step(id, n++);
        }
    }
    pthread_mutex_unlock(&cv_lock);
    return NULL;
}

static void *timed_waiter(void *arg)
{
    int id = (int)(long)arg;
    long n = 0;
    pthread_mutex_lock(&timed_lock);
    while (!stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 100 * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&timed_cv, &timed_lock, &until);
        worker_step(id, n++);
    }
    pthread_mutex_unlock(&timed_lock);
    return NULL;
}

int main(int argc, char **argv)
{
    void *(*roles[NTHREADS])(void *) = { hot, hot, mutex_waiter, lock_holder,
                                          pipe_reader, ticker, cond_waiter, timed_waiter };
    pthread_t tids[NTHREADS];
    long limit = argc > 1 ? atol(argv[1]) : 6000;
    long tick;
    int i;

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(pipe_fds) != 0) {
        perror("threads8: pipe");
        return 2;
    }
    for (i = 0; i < NTHREADS; i++)
        pthread_create(&tids[i], NULL, roles[i], (void *)(long)i);
    printf("v2 started %d threads\n", NTHREADS);
    for (tick = 0; tick < limit; tick++) {
        if (quit_requested())
            break;
        pause_ms(50);
        if (tick % 5 == 4 && write(pipe_fds[1], "x", 1) != 1)
            break;
    }
    stop = 1;
    if (write(pipe_fds[1], "q", 1) != 1)
        perror("threads8: write");
    pthread_mutex_lock(&cv_lock);
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&cv_lock);
    pthread_mutex_lock(&timed_lock);
    pthread_cond_broadcast(&timed_cv);
    pthread_mutex_unlock(&timed_lock);
    for (i = 0; i < NTHREADS; i++)
        pthread_join(tids[i], NULL);
    printf("v2 joined %d threads after %ld ticks\n", NTHREADS, tick);
    return 0;
}
