/*
 * calc.c - tokenizer and recursive-descent evaluator for integer expressions.
 *
 * Exercises:
 *   - a switch over a dense enum (8 cases) that compiles to a jump table
 *   - small struct (16 bytes) returned by value (struct token)
 *   - recursion (expr -> term -> factor -> expr for parentheses)
 *   - while loops with break/continue, static local (token counter)
 *   - struct member access through a pointer to a struct holding a struct
 */
#include <stdio.h>
#include <string.h>
#include <ctype.h>

enum kind { T_NUM, T_PLUS, T_MINUS, T_STAR, T_SLASH, T_LPAREN, T_RPAREN, T_END, T_BAD };

struct token {
    enum kind kind;
    long value;
};

struct lexer {
    const char *src;
    int pos;
    struct token cur;
};

static int tokens_seen(int bump)
{
    static int count;
    count += bump;
    return count;
}

static struct token next_token(struct lexer *lx)
{
    struct token t = { T_END, 0 };
    while (lx->src[lx->pos] != '\0') {
        char c = lx->src[lx->pos];
        if (c == ' ' || c == '\t') {
            lx->pos++;
            continue;
        }
        if (isdigit((unsigned char)c)) {
            long v = 0;
            while (isdigit((unsigned char)lx->src[lx->pos]))
                v = v * 10 + (lx->src[lx->pos++] - '0');
            t.kind = T_NUM;
            t.value = v;
            break;
        }
        lx->pos++;
        t.value = c;
        t.kind = c == '+' ? T_PLUS : c == '-' ? T_MINUS : c == '*' ? T_STAR
               : c == '/' ? T_SLASH : c == '(' ? T_LPAREN : c == ')' ? T_RPAREN : T_BAD;
        break;
    }
    tokens_seen(1);
    return t;
}

static void advance(struct lexer *lx) { lx->cur = next_token(lx); }

static long expr(struct lexer *lx);

static long factor(struct lexer *lx)
{
    struct token t = lx->cur;
    long v;
    switch (t.kind) {
    case T_NUM:
        advance(lx);
        return t.value;
    case T_MINUS:
        advance(lx);
        return -factor(lx);
    case T_PLUS:
        advance(lx);
        return factor(lx);
    case T_LPAREN:
        advance(lx);
        v = expr(lx);
        if (lx->cur.kind == T_RPAREN)
            advance(lx);
        return v;
    case T_STAR:
        advance(lx);
        return 1000 + factor(lx); /* deliberately odd: unary '*' means "1000 +" */
    case T_SLASH:
        advance(lx);
        return 0;
    case T_RPAREN:
        return -1;
    case T_END:
        return -2;
    default:
        advance(lx);
        return -3;
    }
}

static long term(struct lexer *lx)
{
    long v = factor(lx);
    for (;;) {
        if (lx->cur.kind == T_STAR) {
            advance(lx);
            v = v * factor(lx);
        } else if (lx->cur.kind == T_SLASH) {
            long d;
            advance(lx);
            d = factor(lx);
            v = d == 0 ? 0 : v / d;
        } else {
            break;
        }
    }
    return v;
}

static long expr(struct lexer *lx)
{
    long v = term(lx);
    while (lx->cur.kind == T_PLUS || lx->cur.kind == T_MINUS) {
        int plus = lx->cur.kind == T_PLUS;
        advance(lx);
        v = plus ? v + term(lx) : v - term(lx);
    }
    return v;
}

static long eval(const char *s)
{
    struct lexer lx;
    lx.src = s;
    lx.pos = 0;
    advance(&lx);
    return expr(&lx);
}

int main(void)
{
    static const char *inputs[] = {
        "1 + 2 * 3",
        "(1 + 2) * 3",
        "100 / 7 - 3",
        "-(4 - 10) * (2 + 2)",
        "((((((((1+1))))))))*((2))",
        "2*3*4*5*6*7 - 5040",
        "*5 + 1",
        "9 / 0 + 8",
        "12 $ 3",
        "",
    };
    long checksum = 0;
    size_t i;
    for (i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
        long v = eval(inputs[i]);
        printf("%-28s = %ld\n", inputs[i], v);
        checksum = checksum * 31 + v;
    }
    printf("tokens=%d checksum=%ld\n", tokens_seen(0), checksum);
    return 0;
}
