/*
 * proto.c — request dispatch, the commands, the codec pair and the planted bug.
 *
 * Patch targets in this file (see ../README.md):
 *   kv_parse_amount  static; the planted bug (INCR ignores the sign of its amount)
 *   kv_encode, kv_decode, kv_transcode   the two-function invariant and its common caller
 *   kv_slow_path     a function a test can park a thread in (SLOW <ms>)
 */
#define _GNU_SOURCE
#include "kvserver.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- output buffer ------------------------------------------------------------------------ */

static int kv_out_reserve(struct kv_out *o, size_t extra)
{
    if (o->oom)
        return -1;
    if (o->len + extra <= o->cap)
        return 0;
    size_t cap = o->cap ? o->cap : 256;
    while (cap < o->len + extra)
        cap *= 2;
    char *nb = realloc(o->buf, cap);
    if (!nb) {
        o->oom = 1;
        return -1;
    }
    o->buf = nb;
    o->cap = cap;
    return 0;
}

void kv_out_append(struct kv_out *o, const char *s, size_t n)
{
    if (kv_out_reserve(o, n) == 0) {
        memcpy(o->buf + o->len, s, n);
        o->len += n;
    }
}

void kv_out_printf(struct kv_out *o, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof tmp)
        n = sizeof tmp - 1;
    kv_out_append(o, tmp, (size_t)n);
}

/* ---- the codec pair ------------------------------------------------------------------------ */

static inline unsigned char rol8(unsigned char b, unsigned r) { return (unsigned char)((b << r) | (b >> (8 - r))); }
static inline unsigned char ror8(unsigned char b, unsigned r) { return (unsigned char)((b >> r) | (b << (8 - r))); }

/* Encodes n bytes into out (n + KV_CODEC_OVERHEAD bytes); returns the encoded length. */
KV_PATCHABLE size_t kv_encode(const char *in, size_t n, char *out)
{
    const unsigned char *src = (const unsigned char *)in;
    unsigned char *dst = (unsigned char *)out;
    dst[0] = KV_CODEC_TAG;
    for (size_t i = 0; i < n; i++)
        dst[i + 1] = rol8((unsigned char)(src[i] ^ (unsigned char)(KV_CODEC_KEY + i)), KV_CODEC_ROT);
    return n + KV_CODEC_OVERHEAD;
}

/* Decodes what kv_encode produced; KV_DECODE_ERROR when the tag is not ours. */
KV_PATCHABLE size_t kv_decode(const char *in, size_t n, char *out)
{
    const unsigned char *src = (const unsigned char *)in;
    unsigned char *dst = (unsigned char *)out;
    if (n < KV_CODEC_OVERHEAD || src[0] != KV_CODEC_TAG)
        return KV_DECODE_ERROR;
    for (size_t i = 0; i + 1 < n; i++)
        dst[i] = (unsigned char)(ror8(src[i + 1], KV_CODEC_ROT) ^ (unsigned char)(KV_CODEC_KEY + i));
    return n - KV_CODEC_OVERHEAD;
}

/*
 * The common caller: every request line is encoded to its wire form and decoded back, and
 * the round trip must give the original bytes. A thread may change universe between the
 * two calls unless this function is replaced by the same patch as the pair.
 */
KV_PATCHABLE int kv_transcode(const char *in, size_t n)
{
    char enc[KV_MAX_LINE + KV_CODEC_OVERHEAD + 16];
    char dec[KV_MAX_LINE + 16];
    if (n > KV_MAX_LINE)
        return -1;
    size_t en = kv_encode(in, n, enc);
    if (kv_transcode_pause_us)
        kv_sleep_ns((uint64_t)kv_transcode_pause_us * 1000u);
    size_t dn = kv_decode(enc, en, dec);
    if (dn != n || memcmp(dec, in, n) != 0)
        return -1;
    return 0;
}

/* ---- the planted bug ----------------------------------------------------------------------- */

/*
 * Parses INCR's amount: optional sign, decimal digits, range of long. Returns 0 or -1.
 * BUG: the sign selects the overflow limit but is never applied, so "INCR k -5" adds 5.
 */
static KV_PATCHABLE int kv_parse_amount(const char *s, size_t n, long *out)
{
    size_t i = 0;
    int neg = 0;
    if (i < n && (s[i] == '-' || s[i] == '+')) {
        neg = s[i] == '-';
        i++;
    }
    if (i == n)
        return -1;
    unsigned long limit = neg ? (unsigned long)LONG_MAX + 1ul : (unsigned long)LONG_MAX;
    unsigned long v = 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (limit - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    if (v > (unsigned long)LONG_MAX)
        return -1;   /* "-9223372036854775808" would need the sign */
    *out = (long)v;
    return 0;
}

/* ---- parked thread ------------------------------------------------------------------------- */

KV_PATCHABLE unsigned kv_slow_path(unsigned ms)
{
    uint64_t start = kv_now_ns();
    uint64_t end = start + (uint64_t)ms * 1000000u;
    for (;;) {
        uint64_t now = kv_now_ns();
        if (now >= end || atomic_load(&kv_stopping))
            return (unsigned)((now - start) / 1000000u);
        uint64_t left = end - now;
        kv_sleep_ns(left < 10000000u ? left : 10000000u);   /* 10 ms steps: shutdown stays prompt */
    }
}

/* ---- commands ------------------------------------------------------------------------------ */

struct kv_args {
    const char *tok[3];
    size_t len[3];
    int count;
    const char *rest;   /* the remainder after the second token (SET's value) */
    size_t rest_len;
};

/* Splits "CMD a rest..." on single spaces: up to 3 tokens, and the remainder after token 2. */
static void kv_split(const char *line, size_t n, struct kv_args *a)
{
    size_t i = 0;
    a->count = 0;
    a->rest = NULL;
    a->rest_len = 0;
    while (a->count < 3 && i < n) {
        while (i < n && line[i] == ' ')
            i++;
        if (i == n)
            break;
        size_t start = i;
        if (a->count == 2) {
            a->rest = line + start;
            a->rest_len = n - start;
        }
        while (i < n && line[i] != ' ')
            i++;
        a->tok[a->count] = line + start;
        a->len[a->count] = i - start;
        a->count++;
    }
}

static int kv_tok_is(const struct kv_args *a, int idx, const char *word)
{
    size_t wl = strlen(word);
    if (a->len[idx] != wl)
        return 0;
    for (size_t i = 0; i < wl; i++) {
        char c = a->tok[idx][i];
        if (c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        if (c != word[i])
            return 0;
    }
    return 1;
}

static void kv_cmd_stats(struct kv_out *out)
{
    long probe = 0;
    int probe_ok = kv_parse_amount("-7", 2, &probe) == 0;
    char enc[8];
    kv_encode("x", 1, enc);
    kv_out_printf(out,
                  "STATS requests=%lu violations=%lu threads=%lu uptime_ms=%lu keys=%lu"
                  " connections=%lu open_connections=%lu compactions=%lu flushes=%lu ticks=%lu"
                  " signals=%lu churn_rounds=%lu dlopens=%lu ephemeral_threads=%lu"
                  " bug_probe=%ld codec=%u",
                  kv_read(&kv_stats.requests), kv_read(&kv_stats.violations),
                  kv_read(&kv_stats.threads), (unsigned long)kv_uptime_ms(), kv_store_count(),
                  kv_read(&kv_stats.connections), kv_read(&kv_stats.open_connections),
                  kv_read(&kv_stats.compactions), kv_read(&kv_stats.flushes),
                  kv_read(&kv_stats.ticks), kv_read(&kv_stats.signals),
                  kv_read(&kv_stats.churn_rounds), kv_read(&kv_stats.dlopens),
                  kv_read(&kv_stats.ephemeral_threads), probe_ok ? probe : 0L, (unsigned)(unsigned char)enc[0]);
    for (int i = 0; i < KV_EINTR_COUNT; i++)
        kv_out_printf(out, " eintr_%s=%lu", kv_eintr_names[i], kv_read(&kv_stats.eintr[i]));
    kv_out_append(out, "\n", 1);
}

static void kv_cmd_incr(const struct kv_args *a, struct kv_out *out)
{
    long delta, result;
    if (a->count != 3 || a->rest_len != a->len[2]) {
        kv_out_printf(out, "ERR usage: INCR <key> <amount>\n");
        return;
    }
    if (kv_parse_amount(a->tok[2], a->len[2], &delta) != 0) {
        kv_out_printf(out, "ERR amount is not an integer\n");
        return;
    }
    switch (kv_store_incr(a->tok[1], a->len[1], delta, &result)) {
    case KV_INCR_OK:
        kv_out_printf(out, "INT %ld\n", result);
        break;
    case KV_INCR_NOT_INTEGER:
        kv_out_printf(out, "ERR value is not an integer\n");
        break;
    case KV_INCR_OVERFLOW:
        kv_out_printf(out, "ERR overflow\n");
        break;
    case KV_INCR_NOMEM:
        kv_out_printf(out, "ERR out of memory\n");
        break;
    }
}

static int kv_parse_ms(const char *s, size_t n, unsigned *out)
{
    unsigned long v = 0;
    if (n == 0 || n > 7)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v > KV_SLOW_MAX_MS)
        return -1;
    *out = (unsigned)v;
    return 0;
}

enum kv_after kv_dispatch(char *line, size_t n, struct kv_out *out)
{
    struct kv_args a;
    kv_count(&kv_stats.requests);
    if (n > 0 && line[n - 1] == '\r')
        line[--n] = '\0';
    if (kv_transcode(line, n) != 0) {
        kv_count(&kv_stats.violations);
        kv_out_printf(out, "ERR invariant\n");
        return KV_AFTER_CONTINUE;
    }
    kv_split(line, n, &a);
    if (a.count == 0) {
        kv_out_printf(out, "ERR empty request\n");
    } else if (kv_tok_is(&a, 0, "PING") && a.count == 1) {
        kv_out_printf(out, "PONG\n");
    } else if (kv_tok_is(&a, 0, "SET")) {
        if (a.count != 3) {
            kv_out_printf(out, "ERR usage: SET <key> <value>\n");
        } else if (a.len[1] > KV_MAX_KEY || a.rest_len > KV_MAX_VALUE) {
            kv_out_printf(out, "ERR key or value too long\n");
        } else if (kv_store_set(a.tok[1], a.len[1], a.rest, a.rest_len) != 0) {
            kv_out_printf(out, "ERR out of memory\n");
        } else {
            kv_out_printf(out, "OK\n");
        }
    } else if (kv_tok_is(&a, 0, "GET")) {
        char val[KV_MAX_VALUE];
        long vn;
        if (a.count != 2) {
            kv_out_printf(out, "ERR usage: GET <key>\n");
        } else if ((vn = kv_store_get(a.tok[1], a.len[1], val, sizeof val)) < 0) {
            kv_out_printf(out, "NOT_FOUND\n");
        } else {
            kv_out_append(out, "VALUE ", 6);
            kv_out_append(out, val, (size_t)vn);
            kv_out_append(out, "\n", 1);
        }
    } else if (kv_tok_is(&a, 0, "DEL")) {
        if (a.count != 2)
            kv_out_printf(out, "ERR usage: DEL <key>\n");
        else
            kv_out_printf(out, kv_store_del(a.tok[1], a.len[1]) ? "DELETED\n" : "NOT_FOUND\n");
    } else if (kv_tok_is(&a, 0, "INCR")) {
        kv_cmd_incr(&a, out);
    } else if (kv_tok_is(&a, 0, "STATS") && a.count == 1) {
        kv_cmd_stats(out);
    } else if (kv_tok_is(&a, 0, "SLOW")) {
        unsigned ms;
        if (a.count != 2 || kv_parse_ms(a.tok[1], a.len[1], &ms) != 0)
            kv_out_printf(out, "ERR usage: SLOW <ms> (at most %u)\n", KV_SLOW_MAX_MS);
        else
            kv_out_printf(out, "SLEPT %u\n", kv_slow_path(ms));
    } else if (kv_tok_is(&a, 0, "CANCEL")) {
        unsigned ms;
        int cleaned = 0, rc;
        if (a.count != 2 || kv_parse_ms(a.tok[1], a.len[1], &ms) != 0 || ms == 0)
            kv_out_printf(out, "ERR usage: CANCEL <ms> (1 to %u)\n", KV_SLOW_MAX_MS);
        else if ((rc = kv_cancel_test(ms, &cleaned)) < 0)
            kv_out_printf(out, "ERR cannot start a thread\n");
        else
            kv_out_printf(out, "%s cleanup=%d\n", rc == 0 ? "CANCELLED" : "NOT_CANCELLED", cleaned);
    } else if (kv_tok_is(&a, 0, "QUIT") && a.count == 1) {
        kv_out_printf(out, "BYE\n");
        return KV_AFTER_CLOSE;
    } else if (kv_tok_is(&a, 0, "SHUTDOWN") && a.count == 1) {
        kv_out_printf(out, "BYE\n");
        return KV_AFTER_SHUTDOWN;
    } else {
        kv_out_printf(out, "ERR unknown command\n");
    }
    return KV_AFTER_CONTINUE;
}
