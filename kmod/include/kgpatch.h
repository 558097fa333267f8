/*
 * kgpatch.h — write a kgpatch patch module in C.
 *
 * Build:   gcc -O2 -shared -fPIC -I<kgpatch>/kmod/include fix.c -o fix.so
 * Inspect: kgpatch inspect fix.so
 *
 * Each macro emits one record of the manifest (format version 1) into the writable ELF
 * section ".kgpatch". The manifest holds no pointers: strings are inline, new functions and
 * callbacks are named by their exported symbol, and a reference slot is a word inside its
 * own record that the loader fills with the runtime address of a target symbol. The layout
 * is kgpatch_kmod::raw (kmod/src/raw.rs); keep the two in step.
 *
 *   #include "kgpatch.h"
 *   KGPATCH_MODULE("fix-overflow", "1", "clamp the counter");
 *   KGPATCH_TARGET_LIB("libfoo.so.1");                  // or KGPATCH_TARGET_EXE();
 *   KGPATCH_REF_LOCAL(limit, "limit", "counter.c", int *); // static int limit; in counter.c
 *   KGPATCH_REF(log_value, "log_value", void (*)(int));
 *
 *   int fixed_bump(int x) {                             // non-static: exported
 *       KGPATCH_SLOT(log_value)(x);
 *       return x < *KGPATCH_SLOT(limit) ? x : *KGPATCH_SLOT(limit);
 *   }
 *   KGPATCH_REPLACE_LOCAL("bump", "counter.c", fixed_bump, 23, 0x1234567890abcdefULL);
 *
 * Size and checksum of the old function: kgpatch_kmod::describe_symbol(target, name, file),
 * FNV-1a-64 of its bytes in the target's file. 0 means "not checked"; the loader refuses
 * unchecked entries unless told to allow them.
 *
 * Rules: new functions and callbacks must be non-static with default visibility; give them
 * names the target does not export. Do not use slots from constructors: they are filled
 * after dlopen, before any new function becomes reachable.
 */
#ifndef KGPATCH_H
#define KGPATCH_H

#include <stddef.h>
#include <stdint.h>

#define KGPATCH_MAGIC 0x5250474bu /* "KGPR" little-endian */
#define KGPATCH_FORMAT_VERSION 1

#define KGPATCH_KIND_MODULE 1
#define KGPATCH_KIND_TARGET 2
#define KGPATCH_KIND_REPLACE 3
#define KGPATCH_KIND_REF 4
#define KGPATCH_KIND_CALLBACK 5

#define KGPATCH_TARGET_KIND_EXE 1
#define KGPATCH_TARGET_KIND_LIB 2

/* "no index": the only candidate of that name (and file) */
#define KGPATCH_ANY 0xffffffffu

#define KGPATCH_REF_KIND_ANY 0
#define KGPATCH_REF_KIND_FUNC 1
#define KGPATCH_REF_KIND_OBJECT 2

#define KGPATCH_CB_PRE_APPLY 1
#define KGPATCH_CB_POST_APPLY 2
#define KGPATCH_CB_PRE_REVERT 3
#define KGPATCH_CB_POST_REVERT 4

struct kgpatch_record_header {
    uint32_t magic;
    uint16_t version;
    uint16_t kind;
    uint32_t size; /* whole record, multiple of 8 */
    uint32_t reserved;
};

#define KGPATCH__CAT2(a, b) a##b
#define KGPATCH__CAT(a, b) KGPATCH__CAT2(a, b)
#define KGPATCH__UNIQUE(prefix) KGPATCH__CAT(prefix, __COUNTER__)
#define KGPATCH__HEADER(var, kind) \
    { KGPATCH_MAGIC, KGPATCH_FORMAT_VERSION, (kind), (uint32_t)sizeof(var), 0 }
/* retain: keep the records under -Wl,--gc-sections (nothing references them) */
#if defined(__has_attribute)
#if __has_attribute(retain)
#define KGPATCH__RETAIN retain,
#endif
#endif
#ifndef KGPATCH__RETAIN
#define KGPATCH__RETAIN
#endif
/* aligned(8) on the variable too: GCC would otherwise align large ones to 32 */
#define KGPATCH__PLACE __attribute__((used, KGPATCH__RETAIN aligned(8), section(".kgpatch")))

/* A record with no fixed part. `strs` is a concatenation like "a" "\0" "b". */
#define KGPATCH__RECORD0(var, kind, strs)                                           \
    static struct __attribute__((aligned(8))) {                                     \
        struct kgpatch_record_header h;                                             \
        char s[sizeof(strs)];                                                       \
    } var KGPATCH__PLACE = { KGPATCH__HEADER(var, kind), strs }

/* ---- the patch ---------------------------------------------------------------------- */

/* Once per module: name (non-empty), version, one-line description. */
#define KGPATCH_MODULE(name, version, description)                                  \
    KGPATCH__RECORD0(KGPATCH__UNIQUE(kgpatch__module_), KGPATCH_KIND_MODULE,        \
                     name "\0" version "\0" description)

#define KGPATCH__TARGET(var, kind, soname, build_id)                                \
    static struct __attribute__((aligned(8))) {                                     \
        struct kgpatch_record_header h;                                             \
        uint32_t target_kind, reserved;                                             \
        char s[sizeof(soname "\0" build_id)];                                       \
    } var KGPATCH__PLACE = { KGPATCH__HEADER(var, KGPATCH_KIND_TARGET), (kind), 0,  \
                             soname "\0" build_id }

/* Once per module: the target. The build-id (hex, from `readelf -n`) is optional. */
#define KGPATCH_TARGET_EXE()                                                        \
    KGPATCH__TARGET(KGPATCH__UNIQUE(kgpatch__target_), KGPATCH_TARGET_KIND_EXE, "", "")
#define KGPATCH_TARGET_EXE_BUILD_ID(build_id)                                       \
    KGPATCH__TARGET(KGPATCH__UNIQUE(kgpatch__target_), KGPATCH_TARGET_KIND_EXE, "",  \
                    build_id)
#define KGPATCH_TARGET_LIB(soname)                                                  \
    KGPATCH__TARGET(KGPATCH__UNIQUE(kgpatch__target_), KGPATCH_TARGET_KIND_LIB,     \
                    soname, "")
#define KGPATCH_TARGET_LIB_BUILD_ID(soname, build_id)                               \
    KGPATCH__TARGET(KGPATCH__UNIQUE(kgpatch__target_), KGPATCH_TARGET_KIND_LIB,     \
                    soname, build_id)

/* ---- replaced functions --------------------------------------------------------------- */

#define KGPATCH__REPLACE(var, old, file, index, new_fn, size, checksum)             \
    typedef char KGPATCH__CAT(var, _new_fn_must_be_declared)[sizeof(&new_fn) ? 1 : -1]; \
    static struct __attribute__((aligned(8))) {                                     \
        struct kgpatch_record_header h;                                             \
        uint64_t expected_size, checksum_;                                          \
        uint32_t index_, flags;                                                     \
        char s[sizeof(old "\0" file "\0" #new_fn)];                                 \
    } var KGPATCH__PLACE = { KGPATCH__HEADER(var, KGPATCH_KIND_REPLACE),            \
                             (size), (checksum), (index), 0, old "\0" file "\0" #new_fn }

/* Replace the function named `old` (a string, as in the symbol table) by `new_fn`. */
#define KGPATCH_REPLACE(old, new_fn, size, checksum)                                \
    KGPATCH__REPLACE(KGPATCH__UNIQUE(kgpatch__replace_), old, "", KGPATCH_ANY,      \
                     new_fn, size, checksum)
/* ... a static function of `file` (its STT_FILE symbol, e.g. "a.c"). */
#define KGPATCH_REPLACE_LOCAL(old, file, new_fn, size, checksum)                    \
    KGPATCH__REPLACE(KGPATCH__UNIQUE(kgpatch__replace_), old, file, KGPATCH_ANY,    \
                     new_fn, size, checksum)
/* ... the `index`-th (0-based, symbol-table order) of the same-named candidates in `file`
 * ("" = any file). */
#define KGPATCH_REPLACE_NTH(old, file, index, new_fn, size, checksum)               \
    KGPATCH__REPLACE(KGPATCH__UNIQUE(kgpatch__replace_), old, file, index, new_fn,  \
                     size, checksum)

/* ---- references to the target's symbols ------------------------------------------------- */

/* Declares slot `name` of pointer type `...` (e.g. `int *` or `int (*)(int, int)`), filled
 * with the runtime address of `sym` in the target. Read it with KGPATCH_SLOT(name). */
#define KGPATCH_REF_EX(name, sym, file, index, kind, ...)                           \
    static struct __attribute__((aligned(8))) {                                     \
        struct kgpatch_record_header h;                                             \
        __typeof__(__VA_ARGS__) volatile slot;                                      \
        uint32_t index_, ref_kind;                                                  \
        char s[sizeof(sym "\0" file)];                                              \
    } kgpatch__ref_##name KGPATCH__PLACE = {                                        \
        KGPATCH__HEADER(kgpatch__ref_##name, KGPATCH_KIND_REF), 0, (index), (kind),   \
        sym "\0" file };                                                            \
    typedef char kgpatch__ref_##name##_must_be_pointer_sized                        \
        [sizeof(__typeof__(__VA_ARGS__)) == sizeof(uint64_t) ? 1 : -1]

#define KGPATCH_REF(name, sym, ...)                                                 \
    KGPATCH_REF_EX(name, sym, "", KGPATCH_ANY, KGPATCH_REF_KIND_ANY, __VA_ARGS__)
#define KGPATCH_REF_LOCAL(name, sym, file, ...)                                     \
    KGPATCH_REF_EX(name, sym, file, KGPATCH_ANY, KGPATCH_REF_KIND_ANY, __VA_ARGS__)
#define KGPATCH_REF_FN(name, sym, ...)                                              \
    KGPATCH_REF_EX(name, sym, "", KGPATCH_ANY, KGPATCH_REF_KIND_FUNC, __VA_ARGS__)
#define KGPATCH_REF_VAR(name, sym, ...)                                             \
    KGPATCH_REF_EX(name, sym, "", KGPATCH_ANY, KGPATCH_REF_KIND_OBJECT, __VA_ARGS__)

/* The value of slot `name` (a volatile read). */
#define KGPATCH_SLOT(name) (kgpatch__ref_##name.slot)

/* ---- callbacks ---------------------------------------------------------------------------- */

#define KGPATCH__CALLBACK(var, which, fn)                                           \
    typedef char KGPATCH__CAT(var, _callback_must_be_declared)[sizeof(&fn) ? 1 : -1]; \
    static struct __attribute__((aligned(8))) {                                     \
        struct kgpatch_record_header h;                                             \
        uint32_t which_, reserved;                                                  \
        char s[sizeof(#fn)];                                                        \
    } var KGPATCH__PLACE = { KGPATCH__HEADER(var, KGPATCH_KIND_CALLBACK), (which), 0, #fn }

/* int fn(char *msg, size_t cap): 0 to proceed, nonzero to veto with a reason in msg. */
#define KGPATCH_PRE_APPLY(fn)                                                       \
    KGPATCH__CALLBACK(KGPATCH__UNIQUE(kgpatch__cb_), KGPATCH_CB_PRE_APPLY, fn)
/* void fn(void) */
#define KGPATCH_POST_APPLY(fn)                                                      \
    KGPATCH__CALLBACK(KGPATCH__UNIQUE(kgpatch__cb_), KGPATCH_CB_POST_APPLY, fn)
#define KGPATCH_PRE_REVERT(fn)                                                      \
    KGPATCH__CALLBACK(KGPATCH__UNIQUE(kgpatch__cb_), KGPATCH_CB_PRE_REVERT, fn)
#define KGPATCH_POST_REVERT(fn)                                                     \
    KGPATCH__CALLBACK(KGPATCH__UNIQUE(kgpatch__cb_), KGPATCH_CB_POST_REVERT, fn)

/* ---- shadow variables ------------------------------------------------------------------ */

/* New data attached to objects of the target by (object address, id), kept by the agent so
 * a later patch sees what an earlier one attached (docs/authoring-shadow.md). The loader
 * writes the agent's table into `kgpatch__runtime` when it fills the slots; before that (and
 * in constructors) every call returns NULL / does nothing.
 *
 *   int init(void *obj, void *data, void *arg) { ((struct extra *)data)->x = 1; return 0; }
 *   struct extra *e = kgpatch_shadow_get_or_alloc(obj, 7, sizeof *e, init, NULL);
 *
 * get is lock-free; the others take the agent's writer lock, and ctor / dtor run under it
 * (they must not call the shadow API). alloc returns NULL if the shadow exists, the table is
 * full, size > 1 MiB, or ctor returned nonzero. Data is zeroed and 16-aligned. free/free_all
 * are your promise that no thread still uses that data. */
typedef int (*kgpatch_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*kgpatch_shadow_dtor_t)(void *obj, void *shadow_data);

/* Layout: kgpatch_agent::shadow::Runtime; keep the two in step. Members are only added. */
struct kgpatch_runtime {
    uint32_t version;
    uint32_t size;
    void *(*shadow_get)(void *obj, uint64_t id);
    void *(*shadow_alloc)(void *obj, uint64_t id, size_t size, kgpatch_shadow_ctor_t ctor,
                          void *ctor_data);
    void *(*shadow_get_or_alloc)(void *obj, uint64_t id, size_t size,
                                 kgpatch_shadow_ctor_t ctor, void *ctor_data);
    void (*shadow_free)(void *obj, uint64_t id, kgpatch_shadow_dtor_t dtor);
    void (*shadow_free_all)(uint64_t id, kgpatch_shadow_dtor_t dtor);
    size_t (*shadow_count)(void);
};
typedef char kgpatch__runtime_layout_is_56_bytes[sizeof(struct kgpatch_runtime) == 56 ? 1 : -1];

/* Filled by the loader (kgpatch_kmod::RUNTIME_SYMBOL); weak so every file may include this. */
__attribute__((weak, visibility("default"))) const struct kgpatch_runtime
    *volatile kgpatch__runtime;

static inline const struct kgpatch_runtime *kgpatch_runtime(void) {
    return __atomic_load_n(&kgpatch__runtime, __ATOMIC_ACQUIRE);
}
static inline void *kgpatch_shadow_get(void *obj, uint64_t id) {
    const struct kgpatch_runtime *rt = kgpatch_runtime();
    return rt ? rt->shadow_get(obj, id) : NULL;
}
static inline void *kgpatch_shadow_alloc(void *obj, uint64_t id, size_t size,
                                         kgpatch_shadow_ctor_t ctor, void *ctor_data) {
    const struct kgpatch_runtime *rt = kgpatch_runtime();
    return rt ? rt->shadow_alloc(obj, id, size, ctor, ctor_data) : NULL;
}
static inline void *kgpatch_shadow_get_or_alloc(void *obj, uint64_t id, size_t size,
                                                kgpatch_shadow_ctor_t ctor, void *ctor_data) {
    const struct kgpatch_runtime *rt = kgpatch_runtime();
    return rt ? rt->shadow_get_or_alloc(obj, id, size, ctor, ctor_data) : NULL;
}
static inline void kgpatch_shadow_free(void *obj, uint64_t id, kgpatch_shadow_dtor_t dtor) {
    const struct kgpatch_runtime *rt = kgpatch_runtime();
    if (rt)
        rt->shadow_free(obj, id, dtor);
}
static inline void kgpatch_shadow_free_all(uint64_t id, kgpatch_shadow_dtor_t dtor) {
    const struct kgpatch_runtime *rt = kgpatch_runtime();
    if (rt)
        rt->shadow_free_all(id, dtor);
}
static inline size_t kgpatch_shadow_count(void) {
    const struct kgpatch_runtime *rt = kgpatch_runtime();
    return rt ? rt->shadow_count() : 0;
}

#endif /* KGPATCH_H */
