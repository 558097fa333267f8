/* The benchmark's target: N threads, half busy in user code and half asleep in the kernel
 * (futex, epoll_wait, nanosleep in turn), all of which call the patched function
 * bench_leaf() from time to time. Usage: bench_target N [BUSY_CORES=1.0]. Prints "READY <threads>" once every thread runs, then
 * sleeps in read(2) on stdin until it closes. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline, noipa)) unsigned long bench_leaf(unsigned long x) {
    x ^= x >> 13;
    x *= 0x9e3779b97f4a7c15ULL;
    return x ^ (x >> 29);
}

static atomic_int started;
static atomic_ulong sink;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;

static unsigned long busy_burst(unsigned long x, int n) {
    for (int i = 0; i < n; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        if ((i & 255) == 0) x = bench_leaf(x);
    }
    return x;
}

/* Busy threads together keep `busy_cores` cores computing: each computes in 200 µs bursts
 * and sleeps between them (duty cycle busy_cores / n_busy, at most 50 %). Every thread
 * spinning at once on a 2-core machine would measure the scheduler, not kgpatch. */
static double busy_cores = 1.0;
static int n_busy = 1;

static void *busy(void *arg) {
    unsigned long x = (unsigned long)arg;
    double duty = busy_cores / n_busy;
    if (duty > 0.5) duty = 0.5;
    long sleep_ns = (long)(200000.0 * (1.0 / duty - 1.0));
    struct timespec pause = {sleep_ns / 1000000000L, sleep_ns % 1000000000L};
    atomic_fetch_add(&started, 1);
    for (;;) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        do {
            x = busy_burst(x, 4096);
            clock_gettime(CLOCK_MONOTONIC, &t1);
        } while ((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) < 200000);
        atomic_store(&sink, x);
        nanosleep(&pause, 0);
    }
    return 0;
}

static void *sleeper(void *arg) {
    long kind = (long)arg % 3;
    atomic_store(&sink, bench_leaf((unsigned long)arg));
    atomic_fetch_add(&started, 1);
    if (kind == 0) {
        pthread_mutex_lock(&mu);
        for (;;) pthread_cond_wait(&never, &mu);
    } else if (kind == 1) {
        int ep = epoll_create1(0);
        struct epoll_event ev;
        for (;;) epoll_wait(ep, &ev, 1, -1);
    } else {
        struct timespec s = {1, 0};
        for (;;) nanosleep(&s, 0);
    }
    return 0;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 8;
    if (argc > 2) busy_cores = atof(argv[2]);
    n_busy = (n + 1) / 2 > 0 ? (n + 1) / 2 : 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (long i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, i % 2 ? sleeper : busy, (void *)(i + 1)) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    while (atomic_load(&started) < n) usleep(1000);
    printf("READY %d\n", n);
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}
