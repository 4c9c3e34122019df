/*
 * kvstore.c - a tiny in-memory key-value store driven by a command script.
 *
 * Exercises:
 *   - open-addressing hash table in a global array of structs
 *   - static locals (operation counter, last-hit cache)
 *   - nested blocks with shadowed locals (several variables named `i`, `n`, `key`)
 *   - a switch on command letters (sparse: compare tree), while/for loops, break
 *   - string handling with fixed buffers
 */
#include <stdio.h>
#include <string.h>

#define SLOTS 32

struct entry {
    char key[16];
    long value;
    int used;
    int tomb;
};

static struct entry table[SLOTS];

static unsigned hash(const char *s)
{
    unsigned h = 2166136261u;
    while (*s)
        h = (h ^ (unsigned char)*s++) * 16777619u;
    return h;
}

static int ops(void)
{
    static int n;
    return ++n;
}

static struct entry *find(const char *key, int create)
{
    static int last_hit = -1;
    unsigned i = hash(key) % SLOTS;
    unsigned probes;
    int first_tomb = -1;
    if (last_hit >= 0 && table[last_hit].used && strcmp(table[last_hit].key, key) == 0)
        return &table[last_hit];
    for (probes = 0; probes < SLOTS; probes++, i = (i + 1) % SLOTS) {
        if (table[i].used && strcmp(table[i].key, key) == 0) {
            last_hit = (int)i;
            return &table[i];
        }
        if (table[i].tomb && first_tomb < 0)
            first_tomb = (int)i;
        if (!table[i].used && !table[i].tomb)
            break;
    }
    if (!create)
        return NULL;
    if (first_tomb >= 0)
        i = (unsigned)first_tomb;
    if (table[i].used)
        return NULL;
    memset(&table[i], 0, sizeof table[i]);
    snprintf(table[i].key, sizeof table[i].key, "%s", key);
    table[i].used = 1;
    return &table[i];
}

static void exec(const char *line)
{
    char cmd = line[0];
    char key[16];
    long value = 0;
    int n = 0;
    struct entry *e;
    ops();
    if (sscanf(line + 1, "%15s %ld%n", key, &value, &n) < 1)
        return;
    switch (cmd) {
    case 'S':
        e = find(key, 1);
        if (e)
            e->value = value;
        break;
    case 'A':
        e = find(key, 1);
        if (e)
            e->value += value;
        break;
    case 'G':
        e = find(key, 0);
        printf("GET %s -> %s%ld\n", key, e ? "" : "missing ", e ? e->value : 0L);
        break;
    case 'D':
        e = find(key, 0);
        if (e) {
            e->used = 0;
            e->tomb = 1;
        }
        break;
    default:
        printf("bad command '%c'\n", cmd);
    }
}

int main(void)
{
    static const char *script[] = {
        "S apple 3", "S pear 7", "A apple 10", "G apple", "G plum", "S plum 1",
        "D pear", "G pear", "A pear 2", "G pear", "X junk", "S k01 1", "S k02 2",
        "S k03 3", "A k02 40", "G k02", "D apple", "G apple", "S apple 99", "G apple",
    };
    int i;
    long sum = 0;
    for (i = 0; i < (int)(sizeof script / sizeof script[0]); i++)
        exec(script[i]);
    {
        int i, n = 0; /* shadows the outer i */
        for (i = 0; i < SLOTS; i++) {
            if (!table[i].used)
                continue;
            {
                long n2 = table[i].value;
                int n = (int)strlen(table[i].key); /* shadows the block's n */
                sum += n2 * n;
            }
            n++;
        }
        printf("live=%d weighted=%ld\n", n, sum);
    }
    {
        const char *key = "k03";
        struct entry *e = find(key, 0);
        {
            const char *key = "k04"; /* shadowed key */
            struct entry *e2 = find(key, 0);
            printf("%s=%ld %s=%s ops=%d\n", "k03", e ? e->value : -1L, key, e2 ? "set" : "unset",
                   ops());
        }
    }
    return 0;
}
