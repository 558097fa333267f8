/*
 * fix-incr — fixes the planted INCR bug of the demo server.
 *
 * The server's static kv_parse_amount (proto.c) picks the overflow limit from the sign of
 * INCR's amount but never applies the sign, so "INCR k -5" adds 5. This module replaces that
 * one static function (named with its file, since statics are only told apart that way).
 *
 * Built by examples/build.rs once per server variant:
 *   gcc -O2 -shared -fPIC -I kmod/include -I examples/server -I $OUT_DIR \
 *       [-DKV_TARGET_NOFP] fix-incr.c -o fix-incr-<variant>.so
 * kvserver_syms.h (generated) carries the size, checksum and build-id of the exact binary.
 */
#include <limits.h>
#include <stddef.h>

#include "kgpatch.h"
#include "kvserver_syms.h"

#ifndef FIX_INCR_NAME /* wrong-target.c reuses this file under another name */
#define FIX_INCR_NAME "fix-incr"
#endif

KGPATCH_MODULE(FIX_INCR_NAME, "1", "INCR applies the sign of its amount");
KGPATCH_TARGET_EXE_BUILD_ID(KVSYM_BUILD_ID);

/* Same contract as the old one: optional sign, decimal digits, the range of long; 0 or -1.
 * A pure function of its arguments: it needs nothing from the target. */
int kvfix_parse_amount(const char *s, size_t n, long *out)
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
    /* the fix: apply the sign (LONG_MIN's magnitude is LONG_MAX + 1, so negate unsigned) */
    *out = neg ? (long)(0ul - v) : (long)v;
    return 0;
}

KGPATCH_REPLACE_LOCAL("kv_parse_amount", "proto.c", kvfix_parse_amount,
                      KVSYM_SIZE(kv_parse_amount__proto_c), KVSYM_FNV(kv_parse_amount__proto_c));
