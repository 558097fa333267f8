/*
 * missing-library — a module whose target is a shared library the server never loads.
 *
 * The loader must refuse it before touching anything: no object of the process has the
 * soname libkvmissing.so.1.
 */
#include <stddef.h>

#include "kgpatch.h"

KGPATCH_MODULE("missing-library", "1", "targets a library the demo server does not load");
KGPATCH_TARGET_LIB("libkvmissing.so.1");

int kvmissing_frob_v2(int x) { return x + 1; }

/* Size and checksum of a function nobody has: any non-zero pair (0 would mean "unchecked"). */
KGPATCH_REPLACE("kvmissing_frob", kvmissing_frob_v2, 32, 0x0123456789abcdefULL);
