/*
 * codec-v2.h — the second wire format of the demo server's codec, shared by codec-v2.c (the
 * correct patch) and codec-pair-only.c (the one that breaks the consistency rule).
 *
 * Encoded form: tag 2, then each byte b[i] as rol8(b[i] ^ (0xa5 + 3*i), 5). The original is
 * tag 1, key 0x5a + i, rotation 3: a buffer encoded by one format never decodes under the
 * other (the tag check fails), which is how mixing shows up as a violation.
 */
#ifndef KV_CODEC_V2_H
#define KV_CODEC_V2_H

#include <stddef.h>

#include "kvserver.h" /* KV_MAX_LINE, KV_DECODE_ERROR, the signatures */

#define KV2_TAG 2
#define KV2_KEY 0xa5
#define KV2_ROT 5

static inline unsigned char kv2_rol8(unsigned char b, unsigned r) { return (unsigned char)((b << r) | (b >> (8 - r))); }
static inline unsigned char kv2_ror8(unsigned char b, unsigned r) { return (unsigned char)((b >> r) | (b << (8 - r))); }

static size_t kv2_encode_body(const char *in, size_t n, char *out)
{
    const unsigned char *src = (const unsigned char *)in;
    unsigned char *dst = (unsigned char *)out;
    dst[0] = KV2_TAG;
    for (size_t i = 0; i < n; i++)
        dst[i + 1] = kv2_rol8((unsigned char)(src[i] ^ (unsigned char)(KV2_KEY + 3 * i)), KV2_ROT);
    return n + 1;
}

static size_t kv2_decode_body(const char *in, size_t n, char *out)
{
    const unsigned char *src = (const unsigned char *)in;
    unsigned char *dst = (unsigned char *)out;
    if (n < 1 || src[0] != KV2_TAG)
        return KV_DECODE_ERROR;
    for (size_t i = 0; i + 1 < n; i++)
        dst[i] = (unsigned char)(kv2_ror8(src[i + 1], KV2_ROT) ^ (unsigned char)(KV2_KEY + 3 * i));
    return n - 1;
}

/* The replacements of kv_encode / kv_decode (exported: the loader finds them in .dynsym). */
size_t kv2_encode(const char *in, size_t n, char *out) { return kv2_encode_body(in, n, out); }
size_t kv2_decode(const char *in, size_t n, char *out) { return kv2_decode_body(in, n, out); }

#endif
