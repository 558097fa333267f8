/*
 * main.c — start-up, threads, signals and shutdown of the demo server.
 *
 *   kvserver [--port P] [--workers N] [--transcode-pause-us US]
 *            [--install-noop-handler SIGNO[:norestart]]... [--block-signals-in-workers]
 *            [--churn N]
 *
 * The port also comes from $KVSERVER_PORT; 0 (the default) picks an ephemeral one. Once
 * listening, the server prints "LISTENING <port>" on stdout and flushes.
 *
 * Threads (each named): kv-acceptor (poll + accept4, hands each connection to a worker's
 * epoll), kv-worker-<i> (epoll_wait over its connections), kv-compactor (CPU work in ~1 ms
 * bursts with a short nanosleep between them), kv-flusher (pthread_cond_timedwait, wakes
 * every 100 ms), kv-ticker (nanosleep, 50 ms). The main thread waits in poll for the stop
 * eventfd, then joins everyone and frees everything.
 *
 * Signals: every blocking call here survives EINTR — a live patcher interrupts each thread
 * with a real-time signal. SIGTERM and SIGINT stop the server cleanly; SIGPIPE is ignored.
 */
#define _GNU_SOURCE
#include "kvserver.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KV_OUT_LIMIT (4u << 20)   /* a client that stops reading is dropped past this */

struct kv_stats kv_stats;
atomic_int kv_stopping;
unsigned kv_transcode_pause_us;

const char *const kv_eintr_names[KV_EINTR_COUNT] = {
    "epoll_wait", "poll", "accept", "read", "write", "nanosleep", "clock_nanosleep",
    "cond_timedwait",
};

static int kv_stop_fd = -1;
static uint64_t kv_start_ns;

/* ---- time ---------------------------------------------------------------------------------- */

uint64_t kv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t kv_uptime_ms(void) { return (kv_now_ns() - kv_start_ns) / 1000000u; }

void kv_sleep_ns(uint64_t ns)
{
    struct timespec req = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) }, rem;
    while (nanosleep(&req, &rem) != 0) {
        if (errno != EINTR)
            return;
        kv_count(&kv_stats.eintr[KV_EINTR_NANOSLEEP]);
        if (atomic_load(&kv_stopping))
            return;
        req = rem;
    }
}

/* ---- stopping ------------------------------------------------------------------------------ */

void kv_request_stop(void)
{
    int saved = errno;
    atomic_store(&kv_stopping, 1);
    uint64_t one = 1;
    if (kv_stop_fd >= 0) {
        ssize_t w = write(kv_stop_fd, &one, sizeof one);
        (void)w;
    }
    errno = saved;
}

static void kv_on_term(int sig)
{
    (void)sig;
    kv_request_stop();
}

static void kv_on_noop(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)si;
    (void)uc;
    kv_count(&kv_stats.signals);
}

static atomic_int kv_threads_ready;
static int kv_block_in_workers;

/* Main prints LISTENING only when every thread has named itself and called this, so a tool
 * that lists threads right after sees them all named. */
void kv_thread_ready(void) { atomic_fetch_add(&kv_threads_ready, 1); }

static void kv_name_self(const char *name)
{
    pthread_setname_np(pthread_self(), name);
    kv_thread_ready();
}

/* ---- workers ------------------------------------------------------------------------------- */

struct kv_conn {
    int fd;
    struct kv_conn *prev, *next;
    struct kv_out out;
    size_t out_off;
    size_t in_len;
    int closing;          /* flush what is queued, then close */
    int epollout;         /* EPOLLOUT currently requested */
    char in[KV_MAX_LINE + 2];
};

struct kv_worker {
    int index;
    int epfd;
    pthread_t thread;
    pthread_mutex_t lock;   /* guards the connection list: the acceptor inserts */
    struct kv_conn *conns;
};

static struct kv_worker kv_workers[KV_MAX_WORKERS];
static int kv_nworkers = 4;

static void kv_conn_free(struct kv_worker *w, struct kv_conn *c)
{
    pthread_mutex_lock(&w->lock);
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&w->lock);
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->out.buf);
    free(c);
    atomic_fetch_sub(&kv_stats.open_connections, 1);
}

/* Writes what it can. Returns 0 when all is written, 1 when some is left, -1 on error. */
static int kv_conn_flush(struct kv_conn *c)
{
    while (c->out_off < c->out.len) {
        ssize_t n = send(c->fd, c->out.buf + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                kv_count(&kv_stats.eintr[KV_EINTR_WRITE]);
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            return -1;
        }
        c->out_off += (size_t)n;
    }
    c->out_off = 0;
    c->out.len = 0;
    return 0;
}

/* Handles every complete line in the input buffer. Returns -1 when the conn must close. */
static int kv_conn_process(struct kv_conn *c)
{
    size_t start = 0;
    for (;;) {
        char *nl = memchr(c->in + start, '\n', c->in_len - start);
        if (!nl)
            break;
        size_t n = (size_t)(nl - (c->in + start));
        *nl = '\0';
        enum kv_after after = kv_dispatch(c->in + start, n, &c->out);
        start += n + 1;
        if (after == KV_AFTER_SHUTDOWN) {
            kv_conn_flush(c);
            kv_request_stop();
            c->closing = 1;
            break;
        }
        if (after == KV_AFTER_CLOSE) {
            c->closing = 1;
            break;
        }
    }
    memmove(c->in, c->in + start, c->in_len - start);
    c->in_len -= start;
    if (!c->closing && c->in_len > KV_MAX_LINE) {
        kv_out_printf(&c->out, "ERR line too long\n");
        c->closing = 1;
    }
    if (c->out.oom || c->out.len > KV_OUT_LIMIT)
        return -1;
    return 0;
}

static void kv_conn_event(struct kv_worker *w, struct kv_conn *c, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (;;) {
            if (c->closing)
                break;
            size_t room = sizeof c->in - 1 - c->in_len;
            ssize_t n = read(c->fd, c->in + c->in_len, room);
            if (n < 0) {
                if (errno == EINTR) {
                    kv_count(&kv_stats.eintr[KV_EINTR_READ]);
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                kv_conn_free(w, c);
                return;
            }
            if (n == 0) {   /* peer closed: answer what is complete, then close */
                kv_conn_process(c);
                kv_conn_flush(c);
                kv_conn_free(w, c);
                return;
            }
            c->in_len += (size_t)n;
            if (kv_conn_process(c) != 0) {
                kv_conn_free(w, c);
                return;
            }
            if ((size_t)n < room)
                break;
        }
    }
    int left = kv_conn_flush(c);
    if (left < 0 || (left == 0 && c->closing)) {
        kv_conn_free(w, c);
        return;
    }
    int want_out = left == 1;
    if (want_out != c->epollout) {
        struct epoll_event ev = { .events = EPOLLIN | (want_out ? EPOLLOUT : 0u), .data.ptr = c };
        epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->epollout = want_out;
    }
}

static void *kv_worker_main(void *arg)
{
    struct kv_worker *w = arg;
    char name[16];
    snprintf(name, sizeof name, "kv-worker-%d", w->index);
    if (kv_block_in_workers) {
        /* what many servers do: workers block everything, one thread handles signals */
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, NULL);
    }
    kv_name_self(name);
    struct epoll_event evs[64];
    int running = 1;
    while (running) {
        int n = epoll_wait(w->epfd, evs, 64, -1);
        if (n < 0) {
            if (errno == EINTR) {
                kv_count(&kv_stats.eintr[KV_EINTR_EPOLL_WAIT]);
                continue;
            }
            perror("kvserver: epoll_wait");
            kv_request_stop();
            break;
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {   /* the stop eventfd (level-triggered, shared) */
                running = 0;
                continue;
            }
            kv_conn_event(w, evs[i].data.ptr, evs[i].events);
        }
    }
    while (w->conns)
        kv_conn_free(w, w->conns);
    return NULL;
}

/* ---- acceptor ------------------------------------------------------------------------------ */

static void *kv_acceptor_main(void *arg)
{
    int lfd = *(int *)arg;
    unsigned next = 0;
    kv_name_self("kv-acceptor");
    struct pollfd pfd[2] = { { .fd = lfd, .events = POLLIN }, { .fd = kv_stop_fd, .events = POLLIN } };
    while (!atomic_load(&kv_stopping)) {
        int pr = poll(pfd, 2, -1);
        if (pr < 0) {
            if (errno == EINTR) {
                kv_count(&kv_stats.eintr[KV_EINTR_POLL]);
                continue;
            }
            perror("kvserver: poll");
            kv_request_stop();
            break;
        }
        if (pfd[1].revents)
            break;
        for (;;) {
            int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) {
                if (errno == EINTR) {
                    kv_count(&kv_stats.eintr[KV_EINTR_ACCEPT]);
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED)
                    break;
                perror("kvserver: accept4");   /* EMFILE and friends: back off a little */
                kv_sleep_ns(10000000u);
                break;
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct kv_conn *c = calloc(1, sizeof *c);
            if (!c) {
                close(fd);
                continue;
            }
            c->fd = fd;
            struct kv_worker *w = &kv_workers[next++ % (unsigned)kv_nworkers];
            struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
            pthread_mutex_lock(&w->lock);
            c->next = w->conns;
            if (w->conns)
                w->conns->prev = c;
            w->conns = c;
            kv_count(&kv_stats.connections);
            kv_count(&kv_stats.open_connections);
            int rc = epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev);
            pthread_mutex_unlock(&w->lock);
            if (rc != 0) {
                perror("kvserver: epoll_ctl");
                kv_conn_free(w, c);
            }
        }
    }
    return NULL;
}

/* ---- background threads -------------------------------------------------------------------- */

static void *kv_compactor_main(void *arg)
{
    (void)arg;
    kv_name_self("kv-compactor");
    struct kv_compact_state st = { 0 };
    while (!atomic_load(&kv_stopping)) {
        uint64_t t0 = kv_now_ns();
        do
            kv_compact_step(&st);
        while (kv_now_ns() - t0 < 1000000u);
        /* one nanosleep, not resumed: a signal only shortens the pause */
        struct timespec req = { 0, 200000 };
        if (nanosleep(&req, NULL) != 0 && errno == EINTR)
            kv_count(&kv_stats.eintr[KV_EINTR_NANOSLEEP]);
    }
    return NULL;
}

static pthread_mutex_t kv_flush_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t kv_flush_cond;

static void *kv_flusher_main(void *arg)
{
    (void)arg;
    kv_name_self("kv-flusher");
    pthread_mutex_lock(&kv_flush_lock);
    while (!atomic_load(&kv_stopping)) {
        struct timespec dl;
        clock_gettime(CLOCK_MONOTONIC, &dl);
        dl.tv_nsec += 100000000;
        if (dl.tv_nsec >= 1000000000) {
            dl.tv_sec++;
            dl.tv_nsec -= 1000000000;
        }
        int rc;
        for (;;) {
            rc = pthread_cond_timedwait(&kv_flush_cond, &kv_flush_lock, &dl);
            if (rc == EINTR) {   /* POSIX forbids it; count it if a libc ever does */
                kv_count(&kv_stats.eintr[KV_EINTR_COND_TIMEDWAIT]);
                continue;
            }
            if (rc == 0 && !atomic_load(&kv_stopping))
                continue;   /* spurious wake-up: keep waiting for the deadline */
            break;
        }
        if (rc == ETIMEDOUT) {
            atomic_store(&kv_stats.flushed_keys, kv_store_count());
            kv_count(&kv_stats.flushes);
        }
    }
    pthread_mutex_unlock(&kv_flush_lock);
    return NULL;
}

static void *kv_ticker_main(void *arg)
{
    (void)arg;
    kv_name_self("kv-ticker");
    while (!atomic_load(&kv_stopping)) {
        struct timespec req = { 0, 50000000 }, rem;
        while (clock_nanosleep(CLOCK_MONOTONIC, 0, &req, &rem) == EINTR) {
            kv_count(&kv_stats.eintr[KV_EINTR_CLOCK_NANOSLEEP]);
            if (atomic_load(&kv_stopping))
                break;
            req = rem;
        }
        kv_count(&kv_stats.ticks);
    }
    return NULL;
}

/* ---- start-up ------------------------------------------------------------------------------ */

static void kv_usage(FILE *f)
{
    fprintf(f,
            "usage: kvserver [--port P] [--workers N] [--transcode-pause-us US]\n"
            "                [--install-noop-handler SIGNO[:norestart]]... [--block-signals-in-workers]\n"
            "                [--churn N]\n"
            "The port also comes from $KVSERVER_PORT (0 = ephemeral). Prints LISTENING <port>.\n");
}

static int kv_parse_uint(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v > max || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

static int kv_install_noop(const char *spec)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%s", spec);
    int restart = 1;
    char *colon = strchr(buf, ':');
    if (colon) {
        if (strcmp(colon + 1, "norestart") != 0)
            return -1;
        restart = 0;
        *colon = '\0';
    }
    unsigned long sig;
    if (kv_parse_uint(buf, 64, &sig) != 0 || sig == 0 || sig == SIGKILL || sig == SIGSTOP)
        return -1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = kv_on_noop;
    sa.sa_flags = SA_SIGINFO | (restart ? SA_RESTART : 0);
    sigemptyset(&sa.sa_mask);
    return sigaction((int)sig, &sa, NULL);
}

static int kv_start_thread(pthread_t *t, void *(*fn)(void *), void *arg)
{
    int rc = pthread_create(t, NULL, fn, arg);
    if (rc != 0) {
        fprintf(stderr, "kvserver: pthread_create: %s\n", strerror(rc));
        return -1;
    }
    kv_count(&kv_stats.threads);
    return 0;
}

int main(int argc, char **argv)
{
    unsigned long port = 0, workers = 4, pause_us = 0, churn = 0;
    const char *env_port = getenv("KVSERVER_PORT");
    if (env_port && kv_parse_uint(env_port, 65535, &port) != 0) {
        fprintf(stderr, "kvserver: KVSERVER_PORT=%s is not a port number (0-65535)\n", env_port);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            kv_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--port") && v) {
            if (kv_parse_uint(v, 65535, &port) != 0) {
                fprintf(stderr, "kvserver: --port %s is not a port number (0-65535)\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--workers") && v) {
            if (kv_parse_uint(v, KV_MAX_WORKERS, &workers) != 0 || workers == 0) {
                fprintf(stderr, "kvserver: --workers %s must be 1..%d\n", v, KV_MAX_WORKERS);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--transcode-pause-us") && v) {
            if (kv_parse_uint(v, 1000000, &pause_us) != 0) {
                fprintf(stderr, "kvserver: --transcode-pause-us %s must be 0..1000000\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--block-signals-in-workers")) {
            kv_block_in_workers = 1;
        } else if (!strcmp(a, "--churn") && v) {
            if (kv_parse_uint(v, 256, &churn) != 0) {
                fprintf(stderr, "kvserver: --churn %s must be 0..256\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--install-noop-handler") && v) {
            if (kv_install_noop(v) != 0) {
                fprintf(stderr, "kvserver: --install-noop-handler %s: want SIGNO or SIGNO:norestart\n", v);
                return 2;
            }
            i++;
        } else {
            fprintf(stderr, "kvserver: unknown or incomplete argument '%s'\n", a);
            kv_usage(stderr);
            return 2;
        }
    }
    kv_nworkers = (int)workers;
    kv_transcode_pause_us = (unsigned)pause_us;
    kv_start_ns = kv_now_ns();
    kv_stats.threads = 1;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kv_on_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);

    if (kv_store_init() != 0) {
        fprintf(stderr, "kvserver: out of memory\n");
        return 1;
    }
    kv_stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (kv_stop_fd < 0 || lfd < 0) {
        perror("kvserver: socket");
        return 1;
    }
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof addr;
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 512) != 0 ||
        getsockname(lfd, (struct sockaddr *)&addr, &alen) != 0) {
        fprintf(stderr, "kvserver: cannot listen on 127.0.0.1:%lu: %s\n", port, strerror(errno));
        return 1;
    }

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&kv_flush_cond, &ca);
    pthread_condattr_destroy(&ca);

    pthread_t acceptor, compactor, flusher, ticker;
    int started_workers = 0, ok = 1;
    for (int i = 0; i < kv_nworkers && ok; i++) {
        struct kv_worker *w = &kv_workers[i];
        w->index = i;
        pthread_mutex_init(&w->lock, NULL);
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
        if (w->epfd < 0 || epoll_ctl(w->epfd, EPOLL_CTL_ADD, kv_stop_fd, &ev) != 0) {
            perror("kvserver: epoll");
            ok = 0;
            break;
        }
        if (kv_start_thread(&w->thread, kv_worker_main, w) != 0) {
            close(w->epfd);
            ok = 0;
            break;
        }
        started_workers++;
    }
    int have_acc = ok && kv_start_thread(&acceptor, kv_acceptor_main, &lfd) == 0;
    int have_cmp = ok && kv_start_thread(&compactor, kv_compactor_main, NULL) == 0;
    int have_fl = ok && kv_start_thread(&flusher, kv_flusher_main, NULL) == 0;
    int have_tk = ok && kv_start_thread(&ticker, kv_ticker_main, NULL) == 0;
    ok = ok && have_acc && have_cmp && have_fl && have_tk;
    int have_churn = ok;
    if (ok && kv_churn_start((int)churn) != 0)
        ok = 0;

    int status = 0;
    if (ok) {
        while ((unsigned long)atomic_load(&kv_threads_ready) + 1 < kv_read(&kv_stats.threads))
            kv_sleep_ns(100000u);
        printf("LISTENING %u\n", (unsigned)ntohs(addr.sin_port));
        fflush(stdout);
        struct pollfd pfd = { .fd = kv_stop_fd, .events = POLLIN };
        while (!atomic_load(&kv_stopping)) {
            if (poll(&pfd, 1, -1) < 0 && errno == EINTR)
                kv_count(&kv_stats.eintr[KV_EINTR_POLL]);
        }
    } else {
        status = 1;
    }

    kv_request_stop();
    pthread_mutex_lock(&kv_flush_lock);
    pthread_cond_broadcast(&kv_flush_cond);
    pthread_mutex_unlock(&kv_flush_lock);
    if (have_acc)
        pthread_join(acceptor, NULL);
    if (have_cmp)
        pthread_join(compactor, NULL);
    if (have_fl)
        pthread_join(flusher, NULL);
    if (have_tk)
        pthread_join(ticker, NULL);
    if (have_churn)
        kv_churn_join();
    for (int i = 0; i < started_workers; i++) {
        pthread_join(kv_workers[i].thread, NULL);
        close(kv_workers[i].epfd);
        pthread_mutex_destroy(&kv_workers[i].lock);
    }
    pthread_cond_destroy(&kv_flush_cond);
    close(lfd);
    close(kv_stop_fd);
    kv_store_free();
    if (status == 0) {
        printf("STOPPED requests=%lu violations=%lu\n", kv_read(&kv_stats.requests),
               kv_read(&kv_stats.violations));
        fflush(stdout);
    }
    return status;
}
