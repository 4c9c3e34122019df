/*
 * prefork_server v2 - a pre-forking TCP server: one listening socket, a
 * parent that only waits for its workers, and N workers (argv[1], default
 * 4) that each accept and serve one connection at a time.
 *
 * The parent prints "v2 listening port=<P>", forks the workers and sits in
 * waitpid(); each worker prints "v2 worker pid=<PID> ready" and blocks in
 * accept(), then in recv() while a connection is open. A worker answers
 * each line received with "v2 echo #<n> (<len> bytes): <line>" and "v2 bye" to "quit" (which
 * closes that connection); the line "exit" makes it answer "exiting" and
 * exit with status 5 (v2: "v2 exiting"). The parent reports each worker that ended,
 * "v2 parent reaped pid=<PID> status=<S>", and forks a replacement.
 * Stopped by killing the process group.
 * Every stdout line starts with "v2 ".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* Reads one line (without the newline); returns its length, or -1 on EOF/error. */
static int recv_line(int fd, char *buf, int cap)
{
    int n = 0;
    for (;;) {
        char c;
        ssize_t r = recv(fd, &c, 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return n > 0 ? n : -1;
        if (c == '\n')
            break;
        if (c != '\r' && n < cap - 1)
            buf[n++] = c;
    }
    buf[n] = '\0';
    return n;
}

static void send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        buf += w;
        len -= (size_t)w;
    }
}

static int format_reply(char *out, size_t cap, const char *line, long n)
{
    size_t len = strlen(line);
    return snprintf(out, cap, "v2 echo #%ld (%zu bytes): %s\n", n + 1, len, line);
}

/* Serves one connection; returns 1 if the worker was told to exit. */
static int serve(int fd, long *served)
{
    char line[256];
    while (recv_line(fd, line, sizeof line) >= 0) {
        char reply[400];
        int len;
        if (strcmp(line, "quit") == 0) {
            send_all(fd, "v2 bye\n", strlen("v2 bye\n"));
            return 0;
        }
        if (strcmp(line, "exit") == 0) {
            send_all(fd, "v2 exiting\n", strlen("v2 exiting\n"));
            return 1;
        }
        len = format_reply(reply, sizeof reply, line, *served);
        if (len > (int)sizeof reply - 1)
            len = (int)sizeof reply - 1;
        send_all(fd, reply, (size_t)len);
        (*served)++;
    }
    return 0;
}

static void worker(int lfd)
{
    long served = 0;
    printf("v2 worker pid=%d ready\n", (int)getpid());
    for (;;) {
        int quit;
        int c = accept(lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            perror("prefork_server: accept");
            _exit(2);
        }
        quit = serve(c, &served);
        close(c);
        if (quit)
            _exit(5);
    }
}

static pid_t start_worker(int lfd)
{
    pid_t pid = fork();
    if (pid == 0)
        worker(lfd);
    if (pid < 0)
        perror("prefork_server: fork");
    return pid;
}

int main(int argc, char **argv)
{
    int workers = argc > 1 ? atoi(argv[1]) : 4;
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    int lfd, one = 1, i;

    setvbuf(stdout, NULL, _IOLBF, 0);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 16) != 0 ||
        getsockname(lfd, (struct sockaddr *)&addr, &alen) != 0) {
        perror("prefork_server: listen");
        return 2;
    }
    printf("v2 listening port=%d\n", ntohs(addr.sin_port));
    for (i = 0; i < workers; i++)
        start_worker(lfd);
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            perror("prefork_server: waitpid");
            break;
        }
        printf("v2 parent reaped pid=%d status=%d\n", (int)pid,
               WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        start_worker(lfd);
    }
    close(lfd);
    return 0;
}
