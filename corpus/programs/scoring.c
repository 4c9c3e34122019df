/*
 * scoring.c - a scoring engine whose formulas are full of nested calls.
 *
 * Exercises (gcc keeps the partial results in rbx/r12-r15 across the calls):
 *   - a = f() + g() * h(x)
 *   - fib(n-1) + fib(n-2)
 *   - printf("%d %d %d", f(), g(), h(x))  (arguments evaluated right to left)
 *   - arr[f()] = g()  and  *slot() = h(x) + g()
 *   - a call with 9 arguments, each itself a call (runs out of callee-saved regs)
 *   - fp(x) + fp(x + 1) through a function pointer
 * All helpers are pure, so the output does not depend on evaluation order.
 */
#include <stdio.h>

static int table[16];
static int cursor = 3;

static int base(void) { return 7; }
static int bonus(void) { return 5; }
static int weight(int x) { return x * 3 + 1; }
static int pick(void) { return cursor % 16; }
static int *slot(void) { return &table[(cursor * 5) % 16]; }

static long fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

static int sq(int x) { return x * x; }
static int cube(int x) { return x * x * x; }

static long combine(int a, int b, int c, int d, int e, int f, int g, int h, int i)
{
    return ((((((((long)a * 3 + b) * 3 + c) * 3 + d) * 3 + e) * 3 + f) * 3 + g) * 3 + h) * 3 + i;
}

static int score(int x)
{
    int a = base() + bonus() * weight(x);
    int b = weight(a % 10) + weight(x) * bonus() - base();
    return a * 2 + b;
}

static double ratio(int x)
{
    return (double)weight(x) / (double)(bonus() + weight(x + 1));
}

int main(void)
{
    int (*fp)(int) = sq;
    int x, round;
    long total = 0;

    for (x = 0; x < 4; x++)
        printf("score(%d)=%d\n", x, score(x));
    printf("%d %d %d\n", base(), bonus(), weight(9));
    printf("fib: %ld %ld %ld\n", fib(10), fib(15) + fib(5), fib(20));

    for (round = 0; round < 6; round++) {
        cursor = round * 3 + 1;
        table[pick()] = bonus() + round;
        *slot() = weight(round) + base();
        total += table[pick()] * 10 + *slot();
    }
    printf("table total=%ld\n", total);

    total = combine(base(), bonus(), weight(1), weight(2), pick(), sq(3), cube(2), weight(4),
                    base() + bonus());
    printf("combine=%ld\n", total);

    total = 0;
    for (x = 1; x <= 5; x++) {
        fp = x % 2 ? sq : cube;
        total += fp(x) + fp(x + 1) * weight(x);
    }
    printf("fp total=%ld ratio=%.5f\n", total, ratio(3) + ratio(4) * ratio(5));
    return 0;
}
