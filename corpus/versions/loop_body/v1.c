/*
 * loop_body v1 - a long-running loop in main whose body changes between versions.
 *
 * v1: the running sum adds i * 3 and prints "sum=".
 * Locals, loop shape and call sequence are the same in both versions, so an
 * update in the middle of the loop maps main's frame one to one.
 *
 * Runs argv[1] ticks (default: one million), one progress line every 10 ms;
 * a line "quit" on stdin ends it early. Every line starts with "v1 ".
 * Exercises: a loop in main, nanosleep (the thread is mostly blocked in it),
 * poll/read on stdin, static locals.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 1000000;
    long i, sum = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("v1 start limit=%ld\n", limit);
    for (i = 0; i < limit; i++) {
        sum = (sum + i * 3) % 1000003;
        printf("v1 tick %ld sum=%ld\n", i, sum);
        if (quit_requested())
            break;
        pause_ms(10);
    }
    printf("v1 done ticks=%ld sum=%ld\n", i, sum);
    return 0;
}
