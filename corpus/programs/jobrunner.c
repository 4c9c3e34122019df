/*
 * jobrunner.c - runs a list of jobs in forked child processes.
 *
 * Exercises:
 *   - fork, waitpid, exit statuses and death by signal (WIFSIGNALED)
 *   - a pipe per job: the parent blocks in read() until the child reports
 *   - function pointers in a job table
 *   - stdout flushed before fork so buffered output is not duplicated
 *   - deterministic output: jobs run one after another, the parent prints
 *     each child's result and status after waiting for it
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

struct job {
    const char *name;
    long (*run)(long arg);
    long arg;
};

static long collatz_steps(long n)
{
    long steps = 0;
    while (n != 1 && steps < 10000) {
        n = n % 2 ? 3 * n + 1 : n / 2;
        steps++;
    }
    return steps;
}

static long count_primes(long limit)
{
    long count = 0, i, d;
    for (i = 2; i <= limit; i++) {
        int prime = 1;
        for (d = 2; d * d <= i; d++) {
            if (i % d == 0) {
                prime = 0;
                break;
            }
        }
        count += prime;
    }
    return count;
}

static long crash(long sig)
{
    raise((int)sig);
    return -1;
}

static long fail_with(long code)
{
    exit((int)code);
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w <= 0)
            return;
        buf += w;
        len -= (size_t)w;
    }
}

static int run_job(const struct job *j, char *result, size_t cap)
{
    int fds[2], status = 0;
    pid_t pid;
    size_t got = 0;
    ssize_t r;

    if (pipe(fds) != 0)
        return -1;
    fflush(stdout);
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        char msg[64];
        long v;
        close(fds[0]);
        v = j->run(j->arg);
        snprintf(msg, sizeof msg, "%s(%ld)=%ld", j->name, j->arg, v);
        write_all(fds[1], msg, strlen(msg));
        close(fds[1]);
        _exit((int)(v % 200));
    }
    close(fds[1]);
    while (got < cap - 1 && (r = read(fds[0], result + got, cap - 1 - got)) > 0)
        got += (size_t)r;
    result[got] = '\0';
    close(fds[0]);
    waitpid(pid, &status, 0);
    return status;
}

int main(void)
{
    static const struct job jobs[] = {
        { "collatz", collatz_steps, 27 },   { "primes", count_primes, 5000 },
        { "crash", crash, SIGTERM },        { "collatz", collatz_steps, 97 },
        { "fail", fail_with, 42 },          { "primes", count_primes, 100 },
        { "crash", crash, SIGUSR1 },
    };
    int i, ok = 0, failed = 0, killed = 0;
    for (i = 0; i < (int)(sizeof jobs / sizeof jobs[0]); i++) {
        char result[128];
        int status = run_job(&jobs[i], result, sizeof result);
        if (status < 0) {
            printf("job %d: could not start\n", i);
            continue;
        }
        if (WIFEXITED(status)) {
            printf("job %d: exit %d, report \"%s\"\n", i, WEXITSTATUS(status), result);
            if (result[0])
                ok++;
            else
                failed++;
        } else if (WIFSIGNALED(status)) {
            printf("job %d: killed by signal %d, report \"%s\"\n", i, WTERMSIG(status), result);
            killed++;
        }
    }
    printf("ok=%d failed=%d killed=%d\n", ok, failed, killed);
    return 0;
}
