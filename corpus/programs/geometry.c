/*
 * geometry.c - 2-D/3-D geometry helpers: polygons, transforms, distances.
 *
 * Exercises:
 *   - struct of two doubles passed/returned by value (in xmm0:xmm1)
 *   - struct of three doubles (24 bytes) passed/returned in memory
 *   - struct mixing int and float (8 bytes, in one integer register)
 *   - float parameters and float returns, double parameters and returns
 *   - 10 double parameters: the 9th and 10th are passed on the stack
 *   - a mix of int and double parameters interleaved
 */
#include <math.h>
#include <stdio.h>

struct vec2 { double x, y; };
struct vec3 { double x, y, z; };
struct tagged { int id; float w; };

static struct vec2 v2(double x, double y)
{
    struct vec2 v = { x, y };
    return v;
}

static struct vec2 v2_add(struct vec2 a, struct vec2 b) { return v2(a.x + b.x, a.y + b.y); }

static struct vec2 v2_rotate90(struct vec2 a) { return v2(-a.y, a.x); }

static double cross(struct vec2 a, struct vec2 b) { return a.x * b.y - a.y * b.x; }

static struct vec3 v3_cross(struct vec3 a, struct vec3 b)
{
    struct vec3 r;
    r.x = a.y * b.z - a.z * b.y;
    r.y = a.z * b.x - a.x * b.z;
    r.z = a.x * b.y - a.y * b.x;
    return r;
}

static struct vec3 v3_scale(struct vec3 a, double k)
{
    a.x *= k;
    a.y *= k;
    a.z *= k;
    return a;
}

static float lerpf(float a, float b, float t) { return a + (b - a) * t; }

static struct tagged heavier(struct tagged a, struct tagged b) { return a.w >= b.w ? a : b; }

static double polygon_area(const struct vec2 *pts, int n)
{
    double twice = 0.0;
    int i;
    for (i = 0; i < n; i++)
        twice += cross(pts[i], pts[(i + 1) % n]);
    return fabs(twice) / 2.0;
}

static double poly10(double a0, double a1, double a2, double a3, double a4, double a5,
                     double a6, double a7, double a8, double a9)
{
    /* Horner form of a polynomial evaluated at x = 0.5 */
    double x = 0.5;
    return ((((((((a9 * x + a8) * x + a7) * x + a6) * x + a5) * x + a4) * x + a3) * x + a2) * x +
            a1) * x + a0;
}

static double interleaved(int n, double scale, int offset, float bias, long count, double tail)
{
    return (n + offset) * scale + (double)bias * count - tail;
}

int main(void)
{
    struct vec2 square[4] = { { 0, 0 }, { 4, 0 }, { 4, 3 }, { 0, 3 } };
    struct vec2 tri[3], p = v2(1.5, -2.0);
    struct vec3 i3 = { 1, 0, 0 }, j3 = { 0, 1, 0 }, k3;
    struct tagged t1 = { 1, 2.5f }, t2 = { 2, 7.25f }, heavy;
    int i;

    tri[0] = v2(0, 0);
    tri[1] = v2_add(tri[0], v2(6, 0));
    tri[2] = v2_add(tri[1], v2_rotate90(v2(3, 0)));
    printf("square area=%.2f triangle area=%.2f\n", polygon_area(square, 4), polygon_area(tri, 3));
    for (i = 0; i < 4; i++) {
        p = v2_rotate90(v2_add(p, square[i]));
        printf("walk %d: (%.2f, %.2f)\n", i, p.x, p.y);
    }
    k3 = v3_scale(v3_cross(i3, j3), 2.5);
    printf("i x j * 2.5 = (%.1f, %.1f, %.1f)\n", k3.x, k3.y, k3.z);
    printf("lerp=%.4f heavier=%d\n", (double)lerpf(1.0f, 3.0f, 0.375f), (heavy = heavier(t1, t2)).id);
    printf("heavy w=%.2f\n", (double)heavy.w);
    printf("poly10=%.6f\n", poly10(1, 2, 3, 4, 5, 6, 7, 8, 9, 10));
    printf("interleaved=%.3f\n", interleaved(3, 1.5, 4, 0.25f, 12, 0.125));
    printf("hypot=%.6f\n", sqrt(p.x * p.x + p.y * p.y));
    return 0;
}
