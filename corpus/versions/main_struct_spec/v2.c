/*
 * main_struct_spec v2 - a struct local of main's running loop gains a member
 * whose value must come from the user (live test: runtime/tests/apply_specs.rs).
 *
 * v1: struct session { int fd; long bytes; } s, a local of main.
 * v2: struct session { int fd; int max_conn; long bytes; }: by default the
 * new member of a frame's local would start at zero (with a warning); v2
 * divides by it, so the user gives its value. The SPEC the user writes
 * (SPEC.toml beside this file):
 *
 *     [values.members."struct session"]
 *     max_conn = 64
 *
 * Each tick t (n = t + 1 steps so far): fd = 3, bytes = 100n;
 * v2 also prints per_conn = bytes / max_conn (64 in a fresh v2).
 * Runs argv[1] ticks (default 10), sleeping argv[2] ms after each (default
 * 0), then prints "v2 done t=N". Every line starts with "v2 ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct session {
    int fd;
    int max_conn; /* new: the SPEC gives its value */
    long bytes;
};

/* Sleeps for `ms` milliseconds (pacing for tests that watch it run). */
static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

int main(int argc, char **argv)
{
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    struct session s = { 3, 64, 0 };
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (t = 0; t < limit; t++) {
        s.bytes += 100;
        printf("v2 t=%ld fd=%d max_conn=%d bytes=%ld per_conn=%ld\n", t, s.fd, s.max_conn,
               s.bytes, s.bytes / s.max_conn);
        if (pause > 0)
            pause_ms(pause);
    }
    printf("v2 done t=%ld\n", t);
    return 0;
}
