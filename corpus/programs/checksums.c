/*
 * checksums.c - CRC-32, Adler-32 and Fletcher-16 over generated buffers.
 *
 * Exercises:
 *   - every loop shape: for, while, do-while, nested loops, for(;;) with break
 *   - break and continue inside nested loops
 *   - a goto loop (table generation)
 *   - static local table initialised on first use
 *   - unsigned and bitwise arithmetic
 */
#include <stdio.h>
#include <string.h>

static unsigned crc32(const unsigned char *buf, size_t len)
{
    static unsigned table[256];
    static int ready;
    unsigned crc = 0xffffffffu;
    size_t i;
    if (!ready) {
        unsigned n = 0;
next_entry:
        {
            unsigned c = n;
            int k;
            for (k = 0; k < 8; k++)
                c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
            table[n] = c;
        }
        if (++n < 256)
            goto next_entry;
        ready = 1;
    }
    for (i = 0; i < len; i++)
        crc = table[(crc ^ buf[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xffffffffu;
}

static unsigned adler32(const unsigned char *buf, size_t len)
{
    unsigned a = 1, b = 0;
    while (len > 0) {
        size_t chunk = len < 3800 ? len : 3800;
        len -= chunk;
        do {
            a += *buf++;
            b += a;
        } while (--chunk);
        a %= 65521;
        b %= 65521;
    }
    return (b << 16) | a;
}

static unsigned short fletcher16(const unsigned char *buf, size_t len)
{
    unsigned s1 = 0, s2 = 0;
    size_t i = 0;
    for (;;) {
        if (i >= len)
            break;
        s1 = (s1 + buf[i]) % 255;
        s2 = (s2 + s1) % 255;
        i++;
    }
    return (unsigned short)((s2 << 8) | s1);
}

static void generate(unsigned char *buf, size_t len, unsigned seed)
{
    size_t i;
    for (i = 0; i < len; i++) {
        seed = seed * 1103515245u + 12345u;
        buf[i] = (unsigned char)(seed >> 16);
    }
}

int main(void)
{
    static unsigned char buf[10000];
    const char *probe = "123456789";
    size_t sizes[] = { 0, 1, 100, 4096, 10000 };
    unsigned combined = 0;
    int s, row, col, hits = 0;

    printf("crc32(\"%s\")=%08x adler32=%08x fletcher16=%04x\n", probe,
           crc32((const unsigned char *)probe, strlen(probe)),
           adler32((const unsigned char *)probe, strlen(probe)),
           fletcher16((const unsigned char *)probe, strlen(probe)));

    for (s = 0; s < (int)(sizeof sizes / sizeof sizes[0]); s++) {
        generate(buf, sizes[s], (unsigned)s + 7);
        printf("size %5zu: crc=%08x adler=%08x fletcher=%04x\n", sizes[s], crc32(buf, sizes[s]),
               adler32(buf, sizes[s]), fletcher16(buf, sizes[s]));
        combined ^= crc32(buf, sizes[s]) + (unsigned)s;
    }

    /* Nested loops with continue/break: count small bytes in a 64x64 view. */
    generate(buf, sizeof buf, 99);
    for (row = 0; row < 64; row++) {
        if (row % 8 == 7)
            continue;
        for (col = 0; col < 64; col++) {
            unsigned char v = buf[row * 64 + col];
            if (v > 250)
                break;
            if (v & 1)
                continue;
            hits += v < 32;
        }
    }
    printf("hits=%d combined=%08x\n", hits, combined);
    return 0;
}
