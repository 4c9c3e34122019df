/*
 * logstats.c - a log formatter and statistics collector built on varargs.
 *
 * Exercises:
 *   - variadic functions taking ints, longs and doubles (va_arg)
 *   - va_copy and passing a va_list on to vsnprintf
 *   - a variadic function with a double fixed parameter
 *   - stderr output (deterministic) as well as stdout
 *   - the 176-byte register save area gcc builds in variadic functions
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int sum_ints(int count, ...)
{
    va_list ap;
    int total = 0, i;
    va_start(ap, count);
    for (i = 0; i < count; i++)
        total += va_arg(ap, int);
    va_end(ap);
    return total;
}

static double mean(int count, ...)
{
    va_list ap;
    double total = 0.0;
    int i;
    if (count == 0)
        return 0.0;
    va_start(ap, count);
    for (i = 0; i < count; i++)
        total += va_arg(ap, double);
    va_end(ap);
    return total / count;
}

/* Pairs of (kind, value): kind 'i' = int, 'l' = long, 'd' = double, 0 ends. */
static double mixed(double scale, ...)
{
    va_list ap;
    double acc = 0.0;
    int kind;
    va_start(ap, scale);
    while ((kind = va_arg(ap, int)) != 0) {
        if (kind == 'i')
            acc += va_arg(ap, int);
        else if (kind == 'l')
            acc += (double)va_arg(ap, long);
        else if (kind == 'd')
            acc += va_arg(ap, double);
        else
            break;
    }
    va_end(ap);
    return acc * scale;
}

static unsigned log_hash;

static int log_line(FILE *out, const char *level, const char *fmt, ...)
{
    char buf[200];
    va_list ap, again;
    int n, len, i;
    va_start(ap, fmt);
    va_copy(again, ap);
    n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    len = vsnprintf(NULL, 0, fmt, again); /* walk the same arguments twice */
    va_end(again);
    for (i = 0; i < n && i < (int)sizeof buf; i++)
        log_hash = log_hash * 131 + (unsigned char)buf[i];
    fprintf(out, "[%-5s] %s\n", level, buf);
    return n == len ? n : -1;
}

int main(void)
{
    int s1 = sum_ints(0);
    int s2 = sum_ints(3, 10, 20, 30);
    int s3 = sum_ints(9, 1, 2, 3, 4, 5, 6, 7, 8, 9);
    double m1 = mean(2, 1.5, 2.5);
    double m2 = mean(10, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.5);
    double mx = mixed(0.5, 'i', 7, 'd', 2.25, 'l', 10000000000L, 'i', -3, 'd', -0.125, 0);
    int total = 0;

    total += log_line(stdout, "info", "sums %d %d %d", s1, s2, s3);
    total += log_line(stdout, "info", "means %.3f %.3f", m1, m2);
    total += log_line(stdout, "debug", "mixed %.4f from %s", mx, "7 ints and doubles");
    total += log_line(stderr, "warn", "%d%% of %ld requests slow (%.1fms avg)", 12, 4096L, 33.75);
    total += log_line(stdout, "info", "%s|%5d|%-5d|%x|%c", "fmt", 42, 42, 255, 'q');
    total += log_line(stderr, "error", "%.2e %g %s", 12345.678, 0.0001, "done");
    printf("chars=%d hash=%u\n", total, log_hash);
    return 0;
}
