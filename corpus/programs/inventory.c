/*
 * inventory.c - a small warehouse inventory with reports.
 *
 * Exercises:
 *   - large struct (struct item, 48 bytes) passed and returned by value
 *   - small struct (struct money, 16 bytes: long + int) passed and returned by value
 *   - qsort and bsearch with comparator callbacks
 *   - function pointers stored in a struct table (report formatters)
 *   - double arithmetic, nested loops
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct item {
    char name[24];
    int sku;
    int qty;
    double unit_price;
    long flags;
};

struct money {
    long cents;
    int currency;
};

struct report {
    const char *title;
    int (*cmp)(const void *, const void *);
    void (*line)(const struct item *);
};

static struct item make_item(const char *name, int sku, int qty, double price)
{
    struct item it;
    memset(&it, 0, sizeof it);
    snprintf(it.name, sizeof it.name, "%s", name);
    it.sku = sku;
    it.qty = qty;
    it.unit_price = price;
    it.flags = qty < 5 ? 1 : 0;
    return it;
}

static struct item restock(struct item it, int amount)
{
    it.qty += amount;
    it.flags = it.qty < 5 ? 1 : 0;
    return it;
}

static struct money value_of(struct item it)
{
    struct money m;
    m.cents = (long)(it.unit_price * 100.0 + 0.5) * it.qty;
    m.currency = 978;
    return m;
}

static struct money add_money(struct money a, struct money b)
{
    a.cents += b.cents;
    return a;
}

static int by_sku(const void *a, const void *b)
{
    const struct item *x = a, *y = b;
    return (x->sku > y->sku) - (x->sku < y->sku);
}

static int by_name(const void *a, const void *b)
{
    const struct item *x = a, *y = b;
    return strcmp(x->name, y->name);
}

static int by_value_desc(const void *a, const void *b)
{
    long va = value_of(*(const struct item *)a).cents;
    long vb = value_of(*(const struct item *)b).cents;
    if (va != vb)
        return va < vb ? 1 : -1;
    return by_sku(a, b);
}

static void line_short(const struct item *it) { printf("  %-12s x%d\n", it->name, it->qty); }

static void line_long(const struct item *it)
{
    struct money m = value_of(*it);
    printf("  #%05d %-12s qty=%3d price=%8.2f value=%ld.%02ld%s\n", it->sku, it->name, it->qty,
           it->unit_price, m.cents / 100, m.cents % 100, it->flags ? " LOW" : "");
}

int main(void)
{
    struct item stock[8];
    int n = 0, i;
    struct money total = { 0, 978 };
    const struct report reports[] = {
        { "by sku", by_sku, line_long },
        { "by name", by_name, line_short },
        { "by value", by_value_desc, line_long },
    };

    stock[n++] = make_item("bolts", 4410, 120, 0.15);
    stock[n++] = make_item("nuts", 4409, 300, 0.07);
    stock[n++] = make_item("hinge", 1203, 4, 3.49);
    stock[n++] = make_item("drill", 9001, 2, 89.90);
    stock[n++] = make_item("tape", 3307, 17, 2.25);
    stock[n++] = make_item("saw", 8120, 6, 24.50);
    stock[n++] = make_item("glue", 3301, 1, 4.75);

    for (i = 0; i < n; i++)
        if (stock[i].flags)
            stock[i] = restock(stock[i], 10 - stock[i].qty % 10);

    for (i = 0; i < (int)(sizeof reports / sizeof reports[0]); i++) {
        int j;
        qsort(stock, n, sizeof stock[0], reports[i].cmp);
        printf("report %s:\n", reports[i].title);
        for (j = 0; j < n; j++)
            reports[i].line(&stock[j]);
    }

    for (i = 0; i < n; i++)
        total = add_money(total, value_of(stock[i]));
    printf("total value %ld.%02ld (currency %d)\n", total.cents / 100, total.cents % 100,
           total.currency);

    qsort(stock, n, sizeof stock[0], by_sku);
    {
        struct item key;
        const struct item *found;
        key.sku = 3307;
        found = bsearch(&key, stock, n, sizeof stock[0], by_sku);
        printf("lookup 3307: %s\n", found ? found->name : "(none)");
        key.sku = 5000;
        found = bsearch(&key, stock, n, sizeof stock[0], by_sku);
        printf("lookup 5000: %s\n", found ? found->name : "(none)");
    }
    return 0;
}
