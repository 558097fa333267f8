/* The benchmark's patch: a new bench_leaf (the same function, a different constant). */
#include "kgpatch.h"

KGPATCH_MODULE("bench-leaf", "1", "benchmark patch");
KGPATCH_TARGET_EXE();

unsigned long bench_leaf_v2(unsigned long x) {
    x ^= x >> 13;
    x *= 0xbf58476d1ce4e5b9ULL;
    return x ^ (x >> 29);
}
KGPATCH_REPLACE("bench_leaf", bench_leaf_v2, BENCH_LEAF_SIZE, BENCH_LEAF_SUM);
