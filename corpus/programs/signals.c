/*
 * signals.c - signal handling: an event counter fed by signals sent to itself.
 *
 * Exercises:
 *   - sigaction with SA_SIGINFO and plain handlers, signal masks in sa_mask
 *   - raise() and kill(getpid(), ...) delivering synchronously
 *   - handlers with their own locals (arrays, loops) that call helpers
 *   - a handler that raises another signal (nested handler frames)
 *   - sigprocmask: block, check sigpending, then unblock to deliver
 *   - async-signal-safe output with write(2) from the handler, stderr output
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t usr1_count;
static volatile sig_atomic_t usr2_count;
static volatile sig_atomic_t hup_seen;
static volatile long handler_checksum;

static int fmt_int(char *buf, long v)
{
    char tmp[24];
    int n = 0, len = 0;
    if (v < 0) {
        buf[len++] = '-';
        v = -v;
    }
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v > 0);
    while (n > 0)
        buf[len++] = tmp[--n];
    return len;
}

static void on_usr1(int sig, siginfo_t *info, void *ctx)
{
    char line[64];
    long mix = 0;
    int i, len;
    (void)ctx;
    for (i = 0; i < 16; i++)
        mix = mix * 3 + (i ^ sig);
    usr1_count++;
    handler_checksum += mix + (info->si_code == SI_USER || info->si_code == SI_TKILL);
    memcpy(line, "usr1 #", 6);
    len = 6 + fmt_int(line + 6, usr1_count);
    line[len++] = '\n';
    write(STDOUT_FILENO, line, (size_t)len);
    if (usr1_count == 2)
        raise(SIGUSR2); /* nested: runs on top of this handler's frame */
}

static void on_usr2(int sig)
{
    int squares[8], i;
    long s = 0;
    for (i = 0; i < 8; i++)
        squares[i] = (i + sig) * (i + sig);
    for (i = 7; i >= 0; i--)
        s += squares[i];
    usr2_count++;
    handler_checksum += s;
}

static void on_hup(int sig)
{
    static const char msg[] = "hangup handled\n";
    hup_seen = sig;
    write(STDERR_FILENO, msg, sizeof msg - 1);
}

static int install(int sig, void (*plain)(int), void (*info)(int, siginfo_t *, void *))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    if (info) {
        sa.sa_sigaction = info;
        sa.sa_flags = SA_SIGINFO;
    } else {
        sa.sa_handler = plain;
        sigaddset(&sa.sa_mask, SIGUSR1);
    }
    return sigaction(sig, &sa, NULL);
}

int main(void)
{
    sigset_t block, pending;
    int i;
    if (install(SIGUSR1, NULL, on_usr1) || install(SIGUSR2, on_usr2, NULL) ||
        install(SIGHUP, on_hup, NULL)) {
        perror("sigaction");
        return 1;
    }
    setvbuf(stdout, NULL, _IONBF, 0); /* keep printf and write(2) in order */
    for (i = 0; i < 3; i++) {
        raise(SIGUSR1);
        kill(getpid(), SIGUSR2);
    }
    sigemptyset(&block);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, NULL);
    kill(getpid(), SIGHUP);
    sigpending(&pending);
    printf("hup pending while blocked: %d, seen: %d\n", sigismember(&pending, SIGHUP),
           (int)hup_seen);
    sigprocmask(SIG_UNBLOCK, &block, NULL);
    printf("after unblock seen: %d\n", (int)hup_seen);
    printf("usr1=%d usr2=%d checksum=%ld\n", (int)usr1_count, (int)usr2_count,
           (long)handler_checksum);
    signal(SIGUSR2, SIG_IGN);
    raise(SIGUSR2);
    printf("ignored usr2, count still %d\n", (int)usr2_count);
    return 0;
}
