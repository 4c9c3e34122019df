/*
 * dispatch.c - code shapes of real servers and interpreters that
 * upstare-rewrite once refused or left without restart addresses.
 *
 * Exercises:
 *   - a bytecode interpreter dispatching with computed goto (lua's
 *     luaV_execute, PostgreSQL's ExecInterpExpr);
 *   - a switch over an enum with a case for every value and an unreachable
 *     end: no bounds check (PostgreSQL's CreateDestReceiver);
 *   - a formatter whose second switch's bounds check jumps to its dispatch
 *     (nginx's ngx_vslprintf);
 *   - calls to a noreturn function with 8 arguments, some pushed (sshd);
 *     functions ending in a noreturn call or in unreachable code;
 *   - a frame of exactly 128 bytes (gcc: add rsp,-128);
 *   - calls whose statement spans two lines.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noreturn)) static void fatal(const char *where, int a, int b, int c, int d,
                                            int e, int f, int g)
{
    fprintf(stderr, "fatal in %s: %d %d %d %d %d %d %d\n", where, a, b, c, d, e, f, g);
    exit(9);
}

enum op { OP_PUSH, OP_ADD, OP_MUL, OP_DUP, OP_DEC, OP_JNZ, OP_POP, OP_HALT };

/* Stack machine with computed goto; a bad instruction is fatal. */
static long vm_run(const int *code, int len)
{
    static const void *const labels[] = { &&l_push, &&l_add, &&l_mul, &&l_dup,
                                          &&l_dec,  &&l_jnz, &&l_pop, &&l_halt };
    long stack[32];
    int sp = 0;
    int pc = 0;
    long steps = 0;
dispatch:
    if (pc < 0 || pc >= len || code[pc] < OP_PUSH || code[pc] > OP_HALT)
        fatal("vm_run", pc, len, sp, pc >= 0 && pc < len ? code[pc] : -1, 0, 0, 1);
    steps++;
    goto *labels[code[pc++]];
l_push:
    if (sp >= 32)
        fatal("vm_run push", pc, len, sp, 32, 0, 0, 2);
    stack[sp++] = code[pc++];
    goto dispatch;
l_add:
    sp--;
    stack[sp - 1] += stack[sp];
    goto dispatch;
l_mul:
    sp--;
    stack[sp - 1] = stack[sp - 1] * stack[sp] % 1000003;
    goto dispatch;
l_dup:
    stack[sp] = stack[sp - 1];
    sp++;
    goto dispatch;
l_dec:
    stack[sp - 1]--;
    goto dispatch;
l_jnz:
    if (stack[sp - 1] != 0)
        pc = code[pc];
    else
        pc++;
    goto dispatch;
l_pop:
    sp--;
    goto dispatch;
l_halt:
    return stack[sp - 1] * 1000 + steps % 1000;
}

enum kind { K_INT, K_TEXT, K_LIST, K_MAP, K_BOOL, K_REAL, K_NONE };

/* Every enum value has a case and the end is unreachable: no bounds check. */
static int kind_weight(enum kind k, int x)
{
    switch (k) {
    case K_INT: return x;
    case K_TEXT: return x * 3;
    case K_LIST: return x + 7;
    case K_MAP: return x ^ 5;
    case K_BOOL: return x != 0;
    case K_REAL: return x / 2;
    case K_NONE: return 0;
    }
    __builtin_unreachable();
}

/* A formatter in the shape of ngx_vslprintf. */
static int format_value(char *out, int cap, const char *fmt, long v)
{
    int width = 0, sign = 1, hex = 0, n = 0;
    while (*fmt && n < cap - 1) {
        if (*fmt == '%') {
            fmt++;
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
            for (;;) {
                switch (*fmt) {
                case 'u': sign = 0; fmt++; continue;
                case 'X': hex = 2; fmt++; continue;
                case 'x': hex = 1; fmt++; continue;
                case '.':
                    fmt++;
                    while (*fmt >= '0' && *fmt <= '9')
                        fmt++;
                    continue;
                default:
                    break;
                }
                break;
            }
            switch (*fmt) {
            case 'd':
                n += snprintf(out + n, cap - n, "%*ld", width, sign ? v : (v < 0 ? -v : v));
                break;
            case 'i':
                n += snprintf(out + n, cap - n, hex == 2 ? "%lX" : hex ? "%lx" : "%ld", v);
                break;
            case 's': n += snprintf(out + n, cap - n, "str"); break;
            case 'c': out[n++] = (char)('a' + v % 26); break;
            case 'z': out[n++] = '0'; break;
            default: out[n++] = *fmt; break;
            }
            if (n > cap - 1)
                n = cap - 1;
            fmt++;
        } else {
            out[n++] = *fmt++;
        }
    }
    out[n] = 0;
    return n;
}

/* Ends in a noreturn call: gcc emits no epilogue after it. */
static int must_find(const char *s, char c)
{
    for (int i = 0; s[i]; i++) {
        if (s[i] == c)
            return i;
    }
    fatal("must_find", c, s[0], 0, 0, 0, 0, 3);
}

/* Ends in unreachable code: the loop's exit jumps to the function's end. */
static int first_multiple(int x, int m)
{
    while (x < 1000000) {
        if (x % m == 0)
            return x;
        x++;
        if (x < 0)
            break;
    }
    __builtin_unreachable();
}

/* A frame of exactly 128 bytes with gcc, and a call written over two lines. */
static long checksum_line(const char *text, int round)
{
    char line[88];
    int n = snprintf(line,
                     sizeof line, "%s/%d", text, round);
    long sum = 0;
    for (int i = 0; i < n; i++)
        sum = sum * 31 + (unsigned char)line[i];
    return sum % 100003;
}

int main(void)
{
    const int code[] = { OP_PUSH, 1, OP_PUSH, 12, OP_DUP, OP_POP, OP_DEC, OP_JNZ, 4,
                         OP_POP,  OP_PUSH, 3, OP_PUSH, 5, OP_MUL, OP_ADD, OP_HALT };
    int len = (int)(sizeof code / sizeof code[0]);
    long total = 0;
    char buf[96];
    for (int round = 0; round < 40; round++) {
        long r = vm_run(code, len);
        total += r;
        total += kind_weight((enum kind)(round % 7), round);
        int n = format_value(buf, sizeof buf, "v=%5ud %xi %Xi %s %c%z%%", r + round);
        total += n + must_find(buf, '=');
        total += first_multiple(round + 10, 7);
        total += checksum_line(buf, round);
        if (round % 10 == 0)
            printf("round %d: %s\n", round, buf);
    }
    printf("total %ld\n", total);
    ssize_t w = write(1,
                      "done\n", 5);
    return w == 5 ? 0 : 1;
}
