/*
 * heap_tree v2 - a binary search tree on the heap, with parent pointers,
 * whose node grows beyond its allocation (every node moves).
 *
 * v1: struct tnode { long key; long count; left, right, parent }, seven
 *     nodes (keys 50 30 70 20 40 60 80) built with calloc under the global
 *     root.
 * v2: struct tnode { long key; char label[16]; long count; left, right,
 *     parent; long depth; }: label and depth are new (empty and 0).
 *
 * Each tick t (n = t + 1 steps so far) every node's count grows by key/10,
 * visited in order through the parent pointers: nodes=7 keys=350
 * counts=35n links=1 (every child's parent is its parent) sorted=1, and
 * (v2) labels=0 (total label length) depths=0. At the end every node is
 * freed: "vN done t=N freed=7". Runs argv[1] ticks (default 10), sleeping
 * argv[2] ms after each (default 0). Every line starts "vN ".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct tnode {
    long key;
    char label[16]; /* new */
    long count;
    struct tnode *left, *right, *parent;
    long depth; /* new */
};

struct tnode *root;
long freed;

static void pause_ms(long ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void insert(long key)
{
    struct tnode *n = calloc(1, sizeof *n);
    if (!n)
        exit(2);
    n->key = key;
    struct tnode *p = root, *parent = NULL;
    while (p) {
        parent = p;
        p = key < p->key ? p->left : p->right;
    }
    n->parent = parent;
    if (!parent)
        root = n;
    else if (key < parent->key)
        parent->left = n;
    else
        parent->right = n;
}

static struct tnode *leftmost(struct tnode *n)
{
    while (n && n->left)
        n = n->left;
    return n;
}

static struct tnode *successor(struct tnode *n)
{
    if (n->right)
        return leftmost(n->right);
    while (n->parent && n == n->parent->right)
        n = n->parent;
    return n->parent;
}

static void step(long t)
{
    (void)t;
    for (struct tnode *n = leftmost(root); n; n = successor(n))
        n->count += n->key / 10;
}

static void show(long t)
{
    long nodes = 0, keys = 0, counts = 0, links = 1, sorted = 1, prev = -1;
    long labels = 0, depths = 0;
    for (struct tnode *n = leftmost(root); n; n = successor(n)) {
        nodes += 1;
        keys += n->key;
        counts += n->count;
        if ((n->left && n->left->parent != n) || (n->right && n->right->parent != n))
            links = 0;
        if (n->key <= prev)
            sorted = 0;
        prev = n->key;
        labels += (long)strnlen(n->label, sizeof n->label);
        depths += n->depth;
    }
    printf("v2 t=%ld nodes=%ld keys=%ld counts=%ld links=%ld sorted=%ld labels=%ld depths=%ld\n",
           t, nodes, keys, counts, links, sorted, labels, depths);
}

/* Frees children first; a freed subtree is unlinked before the next call,
 * so no live pointer leads to freed memory. */
static void free_tree(struct tnode *n)
{
    if (!n)
        return;
    free_tree(n->left);
    n->left = NULL;
    free_tree(n->right);
    n->right = NULL;
    free(n);
    freed += 1;
}

int main(int argc, char **argv)
{
    static const long keys[] = { 50, 30, 70, 20, 40, 60, 80 };
    long limit = argc > 1 ? atol(argv[1]) : 10;
    long pause = argc > 2 ? atol(argv[2]) : 0;
    long t;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < 7; i++)
        insert(keys[i]);
    for (t = 0; t < limit; t++) {
        step(t);
        show(t);
        if (pause > 0)
            pause_ms(pause);
    }
    free_tree(root);
    root = NULL;
    printf("v2 done t=%ld freed=%ld\n", t, freed);
    return 0;
}
