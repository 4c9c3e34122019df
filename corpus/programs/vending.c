/*
 * vending.c - a vending machine modelled as a state machine.
 *
 * Exercises:
 *   - function pointers in a struct table (one handler per state)
 *   - a switch over 7 dense event codes that compiles to a jump table
 *   - a goto-based event loop
 *   - enum-typed parameters, struct passed by pointer
 */
#include <stdio.h>

enum state { IDLE, HAS_COINS, VENDING, SERVICE, N_STATES };
enum event { EV_COIN, EV_SELECT, EV_CANCEL, EV_DISPENSED, EV_OPEN, EV_CLOSE, EV_TICK };

struct machine {
    enum state st;
    int credit;
    int stock[4];
    int sales;
    int refunds;
    int ticks;
};

struct state_desc {
    const char *name;
    enum state (*on_event)(struct machine *m, enum event ev, int arg);
};

static const int prices[4] = { 120, 150, 90, 200 };

static enum state idle_ev(struct machine *m, enum event ev, int arg)
{
    if (ev == EV_COIN) {
        m->credit += arg;
        return HAS_COINS;
    }
    return ev == EV_OPEN ? SERVICE : IDLE;
}

static enum state coins_ev(struct machine *m, enum event ev, int arg)
{
    switch (ev) {
    case EV_COIN:
        m->credit += arg;
        return HAS_COINS;
    case EV_SELECT:
        if (arg < 0 || arg > 3 || m->stock[arg] == 0 || m->credit < prices[arg])
            return HAS_COINS;
        m->credit -= prices[arg];
        m->stock[arg]--;
        m->sales++;
        return VENDING;
    case EV_CANCEL:
        m->refunds += m->credit;
        m->credit = 0;
        return IDLE;
    case EV_DISPENSED:
        return HAS_COINS;
    case EV_OPEN:
        m->refunds += m->credit;
        m->credit = 0;
        return SERVICE;
    case EV_CLOSE:
        return HAS_COINS;
    case EV_TICK:
        m->ticks++;
        return m->ticks % 5 == 0 && m->credit < 50 ? IDLE : HAS_COINS;
    }
    return HAS_COINS;
}

static enum state vending_ev(struct machine *m, enum event ev, int arg)
{
    (void)arg;
    if (ev != EV_DISPENSED)
        return VENDING;
    return m->credit > 0 ? HAS_COINS : IDLE;
}

static enum state service_ev(struct machine *m, enum event ev, int arg)
{
    if (ev == EV_COIN && arg >= 0 && arg < 4) {
        m->stock[arg] += 3; /* in service mode a "coin" restocks a slot */
        return SERVICE;
    }
    return ev == EV_CLOSE ? IDLE : SERVICE;
}

static const struct state_desc states[N_STATES] = {
    { "idle", idle_ev },
    { "has_coins", coins_ev },
    { "vending", vending_ev },
    { "service", service_ev },
};

int main(void)
{
    static const int script[][2] = {
        { EV_COIN, 100 }, { EV_SELECT, 0 }, { EV_COIN, 50 }, { EV_SELECT, 0 },
        { EV_DISPENSED, 0 }, { EV_SELECT, 2 }, { EV_COIN, 100 }, { EV_SELECT, 2 },
        { EV_DISPENSED, 0 }, { EV_CANCEL, 0 }, { EV_OPEN, 0 }, { EV_COIN, 3 },
        { EV_COIN, 1 }, { EV_CLOSE, 0 }, { EV_COIN, 200 }, { EV_SELECT, 3 },
        { EV_DISPENSED, 0 }, { EV_COIN, 10 }, { EV_TICK, 0 }, { EV_TICK, 0 },
        { EV_TICK, 0 }, { EV_TICK, 0 }, { EV_TICK, 0 }, { EV_COIN, 500 },
        { EV_SELECT, 3 }, { EV_DISPENSED, 0 }, { EV_SELECT, 3 }, { EV_DISPENSED, 0 },
        { EV_SELECT, 1 }, { EV_DISPENSED, 0 }, { EV_CANCEL, 0 },
    };
    struct machine m = { IDLE, 0, { 2, 1, 5, 1 }, 0, 0, 0 };
    unsigned i = 0;
    unsigned long trace = 0;

loop:
    if (i < sizeof script / sizeof script[0]) {
        enum state before = m.st;
        m.st = states[m.st].on_event(&m, (enum event)script[i][0], script[i][1]);
        if (m.st != before)
            printf("%2u: %-9s -> %-9s credit=%d\n", i, states[before].name, states[m.st].name,
                   m.credit);
        trace = trace * 5 + m.st;
        i++;
        goto loop;
    }
    printf("sales=%d refunds=%d credit=%d stock=%d,%d,%d,%d trace=%lu\n", m.sales, m.refunds,
           m.credit, m.stock[0], m.stock[1], m.stock[2], m.stock[3], trace);
    return 0;
}
