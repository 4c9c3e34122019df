/*
 * matrix.c - dense matrix arithmetic on stack-allocated variable-length arrays.
 *
 * Exercises:
 *   - VLAs on the stack (double m[n][n]) and VLA parameters
 *   - recursion with a VLA in every frame (Laplace determinant)
 *   - double parameters and returns, float parameters and returns
 *   - nested for loops with continue
 */
#include <stdio.h>

static float scale_f(float x, float k) { return x * k; }

static double dot(int n, const double a[n], const double b[n])
{
    double s = 0.0;
    int i;
    for (i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void fill(int n, double m[n][n], double seed)
{
    int i, j;
    for (i = 0; i < n; i++)
        for (j = 0; j < n; j++)
            m[i][j] = (double)((i * 7 + j * 3 + (int)seed) % 11) - 5.0;
}

static void multiply(int n, double a[n][n], double b[n][n], double out[n][n])
{
    int i, j, k;
    for (i = 0; i < n; i++) {
        for (j = 0; j < n; j++) {
            double col[n];
            for (k = 0; k < n; k++)
                col[k] = b[k][j];
            out[i][j] = dot(n, a[i], col);
        }
    }
}

static double det(int n, double m[n][n])
{
    double total = 0.0;
    int c;
    if (n == 1)
        return m[0][0];
    if (n == 2)
        return m[0][0] * m[1][1] - m[0][1] * m[1][0];
    for (c = 0; c < n; c++) {
        double minor[n - 1][n - 1];
        int i, j, mj;
        if (m[0][c] == 0.0)
            continue;
        for (i = 1; i < n; i++) {
            mj = 0;
            for (j = 0; j < n; j++) {
                if (j == c)
                    continue;
                minor[i - 1][mj++] = m[i][j];
            }
        }
        total += (c % 2 ? -1.0 : 1.0) * m[0][c] * det(n - 1, minor);
    }
    return total;
}

static double trace(int n, double m[n][n])
{
    double t = 0.0;
    int i;
    for (i = 0; i < n; i++)
        t += m[i][i];
    return t;
}

static void show(int n, double m[n][n], const char *label)
{
    int i, j;
    printf("%s:\n", label);
    for (i = 0; i < n; i++) {
        for (j = 0; j < n; j++)
            printf(" %8.1f", m[i][j]);
        printf("\n");
    }
}

int main(void)
{
    int n;
    double checksum = 0.0;
    for (n = 2; n <= 5; n++) {
        double a[n][n], b[n][n], p[n][n];
        double da, db, dp;
        fill(n, a, 1.0);
        fill(n, b, 4.0);
        multiply(n, a, b, p);
        da = det(n, a);
        db = det(n, b);
        dp = det(n, p);
        if (n == 3)
            show(n, p, "p(3)");
        printf("n=%d det(a)=%.1f det(b)=%.1f det(ab)=%.1f trace(ab)=%.1f\n", n, da, db, dp,
               trace(n, p));
        checksum += dp + trace(n, p) * 0.5;
    }
    printf("scaled=%.3f checksum=%.3f\n", (double)scale_f(1.25f, 3.5f), checksum);
    return 0;
}
