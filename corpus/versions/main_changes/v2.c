/*
 * main_changes v2 - main itself changes between versions.
 *
 * v2: main gains the locals bonus (initialised to 100) and phase, and its
 * loop becomes a while loop with a different accumulator formula. An update
 * in the middle of the loop must give bonus a value (the initialiser at its
 * declaration has already been passed).
 * Runs argv[1] ticks (default: one million), one progress line every 10 ms;
 * a line "quit" on stdin ends it early. Every line starts with "v2 ".
 * Exercises: main's own frame (the bottom frame) being transformed.
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
    long i;
    long acc = 1;
    long bonus = 100;
    int phase = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("v2 start limit=%ld bonus=%ld\n", limit, bonus);
    i = 0;
    while (i < limit) {
        phase = (int)(i % 3);
        acc = (acc * 3 + i + bonus * phase) % 1000003;
        printf("v2 main i=%ld acc=%ld phase=%d bonus=%ld\n", i, acc, phase, bonus);
        if (quit_requested())
            break;
        pause_ms(10);
        i++;
    }
    printf("v2 done i=%ld acc=%ld\n", i, acc);
    return 0;
}
