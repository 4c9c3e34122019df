/*
 * echo_server v2 - an idle single-threaded TCP echo server (line protocol).
 *
 * Listens on 127.0.0.1, port argv[2] or an ephemeral one, and prints
 * "v2 listening port=<P>". Serves one connection at a time: each line
 * received is answered; the line "quit" is answered and stops the server.
 * argv[1] bounds the number of connections (default: unbounded).
 * v2 replies "v2 echo #<n> (<len> bytes): <line>" and "v2 bye" to quit.
 * While idle the only thread is blocked in accept() or recv().
 * Every stdout line starts with "v2 ".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

/* Serves one client; returns 1 if it asked the server to quit. */
static int serve_client(int fd, long *served)
{
    char line[256];
    while (recv_line(fd, line, sizeof line) >= 0) {
        char reply[400];
        int len;
        if (strcmp(line, "quit") == 0) {
            send_all(fd, "v2 bye\n", strlen("v2 bye\n"));
            return 1;
        }
        len = format_reply(reply, sizeof reply, line, *served);
        if (len > (int)sizeof reply - 1)
            len = (int)sizeof reply - 1;
        send_all(fd, reply, (size_t)len);
        (*served)++;
        printf("v2 served %ld\n", *served);
    }
    return 0;
}

int main(int argc, char **argv)
{
    long max_conns = argc > 1 ? atol(argv[1]) : -1;
    int port = argc > 2 ? atoi(argv[2]) : 0;
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    long conns = 0, served = 0;
    int lfd, one = 1;

    setvbuf(stdout, NULL, _IOLBF, 0);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons((unsigned short)port);
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 8) != 0 ||
        getsockname(lfd, (struct sockaddr *)&addr, &alen) != 0) {
        perror("echo_server: listen");
        return 2;
    }
    printf("v2 listening port=%d\n", ntohs(addr.sin_port));
    while (max_conns < 0 || conns < max_conns) {
        int quit;
        int c = accept(lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            perror("echo_server: accept");
            break;
        }
        conns++;
        quit = serve_client(c, &served);
        close(c);
        printf("v2 closed connection %ld\n", conns);
        if (quit)
            break;
    }
    close(lfd);
    printf("v2 exit connections=%ld served=%ld\n", conns, served);
    return 0;
}
