/* The universe-word TLS slot of kgpatch.
 *
 * Stable Rust cannot choose a TLS model, so the slot is defined here with the
 * initial-exec model: it lives in the static TLS block, at the same offset from
 * the thread pointer (%fs base) in every thread, which the redirect stub reads as
 * `mov r11, fs:[offset]`. The struct mirrors kgpatch_universe::ThreadState
 * (repr(C), the universe word first, 24 bytes). */
#include <stdint.h>

struct kgpatch_thread_state {
    uint64_t word;
    uint64_t attempts;
    uint64_t blocker;
};

__thread struct kgpatch_thread_state kgpatch_tls
    __attribute__((tls_model("initial-exec"), aligned(8)));

/* This thread's slot. */
struct kgpatch_thread_state *kgpatch_tls_current(void) {
    return &kgpatch_tls;
}

/* Offset of the slot from the thread pointer, in this thread. */
long kgpatch_tls_offset(void) {
    return (long)((char *)&kgpatch_tls - (char *)__builtin_thread_pointer());
}
