/*
 * churn.c — stress helpers for the end-to-end tests.
 *
 *   --churn N   N threads "kv-churn-<i>" loop over: malloc/free bursts, dlopen/dlsym/dlclose
 *               of libm, a short-lived thread "kv-ephemeral" created and joined every few
 *               rounds (it calls the patch targets kv_parse_amount via INCR's path and
 *               kv_transcode), and a codec round trip each round. A short sleep per round
 *               keeps them from eating both cores.
 *   CANCEL ms   starts a thread "kv-cancel" that enters kv_slow_path(ms) with a cleanup
 *               handler pushed, cancels it from the requesting worker once it is inside,
 *               joins it and answers "CANCELLED cleanup=<0|1>": pthread_cancel unwinding
 *               through a (possibly patched) function.
 */
#define _GNU_SOURCE
#include "kvserver.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- churn threads ------------------------------------------------------------------------- */

static void *kv_ephemeral_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "kv-ephemeral");
    char line[64];
    int n = snprintf(line, sizeof line, "INCR ephemeral-%lu 1", (unsigned long)pthread_self() & 0xffff);
    if (kv_transcode(line, (size_t)n) != 0)
        kv_count(&kv_stats.violations);
    kv_count(&kv_stats.ephemeral_threads);
    return NULL;
}

static void *kv_churn_main(void *arg)
{
    char name[16];
    snprintf(name, sizeof name, "kv-churn-%d", (int)(intptr_t)arg);
    pthread_setname_np(pthread_self(), name);
    kv_thread_ready();
    uint64_t seed = 0x2545f4914f6cdd1dull ^ (uint64_t)(intptr_t)arg;
    void *held[32] = { 0 };
    unsigned long round = 0;
    while (!atomic_load(&kv_stopping)) {
        for (int i = 0; i < 32; i++) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            free(held[i]);
            held[i] = malloc(16 + seed % 4096);
            if (held[i])
                memset(held[i], (int)i, 16);
        }
        if (round % 16 == 0) {
            void *lib = dlopen("libm.so.6", RTLD_NOW | RTLD_LOCAL);
            if (lib) {
                volatile void *cosine = dlsym(lib, "cos");
                (void)cosine;
                dlclose(lib);
                kv_count(&kv_stats.dlopens);
            }
        }
        if (round % 64 == 0) {
            pthread_t t;
            if (pthread_create(&t, NULL, kv_ephemeral_main, NULL) == 0)
                pthread_join(t, NULL);
        }
        char buf[48];
        int n = snprintf(buf, sizeof buf, "SET churn-%lu %lu", round % 97, (unsigned long)seed);
        if (kv_transcode(buf, (size_t)n) != 0)
            kv_count(&kv_stats.violations);
        kv_count(&kv_stats.churn_rounds);
        round++;
        kv_sleep_ns(100000u);
    }
    for (int i = 0; i < 32; i++)
        free(held[i]);
    return NULL;
}

static pthread_t *kv_churn_threads;
static int kv_churn_count;

int kv_churn_start(int n)
{
    kv_churn_threads = calloc((size_t)n, sizeof *kv_churn_threads);
    if (n > 0 && !kv_churn_threads)
        return -1;
    for (; kv_churn_count < n; kv_churn_count++) {
        int rc = pthread_create(&kv_churn_threads[kv_churn_count], NULL, kv_churn_main,
                                (void *)(intptr_t)kv_churn_count);
        if (rc != 0) {
            fprintf(stderr, "kvserver: pthread_create: %s\n", strerror(rc));
            return -1;
        }
        kv_count(&kv_stats.threads);
    }
    return 0;
}

void kv_churn_join(void)
{
    for (int i = 0; i < kv_churn_count; i++)
        pthread_join(kv_churn_threads[i], NULL);
    free(kv_churn_threads);
    kv_churn_threads = NULL;
    kv_churn_count = 0;
}

/* ---- CANCEL -------------------------------------------------------------------------------- */

struct kv_cancel_arg {
    unsigned ms;
    atomic_int inside;
    atomic_int cleaned;
};

static void kv_cancel_cleanup(void *arg)
{
    struct kv_cancel_arg *a = arg;
    atomic_store(&a->cleaned, 1);
}

static void *kv_cancel_main(void *arg)
{
    struct kv_cancel_arg *a = arg;
    pthread_setname_np(pthread_self(), "kv-cancel");
    pthread_cleanup_push(kv_cancel_cleanup, a);
    atomic_store(&a->inside, 1);
    kv_slow_path(a->ms);   /* a cancellation point (nanosleep) inside a patch target */
    pthread_cleanup_pop(0);
    return NULL;
}

int kv_cancel_test(unsigned ms, int *cleaned)
{
    struct kv_cancel_arg a = { .ms = ms };
    pthread_t t;
    if (pthread_create(&t, NULL, kv_cancel_main, &a) != 0)
        return -1;
    while (!atomic_load(&a.inside))
        kv_sleep_ns(100000u);
    kv_sleep_ns((uint64_t)ms * 500000u);   /* half the sleep: well inside kv_slow_path */
    pthread_cancel(t);
    void *ret = NULL;
    pthread_join(t, &ret);
    *cleaned = atomic_load(&a.cleaned);
    return ret == PTHREAD_CANCELED ? 0 : 1;
}
