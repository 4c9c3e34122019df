/*
 * pipeline.c - a sensor thread streams records through a pipe to a parser.
 *
 * Exercises:
 *   - blocking read(2) on a pipe fed by another thread
 *   - nanosleep of a few milliseconds between writes (the reader really blocks)
 *   - record framing across short reads, a carry-over buffer
 *   - a second thread reading a pipe that the main thread feeds
 *   - deterministic output: all records arrive in order over one pipe
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct feed {
    int fd;
    int records;
    int pause_ms;
};

static void pause_ms(int ms)
{
    struct timespec ts;
    ts.tv_sec = 0;
    ts.tv_nsec = ms * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void *sensor(void *arg)
{
    struct feed *f = arg;
    int i;
    for (i = 0; i < f->records; i++) {
        char rec[48];
        int len = snprintf(rec, sizeof rec, "t=%d temp=%d.%d;", i * 10, 18 + i % 7, (i * 3) % 10);
        if (write(f->fd, rec, (size_t)len) != len)
            break;
        if (i % 4 == 3)
            pause_ms(f->pause_ms);
    }
    close(f->fd);
    return NULL;
}

static void *counter(void *arg)
{
    int fd = *(int *)arg;
    static long bytes;
    char buf[16];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        bytes += n;
    return &bytes;
}

int main(void)
{
    int fds[2], cfds[2];
    struct feed f;
    pthread_t tid, cid;
    char buf[32], carry[128];
    size_t carry_len = 0;
    ssize_t n;
    int records = 0, temp_sum = 0, reads = 0;
    void *counted;

    if (pipe(fds) != 0 || pipe(cfds) != 0)
        return 1;
    f.fd = fds[1];
    f.records = 14;
    f.pause_ms = 3;
    pthread_create(&tid, NULL, sensor, &f);
    pthread_create(&cid, NULL, counter, &cfds[0]);

    while ((n = read(fds[0], buf, sizeof buf)) > 0) {
        ssize_t i;
        reads++;
        for (i = 0; i < n; i++) {
            if (carry_len < sizeof carry - 1)
                carry[carry_len++] = buf[i];
            if (buf[i] == ';') {
                int t, whole, frac;
                carry[carry_len] = '\0';
                if (sscanf(carry, "t=%d temp=%d.%d;", &t, &whole, &frac) == 3) {
                    records++;
                    temp_sum += whole * 10 + frac;
                    if (records % 5 == 1)
                        printf("record %d at t=%d: %d.%d C\n", records, t, whole, frac);
                }
                if (write(cfds[1], carry, carry_len) != (ssize_t)carry_len)
                    break;
                carry_len = 0;
            }
        }
    }
    close(fds[0]);
    close(cfds[1]);
    pthread_join(tid, NULL);
    pthread_join(cid, &counted);
    printf("records=%d avg=%.2f forwarded=%ld reads>0: %s\n", records,
           records ? temp_sum / 10.0 / records : 0.0, *(long *)counted, reads > 0 ? "yes" : "no");
    return 0;
}
