/*
 * bank.c - concurrent transfers between accounts, then an audit.
 *
 * Exercises:
 *   - pthreads with one mutex per account, locked in address order
 *   - a start gate: workers wait on a condition variable until main opens it
 *   - per-thread struct arguments, pthread_join return values
 *   - a non-zero exit status: the number of overdrawn accounts (3)
 *   - deterministic output: transfers commute, results printed after join
 */
#include <pthread.h>
#include <stdio.h>

#define ACCOUNTS 6
#define TELLERS 4
#define ROUNDS 400

struct account {
    pthread_mutex_t lock;
    long balance;
    int ops;
};

struct teller {
    int id;
    long moved;
};

static struct account accounts[ACCOUNTS];
/* Some accounts open with an agreed overdraft (negative balance). */
static const long opening[ACCOUNTS] = { 700, -200, -150, 300, -100, 500 };
static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static int gate_open;

static void transfer(int from, int to, long amount)
{
    struct account *a = &accounts[from < to ? from : to];
    struct account *b = &accounts[from < to ? to : from];
    pthread_mutex_lock(&a->lock);
    pthread_mutex_lock(&b->lock);
    accounts[from].balance -= amount;
    accounts[to].balance += amount;
    accounts[from].ops++;
    accounts[to].ops++;
    pthread_mutex_unlock(&b->lock);
    pthread_mutex_unlock(&a->lock);
}

static void *teller_main(void *arg)
{
    struct teller *t = arg;
    int r;
    pthread_mutex_lock(&gate_lock);
    while (!gate_open)
        pthread_cond_wait(&gate_cond, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
    for (r = 0; r < ROUNDS; r++) {
        int from = (t->id + r) % ACCOUNTS;
        int to = (from + 1 + r % (ACCOUNTS - 1)) % ACCOUNTS;
        long amount = (r % 7 + 1) * (t->id + 1) + (from == 0 ? 3 : 0);
        if (from == to)
            continue;
        transfer(from, to, amount);
        t->moved += amount;
    }
    return &t->moved;
}

static int audit(long *total)
{
    int i, overdrawn = 0;
    *total = 0;
    for (i = 0; i < ACCOUNTS; i++) {
        printf("account %d: balance=%ld ops=%d%s\n", i, accounts[i].balance, accounts[i].ops,
               accounts[i].balance < 0 ? " OVERDRAWN" : "");
        *total += accounts[i].balance;
        overdrawn += accounts[i].balance < 0;
    }
    return overdrawn;
}

int main(void)
{
    pthread_t tids[TELLERS];
    struct teller tellers[TELLERS];
    long moved = 0, total;
    int i, overdrawn;

    for (i = 0; i < ACCOUNTS; i++) {
        pthread_mutex_init(&accounts[i].lock, NULL);
        accounts[i].balance = opening[i];
    }
    for (i = 0; i < TELLERS; i++) {
        tellers[i].id = i;
        tellers[i].moved = 0;
        pthread_create(&tids[i], NULL, teller_main, &tellers[i]);
    }
    pthread_mutex_lock(&gate_lock);
    gate_open = 1;
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
    for (i = 0; i < TELLERS; i++) {
        void *ret;
        pthread_join(tids[i], &ret);
        moved += *(long *)ret;
    }
    overdrawn = audit(&total);
    printf("moved=%ld total=%ld overdrawn=%d\n", moved, total, overdrawn);
    fprintf(stderr, "audit: %d accounts overdrawn\n", overdrawn);
    return overdrawn;
}
