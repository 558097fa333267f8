/*
 * kvserver — the kgpatch demo target: a multi-threaded line-protocol key-value server.
 *
 * Files:
 *   main.c     argument parsing, signals, the threads (acceptor, workers, compactor,
 *              flusher, ticker), start-up and clean shutdown
 *   proto.c    request dispatch, the commands, the codec pair (kv_encode / kv_decode and
 *              their common caller kv_transcode), the planted bug (kv_parse_amount),
 *              kv_slow_path, STATS
 *   store.c    the striped hash table
 *   compact.c  the compactor's CPU work (kv_compact_step, kv_checksum) and two tiny
 *              assembly functions that a patcher must refuse (kv_loop_head, kv_tiny_ret)
 *   churn.c    stress helpers: --churn threads (malloc/free, dlopen/dlclose, short-lived
 *              threads) and the CANCEL command (pthread_cancel inside kv_slow_path)
 *
 * Functions marked KV_PATCHABLE are the ones sample patches replace. `noipa` keeps each one
 * an ordinary out-of-line function with the plain SysV ABI: no inlining, no cloning
 * (`.constprop`/`.isra` copies would hide the symbol), no interprocedural register
 * allocation (a caller that assumed the old body clobbers fewer registers would break when
 * a different body runs). Every other function may be optimised freely.
 */
#ifndef KVSERVER_H
#define KVSERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define KV_PATCHABLE __attribute__((noipa, used))

#define KV_MAX_LINE 4096  /* a request line, newline excluded */
#define KV_MAX_KEY 250
#define KV_MAX_VALUE 2048
#define KV_MAX_WORKERS 64
#define KV_SLOW_MAX_MS 600000u

/* ---- codec (proto.c) ----------------------------------------------------------------------
 * Encoded form: one tag byte (KV_CODEC_TAG) then each byte b[i] as rol8(b[i] ^ (KEY + i), ROT).
 * A patch that changes KEY/ROT/TAG must replace kv_encode, kv_decode AND kv_transcode. */
#define KV_CODEC_TAG 1
#define KV_CODEC_KEY 0x5a
#define KV_CODEC_ROT 3
#define KV_CODEC_OVERHEAD 1
#define KV_DECODE_ERROR ((size_t)-1)

size_t kv_encode(const char *in, size_t n, char *out);
size_t kv_decode(const char *in, size_t n, char *out);
/* 0 when decode(encode(in)) == in, -1 otherwise (an invariant violation). n <= KV_MAX_LINE. */
int kv_transcode(const char *in, size_t n);

/* SLOW: sleeps `ms` milliseconds inside itself (returns early on shutdown); returns the
 * milliseconds actually slept. */
unsigned kv_slow_path(unsigned ms);

/* ---- counters ------------------------------------------------------------------------------ */
enum kv_eintr_site {
    KV_EINTR_EPOLL_WAIT,
    KV_EINTR_POLL,
    KV_EINTR_ACCEPT,
    KV_EINTR_READ,
    KV_EINTR_WRITE,
    KV_EINTR_NANOSLEEP,
    KV_EINTR_CLOCK_NANOSLEEP,
    KV_EINTR_COND_TIMEDWAIT,
    KV_EINTR_COUNT
};
extern const char *const kv_eintr_names[KV_EINTR_COUNT];

struct kv_stats {
    atomic_ulong requests;
    atomic_ulong violations;
    atomic_ulong connections;     /* accepted so far */
    atomic_ulong open_connections;
    atomic_ulong compactions;
    atomic_ulong flushes;
    atomic_ulong ticks;
    atomic_ulong signals;         /* deliveries to --install-noop-handler handlers */
    atomic_ulong eintr[KV_EINTR_COUNT];
    atomic_ulong threads;         /* the server's own threads, main included */
    atomic_ulong flushed_keys;    /* key count seen by the last flush */
    atomic_ulong churn_rounds;    /* --churn */
    atomic_ulong dlopens;
    atomic_ulong ephemeral_threads;
};
extern struct kv_stats kv_stats;

static inline void kv_count(atomic_ulong *c) { atomic_fetch_add_explicit(c, 1, memory_order_relaxed); }
static inline unsigned long kv_read(atomic_ulong *c) { return atomic_load_explicit(c, memory_order_relaxed); }

/* ---- server state (main.c) ----------------------------------------------------------------- */
extern atomic_int kv_stopping;
extern unsigned kv_transcode_pause_us;   /* --transcode-pause-us: sleep between encode and decode */
/* Ask every thread to stop. Async-signal-safe (an atomic store and a write to an eventfd). */
void kv_request_stop(void);
uint64_t kv_now_ns(void);               /* CLOCK_MONOTONIC */
uint64_t kv_uptime_ms(void);
/* Sleep about `ns` nanoseconds, resuming after EINTR; returns early when stopping. */
void kv_sleep_ns(uint64_t ns);
/* Called by each long-lived thread once it has named itself; LISTENING waits for all. */
void kv_thread_ready(void);

/* ---- stress helpers (churn.c) -------------------------------------------------------------- */
int kv_churn_start(int n);   /* --churn N; 0 or -1 */
void kv_churn_join(void);
/* CANCEL: 0 when the thread was cancelled inside kv_slow_path, 1 when it returned normally,
 * -1 when it could not start; *cleaned tells whether its cleanup handler ran. */
int kv_cancel_test(unsigned ms, int *cleaned);

/* ---- requests (proto.c) -------------------------------------------------------------------- */
struct kv_out {
    char *buf;
    size_t len, cap;
    int oom;
};
void kv_out_append(struct kv_out *o, const char *s, size_t n);
void kv_out_printf(struct kv_out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

enum kv_after { KV_AFTER_CONTINUE, KV_AFTER_CLOSE, KV_AFTER_SHUTDOWN };
/* Handle one request line (no newline, NUL-terminated at line[n]); append the reply. */
enum kv_after kv_dispatch(char *line, size_t n, struct kv_out *out);

/* ---- store (store.c) ----------------------------------------------------------------------- */
int kv_store_init(void);
void kv_store_free(void);
int kv_store_set(const char *k, size_t kn, const char *v, size_t vn);   /* 0, or -1 on ENOMEM */
/* Copies the value into out (cap bytes); returns its length, or -1 when the key is absent. */
long kv_store_get(const char *k, size_t kn, char *out, size_t cap);
int kv_store_del(const char *k, size_t kn);   /* 1 deleted, 0 absent */
enum kv_incr_result { KV_INCR_OK, KV_INCR_NOT_INTEGER, KV_INCR_OVERFLOW, KV_INCR_NOMEM };
enum kv_incr_result kv_store_incr(const char *k, size_t kn, long delta, long *result);
unsigned long kv_store_count(void);
/* Strict base-10 parse of a stored integer value (no sign bugs here). */
int kv_parse_stored_long(const char *s, size_t n, long *out);

/* ---- compactor work (compact.c) ------------------------------------------------------------ */
struct kv_compact_state {
    uint64_t seed;
    unsigned long steps;
    char buf[256];
};
void kv_compact_step(struct kv_compact_state *st);
uint64_t kv_checksum(const char *p, size_t n);
/* Assembly, deliberately unpatchable: kv_loop_head has a branch back into its first five
 * bytes; kv_tiny_ret is three bytes long. Both return max(x, 1) / x. */
unsigned kv_loop_head(unsigned x);
unsigned kv_tiny_ret(unsigned x);

#endif
