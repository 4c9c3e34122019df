/*
 * echo_tcp.c - a line-oriented TCP echo server and its client in one process.
 *
 * Exercises:
 *   - sockets on 127.0.0.1 with an ephemeral port (bind to port 0, getsockname)
 *   - blocking accept, connect, recv and send; a server thread (pthreads)
 *   - a recv loop that tolerates short reads
 *   - deterministic output: the client prints in request order; the server
 *     statistics are printed after join
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct server {
    int listen_fd;
    int messages;
    long bytes;
};

/* Reads up to and including '\n'; returns the length, 0 on EOF. */
static int recv_line(int fd, char *buf, int cap)
{
    int n = 0;
    while (n < cap - 1) {
        char c;
        ssize_t r = recv(fd, &c, 1, 0);
        if (r <= 0)
            break;
        buf[n++] = c;
        if (c == '\n')
            break;
    }
    buf[n] = '\0';
    return n;
}

static void *serve(void *arg)
{
    struct server *s = arg;
    int conn = accept(s->listen_fd, NULL, NULL);
    char line[128];
    int n;
    if (conn < 0)
        return NULL;
    while ((n = recv_line(conn, line, sizeof line)) > 0) {
        char reply[160];
        int i, len;
        for (i = 0; i < n; i++)
            if (line[i] >= 'a' && line[i] <= 'z')
                line[i] = (char)(line[i] - 'a' + 'A');
        len = snprintf(reply, sizeof reply, "%02d:%s", s->messages, line);
        send(conn, reply, (size_t)len, 0);
        s->messages++;
        s->bytes += n;
    }
    close(conn);
    return NULL;
}

int main(void)
{
    static const char *msgs[] = { "hello\n", "dynamic software updating\n", "x\n",
                                  "the quick brown fox\n", "bye\n" };
    struct server s = { -1, 0, 0 };
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    pthread_t tid;
    int fd, i;
    unsigned sum = 0;

    s.listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (s.listen_fd < 0 || bind(s.listen_fd, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(s.listen_fd, 1) != 0 ||
        getsockname(s.listen_fd, (struct sockaddr *)&addr, &alen) != 0) {
        perror("listen");
        return 2;
    }
    pthread_create(&tid, NULL, serve, &s);

    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 3;
    }
    for (i = 0; i < (int)(sizeof msgs / sizeof msgs[0]); i++) {
        char reply[160];
        size_t len = strlen(msgs[i]);
        int n, j;
        send(fd, msgs[i], len, 0);
        n = recv_line(fd, reply, sizeof reply);
        for (j = 0; j < n; j++)
            sum = sum * 33 + (unsigned char)reply[j];
        printf("reply %d (%d bytes): %s", i, n, reply);
    }
    close(fd);
    pthread_join(tid, NULL);
    close(s.listen_fd);
    printf("server saw %d messages, %ld bytes; client checksum %u\n", s.messages, s.bytes, sum);
    return 0;
}
