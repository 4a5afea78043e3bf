/* Test worker that knows nothing of balancer, built by the test (statically when it can be):
 * a TCP server on the hard-coded port in APP_PORT (never $PORT), on 0.0.0.0, greeting each
 * connection with "<pid>\n", then echoing what it reads until the client closes (one
 * connection at a time). No libc wrapper can be swapped under a static binary: only the kernel
 * sees its bind(). Also the worker of `benches/capture_cost.rs`. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    const char *port = getenv("APP_PORT");
    if (!port) return 2;
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(port));
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("bind"); return 1; }
    if (listen(s, 128) != 0) { perror("listen"); return 1; }
    char line[32];
    int n = snprintf(line, sizeof line, "%d\n", (int)getpid());
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        if (write(c, line, (size_t)n) == n) {
            char buf[4096];
            ssize_t got;
            while ((got = read(c, buf, sizeof buf)) > 0) {
                if (write(c, buf, (size_t)got) != got) break;
            }
        }
        close(c);
    }
}
