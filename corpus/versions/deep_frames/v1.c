/*
 * deep_frames v1 - deep recursion that idles at the bottom.
 *
 * main -> descend(0) -> ... -> descend(depth) -> spin(): spin prints a progress
 * line every 10 ms for argv[1] ticks (default: one million) or until a line
 * "quit" arrives on stdin; then every frame returns and main prints the result.
 * argv[2] sets the depth (default 200). Every line starts with "v1 ".
 * v1: descend() has two locals (here, below).
 * spin() returns a value that does not depend on how long it ran, so the
 * final result of a run updated while idling equals that of a fresh v2 run.
 * Exercises: deep recursion, frame layout changes, nanosleep, poll/read.
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

static long ticks_limit = 1000000;

static long spin(long seed)
{
    long t;
    for (t = 0; t < ticks_limit; t++) {
        printf("v1 bottom tick %ld seed=%ld\n", t, seed);
        if (quit_requested())
            break;
        pause_ms(10);
    }
    return seed % 1000;
}

static long descend(int depth, int max_depth, long seed)
{
    long here = (seed * 31 + depth) % 1000003;
    long below;
    if (depth == max_depth)
        below = spin(here);
    else
        below = descend(depth + 1, max_depth, here);
    return (below * 3 + here) % 1000000007;
}

int main(int argc, char **argv)
{
    int depth = argc > 2 ? atoi(argv[2]) : 200;
    long result;
    if (argc > 1)
        ticks_limit = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("v1 start depth=%d\n", depth);
    result = descend(0, depth, 7);
    printf("v1 result=%ld\n", result);
    return 0;
}
