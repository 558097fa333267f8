/*
 * slow-path — replaces kv_slow_path, the function SLOW <ms> parks a worker in.
 *
 * The new body sleeps the same way and also counts its calls (a module-owned counter, read by
 * nobody but a debugger: a patch cannot add a field to the target's STATS). Its purpose is
 * the parked-thread test: a worker sleeping inside the OLD kv_slow_path cannot migrate until
 * the call returns, `kgpatch status` names it, the deadline reverses the transition, and
 * `kgpatch force` completes it.
 */
#include <stdatomic.h>
#include <stdint.h>

#include "kgpatch.h"
#include "kvserver_syms.h"

KGPATCH_MODULE("slow-path", "1", "kv_slow_path, counted");
KGPATCH_TARGET_EXE_BUILD_ID(KVSYM_BUILD_ID);

KGPATCH_REF_FN(now_ns, "kv_now_ns", uint64_t (*)(void));
KGPATCH_REF_FN(sleep_ns, "kv_sleep_ns", void (*)(uint64_t));
KGPATCH_REF_VAR(stopping, "kv_stopping", atomic_int *);

atomic_ulong kv_slow_path_v2_calls;

unsigned kv_slow_path_v2(unsigned ms)
{
    atomic_fetch_add(&kv_slow_path_v2_calls, 1);
    uint64_t start = KGPATCH_SLOT(now_ns)();
    uint64_t end = start + (uint64_t)ms * 1000000u;
    for (;;) {
        uint64_t now = KGPATCH_SLOT(now_ns)();
        if (now >= end || atomic_load(KGPATCH_SLOT(stopping)))
            return (unsigned)((now - start) / 1000000u);
        uint64_t left = end - now;
        KGPATCH_SLOT(sleep_ns)(left < 10000000u ? left : 10000000u);
    }
}

KGPATCH_REPLACE("kv_slow_path", kv_slow_path_v2, KVSYM_SIZE(kv_slow_path), KVSYM_FNV(kv_slow_path));
