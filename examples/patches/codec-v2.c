/*
 * codec-v2 — changes the demo server's wire format, the right way.
 *
 * kv_encode and kv_decode must change together: every request goes through their common
 * caller kv_transcode, which encodes, (optionally) sleeps, decodes and checks the round trip.
 * kgpatch moves a thread to the new code only when none of the *replaced* functions has a
 * frame on its stack. So this module replaces kv_transcode too: a thread inside the old
 * kv_transcode cannot switch until it returns, and the new kv_transcode calls this module's
 * own encode/decode directly, so both halves of a round trip are always of one version.
 * (codec-pair-only.c leaves kv_transcode out and trips the server's invariant.)
 */
#include <stdint.h>
#include <string.h>

#include "kgpatch.h"
#include "kvserver_syms.h"
#include "codec-v2.h"

KGPATCH_MODULE("codec-v2", "1", "wire format v2 (tag 2): kv_encode, kv_decode and their caller kv_transcode");
KGPATCH_TARGET_EXE_BUILD_ID(KVSYM_BUILD_ID);

/* The target's globals kv_transcode uses; the executable exports nothing dynamically, so
 * they are reached through slots the loader fills from .symtab. */
KGPATCH_REF_VAR(pause_us, "kv_transcode_pause_us", unsigned *);
KGPATCH_REF_FN(sleep_ns, "kv_sleep_ns", void (*)(uint64_t));

/* The old kv_transcode's body, with the v2 codec called directly (not through the sites). */
int kv2_transcode(const char *in, size_t n)
{
    char enc[KV_MAX_LINE + 1 + 16];
    char dec[KV_MAX_LINE + 16];
    if (n > KV_MAX_LINE)
        return -1;
    size_t en = kv2_encode_body(in, n, enc);
    unsigned pause = *KGPATCH_SLOT(pause_us);
    if (pause)
        KGPATCH_SLOT(sleep_ns)((uint64_t)pause * 1000u);
    size_t dn = kv2_decode_body(enc, en, dec);
    if (dn != n || memcmp(dec, in, n) != 0)
        return -1;
    return 0;
}

KGPATCH_REPLACE("kv_encode", kv2_encode, KVSYM_SIZE(kv_encode), KVSYM_FNV(kv_encode));
KGPATCH_REPLACE("kv_decode", kv2_decode, KVSYM_SIZE(kv_decode), KVSYM_FNV(kv_decode));
KGPATCH_REPLACE("kv_transcode", kv2_transcode, KVSYM_SIZE(kv_transcode), KVSYM_FNV(kv_transcode));
