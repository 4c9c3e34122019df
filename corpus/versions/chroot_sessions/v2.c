/*
 * chroot_sessions v2 - a fork-per-connection TCP server whose session
 * processes chroot into an empty directory and drop privileges, as FTP
 * daemons do.
 *
 * Listens on 127.0.0.1 (ephemeral port) and prints "v2 listening port=<P>".
 * For each connection it forks a session process that chroots into
 * argv[1] (an empty directory), sets its group and user to 65534 (nobody),
 * prints "v2 session pid=<PID> uid=<UID>" and answers each line received;
 * "quit" is answered and ends the session. The parent goes on accepting;
 * it ignores SIGCHLD, so sessions are reaped by the kernel.
 * v2 replies "v2 echo #<n> (<len> bytes): <line>" and "v2 bye" to quit.
 * A session needs root; one that cannot chroot prints
 * "v2 session failed: <reason>" and exits 3.
 * Every stdout line starts with "v2 ".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
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

/* Leaves the file system and root's privileges behind. */
static int enter_jail(const char *dir)
{
    if (chroot(dir) != 0 || chdir("/") != 0) {
        printf("v2 session failed: chroot %s: %s\n", dir, strerror(errno));
        return -1;
    }
    if (setgid(65534) != 0 || setuid(65534) != 0) {
        printf("v2 session failed: setuid: %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

/* One session: answers lines until "quit" or the end of the connection. */
static void session(int fd)
{
    char line[256];
    long served = 0;
    printf("v2 session pid=%d uid=%d\n", (int)getpid(), (int)getuid());
    while (recv_line(fd, line, sizeof line) >= 0) {
        char reply[400];
        int len;
        if (strcmp(line, "quit") == 0) {
            send_all(fd, "v2 bye\n", strlen("v2 bye\n"));
            break;
        }
        len = format_reply(reply, sizeof reply, line, served);
        if (len > (int)sizeof reply - 1)
            len = (int)sizeof reply - 1;
        send_all(fd, reply, (size_t)len);
        served++;
    }
    printf("v2 session pid=%d ended served=%ld\n", (int)getpid(), served);
}

int main(int argc, char **argv)
{
    const char *jail = argc > 1 ? argv[1] : "/var/empty";
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    int lfd, one = 1;

    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGCHLD, SIG_IGN);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 8) != 0 ||
        getsockname(lfd, (struct sockaddr *)&addr, &alen) != 0) {
        perror("chroot_sessions: listen");
        return 2;
    }
    printf("v2 listening port=%d\n", ntohs(addr.sin_port));
    for (;;) {
        pid_t pid;
        int c = accept(lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            perror("chroot_sessions: accept");
            break;
        }
        pid = fork();
        if (pid == 0) {
            close(lfd);
            if (enter_jail(jail) != 0)
                _exit(3);
            session(c);
            close(c);
            _exit(0);
        }
        if (pid < 0)
            perror("chroot_sessions: fork");
        close(c);
    }
    close(lfd);
    return 0;
}
