/*
 * stackvm.c - a bytecode interpreter for a small stack machine.
 *
 * Exercises:
 *   - a dispatch switch over 15 dense opcodes (jump table)
 *   - a struct holding the VM state, a call stack for CALL/RET
 *   - a loop with a computed program counter (while + switch + continue)
 *   - a helper taking a function pointer for the arithmetic ops
 *   - a non-zero exit status taken from the program's HALT value (7)
 */
#include <stdio.h>

enum op { PUSH, POP, ADD, SUB, MUL, DUP, SWAP, JMP, JZ, CALL, RET, PRINT, LOAD, STORE, HALT };

struct vm {
    long stack[64];
    int sp;
    int rstack[16];
    int rsp;
    long vars[4];
    long steps;
};

static long op_add(long a, long b) { return a + b; }
static long op_sub(long a, long b) { return a - b; }
static long op_mul(long a, long b) { return a * b; }

static void binop(struct vm *m, long (*f)(long, long))
{
    long b = m->stack[--m->sp];
    long a = m->stack[--m->sp];
    m->stack[m->sp++] = f(a, b);
}

static long run(struct vm *m, const long *code, int len)
{
    int pc = 0;
    while (pc >= 0 && pc < len && m->steps < 100000) {
        long op = code[pc++];
        long t;
        m->steps++;
        switch (op) {
        case PUSH: m->stack[m->sp++] = code[pc++]; break;
        case POP: m->sp--; break;
        case ADD: binop(m, op_add); break;
        case SUB: binop(m, op_sub); break;
        case MUL: binop(m, op_mul); break;
        case DUP: m->stack[m->sp] = m->stack[m->sp - 1]; m->sp++; break;
        case SWAP:
            t = m->stack[m->sp - 1];
            m->stack[m->sp - 1] = m->stack[m->sp - 2];
            m->stack[m->sp - 2] = t;
            break;
        case JMP: pc = (int)code[pc]; continue;
        case JZ:
            t = m->stack[--m->sp];
            pc = t == 0 ? (int)code[pc] : pc + 1;
            continue;
        case CALL:
            m->rstack[m->rsp++] = pc + 1;
            pc = (int)code[pc];
            continue;
        case RET: pc = m->rstack[--m->rsp]; break;
        case PRINT: printf("vm: %ld\n", m->stack[m->sp - 1]); break;
        case LOAD: m->stack[m->sp++] = m->vars[code[pc++] & 3]; break;
        case STORE: m->vars[code[pc++] & 3] = m->stack[--m->sp]; break;
        case HALT: return m->stack[m->sp - 1];
        default:
            printf("bad opcode %ld at %d\n", op, pc - 1);
            return -1;
        }
    }
    return -2;
}

int main(void)
{
    /* acc = 1; n = 10; while (n) { acc *= n; n -= 1; } print acc, print acc*acc, halt 7 */
    static const long fact[] = {
        PUSH, 1, STORE, 0,                /* 0 */
        PUSH, 10, STORE, 1,               /* 4 */
        LOAD, 1, JZ, 28,                  /* 8: loop head */
        LOAD, 0, LOAD, 1, MUL, STORE, 0,  /* 12: acc *= n */
        LOAD, 1, PUSH, 1, SUB, STORE, 1,  /* 19: n -= 1 */
        JMP, 8,                           /* 26 */
        LOAD, 0, PRINT, CALL, 38, PRINT,  /* 28: exit path */
        POP, PUSH, 7, HALT,               /* 34 */
        DUP, MUL, RET,                    /* 38: square subroutine */
    };
    static const long simple[] = {
        PUSH, 6, PUSH, 7, MUL, PRINT, PUSH, 5, SUB, PRINT, PUSH, 3, CALL, 16, PRINT, HALT,
        DUP, ADD, RET,
    };
    static const long broken[] = { PUSH, 1, 99 };
    struct vm m = { { 0 }, 0, { 0 }, 0, { 0 }, 0 };
    struct vm m2 = m, m3 = m;
    long r1, r2, r3;

    r1 = run(&m2, simple, (int)(sizeof simple / sizeof simple[0]));
    printf("simple -> %ld in %ld steps\n", r1, m2.steps);
    r2 = run(&m, fact, (int)(sizeof fact / sizeof fact[0]));
    printf("fact -> %ld in %ld steps, sp=%d, vars=%ld,%ld\n", r2, m.steps, m.sp, m.vars[0],
           m.vars[1]);
    r3 = run(&m3, broken, (int)(sizeof broken / sizeof broken[0]));
    printf("broken -> %ld\n", r3);
    return r1 == 6 && r3 == -1 ? (int)r2 : 1;
}
