/*
 * deeprec.c - deep and mutual recursion over lists, grids and numbers.
 *
 * Exercises:
 *   - deep recursion (tens of thousands of frames) over a heap linked list
 *   - mutual recursion (is_even / is_odd)
 *   - recursive flood fill over a 2-D grid (four recursive calls per frame)
 *   - Ackermann function (deep, irregular recursion)
 *   - recursion with a struct parameter passed by value
 */
#include <stdio.h>
#include <stdlib.h>

#define DEPTH 20000
#define W 24
#define H 12

struct node {
    long value;
    struct node *next;
};

struct range {
    int lo;
    int hi;
};

static struct node *build(int n)
{
    struct node *head = NULL;
    int i;
    for (i = n; i > 0; i--) {
        struct node *nd = malloc(sizeof *nd);
        if (!nd)
            exit(1);
        nd->value = (i * 37L) % 101;
        nd->next = head;
        head = nd;
    }
    return head;
}

static long sum_list(const struct node *n, int depth, int *max_depth)
{
    if (!n) {
        *max_depth = depth;
        return 0;
    }
    return n->value + sum_list(n->next, depth + 1, max_depth);
}

static void free_list(struct node *n)
{
    while (n) {
        struct node *next = n->next;
        free(n);
        n = next;
    }
}

static int is_odd(unsigned n);
static int is_even(unsigned n) { return n == 0 ? 1 : is_odd(n - 1); }
static int is_odd(unsigned n) { return n == 0 ? 0 : is_even(n - 1); }

static char grid[H][W + 1];

static int fill(int r, int c, char from, char to)
{
    if (r < 0 || r >= H || c < 0 || c >= W || grid[r][c] != from)
        return 0;
    grid[r][c] = to;
    return 1 + fill(r + 1, c, from, to) + fill(r - 1, c, from, to) + fill(r, c + 1, from, to) +
           fill(r, c - 1, from, to);
}

static unsigned long ackermann(unsigned long m, unsigned long n)
{
    if (m == 0)
        return n + 1;
    if (n == 0)
        return ackermann(m - 1, 1);
    return ackermann(m - 1, ackermann(m, n - 1));
}

static long range_sum(struct range r)
{
    struct range left, right;
    int mid;
    if (r.hi - r.lo <= 1)
        return r.hi > r.lo ? (long)r.lo * r.lo : 0;
    mid = r.lo + (r.hi - r.lo) / 2;
    left.lo = r.lo;
    left.hi = mid;
    right.lo = mid;
    right.hi = r.hi;
    return range_sum(left) + range_sum(right);
}

int main(void)
{
    struct node *list = build(DEPTH);
    int depth = 0, r, c;
    long s = sum_list(list, 0, &depth);
    struct range all = { 0, 1000 };
    printf("list sum=%ld depth=%d\n", s, depth);
    free_list(list);

    printf("even(12345)=%d odd(12345)=%d even(8000)=%d\n", is_even(12345), is_odd(12345),
           is_even(8000));

    for (r = 0; r < H; r++) {
        for (c = 0; c < W; c++)
            grid[r][c] = (r == 5 && c != 3) || (c == 11 && r != 9) || (r * c) % 17 == 16 ? '#' : '.';
        grid[r][W] = '\0';
    }
    printf("filled %d cells from (0,0)\n", fill(0, 0, '.', 'a'));
    printf("refilled %d cells from (11,23)\n", fill(11, 23, 'a', 'b'));
    for (r = 0; r < H; r += 3)
        printf("  %s\n", grid[r]);

    printf("ackermann(2,3)=%lu ackermann(3,5)=%lu\n", ackermann(2, 3), ackermann(3, 5));
    printf("range_sum=%ld\n", range_sum(all));
    return 0;
}
