/* kv-miss-fix: the worked example of docs/PATCH-AUTHORING.md.
 *
 *   gcc -O2 -g -o kvd store.c main.c
 *   cargo run -p kgpatch-kmod --example kmod-tool -- describe kvd kv_get
 *   gcc -O2 -Wall -shared -fPIC -I ../../include fix.c -o kv-miss-fix.so
 *   cargo run -p kgpatch-kmod --example kmod-tool -- check kv-miss-fix.so kvd
 *
 * The numbers below are what gcc 12.2 (Debian 12) produced; yours come from `describe`
 * (the kmod tests pass them with -D). */
#include <string.h>
#include "kgpatch.h"

#ifndef KV_GET_SIZE
#define KV_GET_SIZE 135
#define KV_GET_SUM 0xd92bbc83913c3d8fULL
#define KVD_BUILD_ID "42e0415ab42b80206b7a62d250d6bb660e5abb4c"
#endif

KGPATCH_MODULE("kv-miss-fix", "1", "kv_get returns \"\" on a miss instead of NULL");
KGPATCH_TARGET_EXE_BUILD_ID(KVD_BUILD_ID);

struct entry { /* the target's layout: a patch cannot change it */
    char key[32];
    char value[32];
};

/* The target's statics, reached through slots the loader fills. */
KGPATCH_REF_LOCAL(table, "table", "store.c", struct entry (*)[64]);
KGPATCH_REF_LOCAL(misses, "misses", "store.c", long *);

/* hash() was inlined into every caller, so it has no symbol: carry a copy. */
static unsigned hash(const char *key)
{
    unsigned h = 5381;
    while (*key)
        h = h * 33 + (unsigned char)*key++;
    return h % 64;
}

const char *kv_get_fixed(const char *key)
{
    struct entry *e = &(*KGPATCH_SLOT(table))[hash(key)];
    if (strcmp(e->key, key) != 0) {
        ++*KGPATCH_SLOT(misses);
        return "";
    }
    return e->value;
}
KGPATCH_REPLACE("kv_get", kv_get_fixed, KV_GET_SIZE, KV_GET_SUM);
