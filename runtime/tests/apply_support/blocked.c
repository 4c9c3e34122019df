/* blocked.c - blocks in a library call for as long as the test wants, with
 * state in globals, locals and a helper's frame on both sides of the call:
 *   blocked read    read(2) on stdin (a pipe), one chunk per line the test
 *                   writes, until end-of-file
 *   blocked sleep   three naps of 60 s in nanosleep, each ended by SIGUSR1
 *   blocked mutex   a thread waits in pthread_mutex_lock while main, which
 *                   holds the mutex, waits in read(2) for one byte
 * Output is deterministic for the same input. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long total;
static volatile sig_atomic_t woken;
/* Indexed, so that the blocked call's statement computes in rax: for clang's
 * `pthread_mutex_lock(&lock)` the rewriter gives no restart address (it
 * counts al as an input of every call, as for a variadic callee). */
static pthread_mutex_t locks[1] = { PTHREAD_MUTEX_INITIALIZER };

static long mix(long acc, const char *buf, long n)
{
    long i;
    for (i = 0; i < n; i++)
        acc = (acc * 31 + (unsigned char)buf[i]) % 1000000007;
    return acc;
}

static long read_chunk(char *buf, long cap)
{
    long n = read(0, buf, cap);
    return n;
}

static int do_read(void)
{
    char buf[64];
    long n, acc = 7;
    int chunks = 0;
    printf("ready\n");
    while ((n = read_chunk(buf, sizeof buf)) > 0) {
        acc = mix(acc, buf, n);
        chunks++;
        total += n;
        printf("chunk %d: %ld bytes, acc %ld\n", chunks, n, acc);
    }
    printf("eof after %d chunks, %ld bytes, acc %ld\n", chunks, total, acc);
    return 0;
}

static void on_usr1(int sig)
{
    woken = sig;
}

static void nap(void)
{
    struct timespec ts;
    ts.tv_sec = 60;
    ts.tv_nsec = 0;
    nanosleep(&ts, NULL);
}

static int do_sleep(void)
{
    struct sigaction sa;
    long acc = 1;
    int round;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    for (round = 0; round < 3; round++) {
        woken = 0;
        printf("nap %d\n", round);
        nap();
        acc = acc * 3 + round + woken;
        total += acc;
        printf("woke %d: acc %ld total %ld\n", round, acc, total);
    }
    return 0;
}

static void *waiter(void *arg)
{
    long which = (long)arg;
    pthread_mutex_lock(&locks[which]);
    total += 100;
    printf("waiter got the lock: total %ld\n", total);
    pthread_mutex_unlock(&locks[which]);
    return NULL;
}

static int do_mutex(void)
{
    pthread_t t;
    char c = 0;
    long got;
    pthread_mutex_lock(&locks[0]);
    pthread_create(&t, NULL, waiter, (void *)0L);
    total = 5;
    printf("ready\n");
    got = read(0, &c, 1);
    total += got + c;
    pthread_mutex_unlock(&locks[0]);
    pthread_join(t, NULL);
    printf("joined: total %ld\n", total);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && strcmp(argv[1], "read") == 0)
        return do_read();
    if (argc > 1 && strcmp(argv[1], "sleep") == 0)
        return do_sleep();
    if (argc > 1 && strcmp(argv[1], "mutex") == 0)
        return do_mutex();
    fprintf(stderr, "usage: blocked read|sleep|mutex\n");
    return 2;
}
