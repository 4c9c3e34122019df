/* upstare demo, version 1: a tiny accounting loop that keeps state in
 * globals, in main's locals and in a helper's frame. Runs until it has done
 * `rounds` rounds (argv[1], default 20), pacing itself with nanosleep. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct account {
    char owner[16];
    long balance;
    int deposits;
};

static struct account accounts[3] = {
    {"ada", 100, 0}, {"brian", 250, 0}, {"grace", 75, 0}};
long total_deposited;

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static long deposit(struct account *a, long amount) {
    a->balance += amount;
    a->deposits++;
    total_deposited += amount;
    return a->balance;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 20;
    long pace = argc > 2 ? atol(argv[2]) : 100;
    for (int round = 1; round <= rounds; round++) {
        struct account *a = &accounts[round % 3];
        long now = deposit(a, round * 10);
        printf("v1 round %d: %s has %ld\n", round, a->owner, now);
        fflush(stdout);
        pause_ms(pace);
    }
    printf("v1 done: total deposited %ld\n", total_deposited);
    return 0;
}
