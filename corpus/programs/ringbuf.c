/*
 * ringbuf.c - fixed-size ring buffer of samples with a moving average.
 *
 * Exercises:
 *   - struct passed by pointer and small struct (8 bytes) returned by value
 *   - do-while drain loop, goto-based retry loop, for loop with continue
 *   - static local (sequence number) inside a helper
 *   - double return values (moving average)
 */
#include <stdio.h>

#define CAP 8

struct ring {
    int data[CAP];
    unsigned head;
    unsigned tail;
    unsigned count;
};

struct pop_result {
    int ok;
    int value;
};

static int next_seq(void)
{
    static int seq = 100;
    return seq++;
}

static int ring_push(struct ring *r, int v)
{
    if (r->count == CAP)
        return 0;
    r->data[r->tail] = v;
    r->tail = (r->tail + 1) % CAP;
    r->count++;
    return 1;
}

static struct pop_result ring_pop(struct ring *r)
{
    struct pop_result res = { 0, 0 };
    if (r->count == 0)
        return res;
    res.ok = 1;
    res.value = r->data[r->head];
    r->head = (r->head + 1) % CAP;
    r->count--;
    return res;
}

static double ring_average(const struct ring *r)
{
    long sum = 0;
    unsigned i, idx;
    if (r->count == 0)
        return 0.0;
    for (i = 0, idx = r->head; i < r->count; i++, idx = (idx + 1) % CAP)
        sum += r->data[idx];
    return (double)sum / r->count;
}

int main(void)
{
    struct ring r = { { 0 }, 0, 0, 0 };
    struct pop_result p;
    long checksum = 0;
    int dropped = 0, retries = 0;
    int round;

    for (round = 0; round < 5; round++) {
        int n = 3 + round * 2;
        int k;
        for (k = 0; k < n; k++) {
            int v = next_seq() * (k % 2 ? -1 : 1);
            int attempts = 0;
retry:
            if (!ring_push(&r, v)) {
                /* full: make room by dropping the oldest sample, then retry */
                p = ring_pop(&r);
                dropped += p.ok;
                attempts++;
                retries++;
                if (attempts < 3)
                    goto retry;
                continue;
            }
        }
        printf("round %d: count=%u avg=%.3f\n", round, r.count, ring_average(&r));
        if (round % 2 == 1) {
            int drained = 0;
            do {
                p = ring_pop(&r);
                if (p.ok) {
                    checksum = checksum * 7 + p.value;
                    drained++;
                }
            } while (p.ok && drained < 4);
            printf("  drained %d, left %u\n", drained, r.count);
        }
    }
    while ((p = ring_pop(&r)).ok)
        checksum = checksum * 7 + p.value;
    printf("dropped=%d retries=%d checksum=%ld next_seq=%d\n", dropped, retries, checksum,
           next_seq());
    return 0;
}
