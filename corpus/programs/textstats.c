/*
 * textstats.c - word and letter statistics over an embedded text.
 *
 * Exercises:
 *   - VLAs sized at run time (per-line word buffer), in a block scope
 *   - nested blocks with shadowed locals (count, i, len at three depths)
 *   - static locals (longest word seen so far, call counter)
 *   - for / while / do-while / nested loops with break and continue
 *   - a goto loop (scan to the next word boundary)
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

static const char *text[] = {
    "It was the best of times, it was the worst of times,",
    "it was the age of wisdom, it was the age of foolishness,",
    "it was the epoch of belief, it was the epoch of incredulity,",
    "it was the season of Light, it was the season of Darkness.",
};

static int note_word(const char *w, int len)
{
    static int calls;
    static char longest[32];
    static int longest_len;
    calls++;
    if (len > longest_len && len < (int)sizeof longest) {
        memcpy(longest, w, (size_t)len);
        longest[len] = '\0';
        longest_len = len;
    }
    if (w == NULL)
        printf("longest word: %s (%d letters) after %d words\n", longest, longest_len, calls - 1);
    return calls;
}

static int skip_to_alpha(const char *s, int i)
{
again:
    if (s[i] != '\0' && !isalpha((unsigned char)s[i])) {
        i++;
        goto again;
    }
    return i;
}

static int line_words(const char *line, unsigned letters[26])
{
    int len = (int)strlen(line);
    char word[len + 1]; /* VLA: no word is longer than its line */
    int count = 0, i = 0;
    while (line[i] != '\0') {
        int wl = 0;
        i = skip_to_alpha(line, i);
        if (line[i] == '\0')
            break;
        while (isalpha((unsigned char)line[i])) {
            char c = (char)tolower((unsigned char)line[i++]);
            word[wl++] = c;
            letters[c - 'a']++;
        }
        word[wl] = '\0';
        note_word(word, wl);
        count++;
    }
    return count;
}

int main(void)
{
    unsigned letters[26];
    int count = 0, first = 0, i;
    memset(letters, 0, sizeof letters);
    for (i = 0; i < (int)(sizeof text / sizeof text[0]); i++) {
        int count = line_words(text[i], letters); /* shadows the total */
        printf("line %d: %d words\n", i, count);
        {
            int i = count * 2; /* shadows the loop index */
            if (i > 100)
                continue;
        }
        first += count;
    }
    for (i = 0; i < (int)(sizeof text / sizeof text[0]); i++)
        count += line_words(text[i], letters);
    printf("total words: first pass %d, second pass %d\n", first, count);

    {
        int top[3] = { -1, -1, -1 };
        int i, k;
        for (i = 0; i < 26; i++) {
            for (k = 0; k < 3; k++) {
                if (top[k] < 0 || letters[i] > letters[top[k]]) {
                    int j;
                    for (j = 2; j > k; j--)
                        top[j] = top[j - 1];
                    top[k] = i;
                    break;
                }
            }
        }
        for (k = 0; k < 3; k++)
            printf("top %d: %c x%u\n", k + 1, 'a' + top[k], letters[top[k]]);
    }
    {
        int n = 26, len = 0;
        int hist[n];
        do {
            n--;
            hist[n] = (int)(letters[n] / 10);
            len += hist[n];
        } while (n > 0);
        printf("histogram mass=%d\n", len);
    }
    note_word(NULL, 0);
    return 0;
}
