/*
 * waiters v2 - 6 threads, each waiting on its own condition variable under
 * its own mutex, all from one call site (one function), as a server's
 * background threads do (redis's bio threads). A thread whose wait returns
 * anything but 0 says so and ends the program: a plain pthread_cond_wait
 * never times out.
 *
 * Commands on stdin, one per line (read with read(2), one byte at a time):
 *   kick I   hands thread I one job; it prints "vK thread I job J" (J counts
 *            that thread's jobs from 1) and waits again
 *   quit     stops every thread, joins them, prints "vK joined jobs=N"
 * Every stdout line starts with "v2 " (v2: "v2 "); "v2 ready 6" first.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 6

struct slot {
    pthread_mutex_t lock;
    pthread_cond_t more;
    int pending;
    int jobs;
    int stopping;
};

static struct slot slots[THREADS];

static void *waiter(void *arg)
{
    struct slot *s = &slots[(long)arg];
    pthread_mutex_lock(&s->lock);
    for (;;) {
        if (s->pending == 0 && !s->stopping) {
            int rc = pthread_cond_wait(&s->more, &s->lock);
            if (rc != 0) {
                printf("v2 thread %ld wait returned %d\n", (long)arg, rc);
                fflush(stdout);
                exit(3);
            }
            continue;
        }
        if (s->pending == 0)
            break;
        s->pending--;
        s->jobs++;
        printf("v2 thread %ld job %d\n", (long)arg, s->jobs);
        fflush(stdout);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* One line of stdin into buf (without the newline); 0 at end of input. */
static int read_line(char *buf, int cap)
{
    int n = 0;
    char c;
    while (read(0, &c, 1) == 1) {
        if (c == '\n') {
            buf[n] = 0;
            return 1;
        }
        if (n < cap - 1)
            buf[n++] = c;
    }
    buf[n] = 0;
    return n > 0;
}

int main(void)
{
    pthread_t t[THREADS];
    char line[64];
    long i;
    int total = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (i = 0; i < THREADS; i++) {
        pthread_mutex_init(&slots[i].lock, NULL);
        pthread_cond_init(&slots[i].more, NULL);
        pthread_create(&t[i], NULL, waiter, (void *)i);
    }
    printf("v2 ready %d\n", THREADS);
    while (read_line(line, sizeof line)) {
        if (strncmp(line, "kick ", 5) == 0) {
            int k = atoi(line + 5);
            if (k < 0 || k >= THREADS)
                continue;
            pthread_mutex_lock(&slots[k].lock);
            slots[k].pending++;
            pthread_cond_signal(&slots[k].more);
            pthread_mutex_unlock(&slots[k].lock);
        } else if (strcmp(line, "quit") == 0) {
            break;
        }
    }
    for (i = 0; i < THREADS; i++) {
        pthread_mutex_lock(&slots[i].lock);
        slots[i].stopping = 1;
        pthread_cond_signal(&slots[i].more);
        pthread_mutex_unlock(&slots[i].lock);
    }
    for (i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        total += slots[i].jobs;
    }
    printf("v2 joined jobs=%d\n", total);
    return 0;
}
