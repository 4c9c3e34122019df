/* upstare demo, version 2: a new member and new behaviour. Deposits earn a
 * 1% bonus, every deposit earns 10 loyalty points (the new member `points`,
 * which transform.c computes at the update from the deposits made so far),
 * and the report shows the deposit count and the points. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct account {
    char owner[16];
    long balance;
    int deposits;
    long points; /* new: 10 per deposit */
};

static struct account accounts[3] = {
    {"ada", 100, 0}, {"brian", 250, 0}, {"grace", 75, 0}};
long total_deposited;

static void pause_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static long deposit(struct account *a, long amount) {
    long bonus = amount / 100 + 1;
    a->balance += amount + bonus;
    a->deposits++;
    a->points += 10;
    total_deposited += amount + bonus;
    return a->balance;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 20;
    long pace = argc > 2 ? atol(argv[2]) : 100;
    for (int round = 1; round <= rounds; round++) {
        struct account *a = &accounts[round % 3];
        long now = deposit(a, round * 10);
        printf("v2 round %d: %s has %ld after %d deposits, %ld points\n", round, a->owner, now,
               a->deposits, a->points);
        fflush(stdout);
        pause_ms(pace);
    }
    printf("v2 done: total deposited %ld\n", total_deposited);
    return 0;
}
