/*
 * store.c — a striped chained hash table: 64 Ki buckets, 256 mutexes.
 *
 * kv_local_mix here is a static function whose name is also used by a different static
 * function in compact.c: a patch must name the file ("store.c") to pick this one.
 */
#define _GNU_SOURCE
#include "kvserver.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define KV_BUCKETS 65536u
#define KV_STRIPES 256u

struct kv_entry {
    struct kv_entry *next;
    uint64_t hash;
    size_t klen, vlen;
    char data[];   /* key, then value */
};

static struct kv_entry **kv_buckets;
static pthread_mutex_t kv_locks[KV_STRIPES];
static atomic_ulong kv_count_keys;

/* murmur3's 64-bit finaliser */
static KV_PATCHABLE uint64_t kv_local_mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static uint64_t kv_hash(const char *k, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)k[i];
        h *= 0x100000001b3ull;
    }
    return kv_local_mix(h);
}

int kv_store_init(void)
{
    kv_buckets = calloc(KV_BUCKETS, sizeof *kv_buckets);
    if (!kv_buckets)
        return -1;
    for (unsigned i = 0; i < KV_STRIPES; i++)
        pthread_mutex_init(&kv_locks[i], NULL);
    return 0;
}

void kv_store_free(void)
{
    if (!kv_buckets)
        return;
    for (unsigned b = 0; b < KV_BUCKETS; b++) {
        struct kv_entry *e = kv_buckets[b];
        while (e) {
            struct kv_entry *next = e->next;
            free(e);
            e = next;
        }
    }
    free(kv_buckets);
    kv_buckets = NULL;
    for (unsigned i = 0; i < KV_STRIPES; i++)
        pthread_mutex_destroy(&kv_locks[i]);
}

static struct kv_entry **kv_find(uint64_t h, const char *k, size_t kn)
{
    struct kv_entry **pp = &kv_buckets[h % KV_BUCKETS];
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->hash == h && (*pp)->klen == kn && memcmp((*pp)->data, k, kn) == 0)
            return pp;
    return pp;
}

static pthread_mutex_t *kv_lock_for(uint64_t h) { return &kv_locks[(h % KV_BUCKETS) % KV_STRIPES]; }

/* Replaces or inserts under the stripe lock held by the caller. */
static int kv_put_locked(uint64_t h, const char *k, size_t kn, const char *v, size_t vn)
{
    struct kv_entry *ne = malloc(sizeof *ne + kn + vn);
    if (!ne)
        return -1;
    ne->hash = h;
    ne->klen = kn;
    ne->vlen = vn;
    memcpy(ne->data, k, kn);
    memcpy(ne->data + kn, v, vn);
    struct kv_entry **pp = kv_find(h, k, kn);
    if (*pp) {
        ne->next = (*pp)->next;
        free(*pp);
    } else {
        ne->next = NULL;
        atomic_fetch_add(&kv_count_keys, 1);
    }
    *pp = ne;
    return 0;
}

int kv_store_set(const char *k, size_t kn, const char *v, size_t vn)
{
    uint64_t h = kv_hash(k, kn);
    pthread_mutex_t *m = kv_lock_for(h);
    pthread_mutex_lock(m);
    int rc = kv_put_locked(h, k, kn, v, vn);
    pthread_mutex_unlock(m);
    return rc;
}

long kv_store_get(const char *k, size_t kn, char *out, size_t cap)
{
    uint64_t h = kv_hash(k, kn);
    pthread_mutex_t *m = kv_lock_for(h);
    long rc = -1;
    pthread_mutex_lock(m);
    struct kv_entry *e = *kv_find(h, k, kn);
    if (e) {
        size_t n = e->vlen < cap ? e->vlen : cap;
        memcpy(out, e->data + e->klen, n);
        rc = (long)n;
    }
    pthread_mutex_unlock(m);
    return rc;
}

int kv_store_del(const char *k, size_t kn)
{
    uint64_t h = kv_hash(k, kn);
    pthread_mutex_t *m = kv_lock_for(h);
    int rc = 0;
    pthread_mutex_lock(m);
    struct kv_entry **pp = kv_find(h, k, kn);
    if (*pp) {
        struct kv_entry *e = *pp;
        *pp = e->next;
        free(e);
        atomic_fetch_sub(&kv_count_keys, 1);
        rc = 1;
    }
    pthread_mutex_unlock(m);
    return rc;
}

int kv_parse_stored_long(const char *s, size_t n, long *out)
{
    size_t i = 0;
    int neg = 0;
    if (n > 0 && s[0] == '-') {
        neg = 1;
        i = 1;
    }
    if (i == n || n > 20)
        return -1;
    unsigned long v = 0;
    unsigned long limit = neg ? (unsigned long)LONG_MAX + 1ul : (unsigned long)LONG_MAX;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (limit - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    if (neg)
        *out = v == 0 ? 0 : -(long)(v - 1) - 1;
    else
        *out = (long)v;
    return 0;
}

enum kv_incr_result kv_store_incr(const char *k, size_t kn, long delta, long *result)
{
    uint64_t h = kv_hash(k, kn);
    pthread_mutex_t *m = kv_lock_for(h);
    enum kv_incr_result rc = KV_INCR_OK;
    long cur = 0;
    pthread_mutex_lock(m);
    struct kv_entry *e = *kv_find(h, k, kn);
    if (e && kv_parse_stored_long(e->data + e->klen, e->vlen, &cur) != 0) {
        rc = KV_INCR_NOT_INTEGER;
    } else if (__builtin_add_overflow(cur, delta, result)) {
        rc = KV_INCR_OVERFLOW;
    } else {
        char num[32];
        size_t len = 0;
        unsigned long mag = *result < 0 ? 0ul - (unsigned long)*result : (unsigned long)*result;
        char rev[24];
        size_t rn = 0;
        do {
            rev[rn++] = (char)('0' + mag % 10);
            mag /= 10;
        } while (mag);
        if (*result < 0)
            num[len++] = '-';
        while (rn)
            num[len++] = rev[--rn];
        if (kv_put_locked(h, k, kn, num, len) != 0)
            rc = KV_INCR_NOMEM;
    }
    pthread_mutex_unlock(m);
    return rc;
}

unsigned long kv_store_count(void) { return atomic_load(&kv_count_keys); }
