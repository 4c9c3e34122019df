/*
 * packets.c - builds and checks headers of a made-up network protocol.
 *
 * Exercises:
 *   - functions with 0, 1, 2, 3, 4, 5, 6, 7 and 8 integer parameters
 *   - 7th/8th parameters passed on the stack, including char and short ones
 *     (gcc copies those into a local slot) and long ones
 *   - mixed integer and double parameters (doubles do not use integer registers)
 *   - unsigned char / unsigned short / long long arithmetic and truncation
 */
#include <stdio.h>

static unsigned seq_base(void) { return 0x5a5a; }

static unsigned char version_of(unsigned raw) { return (unsigned char)(raw >> 4); }

static unsigned short port_pair(unsigned short src, unsigned short dst)
{
    return (unsigned short)(src ^ (dst << 3));
}

static int clamp3(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static long mix4(long a, int b, short c, char d) { return a * 1000003 + b * 31 + c * 7 + d; }

static long mix5(int a, int b, int c, int d, int e) { return (((a * 31L + b) * 31 + c) * 31 + d) * 31 + e; }

static long long header6(unsigned char ver, unsigned char flags, unsigned short len,
                         unsigned id, unsigned short port, long long ts)
{
    long long h = ver;
    h = (h << 4) | (flags & 0xf);
    h = (h << 16) | len;
    h = (h << 16) ^ id;
    h = h * 131 + port;
    return h ^ ts;
}

static long frame7(long a, int b, unsigned c, long d, int e, long f, char tag)
{
    return (a + b) * 3 - (long)c + d * e - f + tag;
}

static long frame8(long a, char b, short c, int d, long e, int f, short g, char h)
{
    long s = a;
    s = s * 17 + b;
    s = s * 17 + c;
    s = s * 17 + d;
    s = s * 17 + e;
    s = s * 17 + f;
    s = s * 17 + g;
    s = s * 17 + h;
    return s;
}

static double weighted(int count, double w1, long base, double w2, char bias, double w3)
{
    return count * w1 + base * w2 + bias * w3;
}

static unsigned long checksum8(unsigned char a, unsigned char b, unsigned char c, unsigned char d,
                               unsigned char e, unsigned char f, unsigned char g,
                               unsigned char h)
{
    unsigned long s1 = 1, s2 = 0;
    unsigned char bytes[8];
    int i;
    bytes[0] = a; bytes[1] = b; bytes[2] = c; bytes[3] = d;
    bytes[4] = e; bytes[5] = f; bytes[6] = g; bytes[7] = h;
    for (i = 0; i < 8; i++) {
        s1 = (s1 + bytes[i]) % 65521;
        s2 = (s2 + s1) % 65521;
    }
    return (s2 << 16) | s1;
}

int main(void)
{
    unsigned raw = 0x47;
    int i;
    long long acc = 0;
    printf("seq_base=%u version=%u\n", seq_base(), version_of(raw));
    printf("ports=%u clamp=%d,%d,%d\n", port_pair(8080, 443), clamp3(-5, 0, 9), clamp3(5, 0, 9),
           clamp3(50, 0, 9));
    printf("mix4=%ld mix5=%ld\n", mix4(77, -3, (short)-300, 'z'), mix5(1, 2, 3, 4, 5));
    for (i = 0; i < 6; i++) {
        long long h = header6((unsigned char)(i + 4), (unsigned char)(i * 3), (unsigned short)(i * 700),
                              0xdead0000u + (unsigned)i, (unsigned short)(1024 + i), 1700000000LL + i);
        long f7 = frame7(i, -i * 2, (unsigned)i * 3, 1L << i, i - 3, 99, (char)('a' + i));
        long f8 = frame8(i, (char)(-i), (short)(i * -1000), i * i, -i * 50L, 7, (short)(300 + i),
                         (char)('A' + i));
        acc = acc * 3 + h + f7 + f8;
        printf("pkt %d: hdr=%llx f7=%ld f8=%ld\n", i, (unsigned long long)h, f7, f8);
    }
    printf("weighted=%.4f\n", weighted(3, 0.5, 1000, 0.25, -7, 1.5));
    printf("checksum8=%lx acc=%lld\n", checksum8(1, 2, 3, 250, 251, 252, 7, 0x80), acc);
    return 0;
}
