/*
 * codec-pair-only — the WRONG way to change the wire format, kept as a negative example.
 *
 * It replaces kv_encode and kv_decode but not their common caller kv_transcode. A thread in
 * the old kv_transcode, between the two calls (the server's --transcode-pause-us sleep is a
 * system call, where the migration signal lands), has neither replaced function on its stack,
 * so it may switch universe there: it encodes with the old format and decodes with the new
 * one, the tag check fails, and the server answers "ERR invariant" (STATS violations grows).
 * Tests use it to show why codec-v2.c replaces kv_transcode too. Never ship a patch like it.
 */
#include "kgpatch.h"
#include "kvserver_syms.h"
#include "codec-v2.h"

KGPATCH_MODULE("codec-pair-only", "1", "wire format v2 without the common caller (breaks the invariant)");
KGPATCH_TARGET_EXE_BUILD_ID(KVSYM_BUILD_ID);

KGPATCH_REPLACE("kv_encode", kv2_encode, KVSYM_SIZE(kv_encode), KVSYM_FNV(kv_encode));
KGPATCH_REPLACE("kv_decode", kv2_decode, KVSYM_SIZE(kv_decode), KVSYM_FNV(kv_decode));
