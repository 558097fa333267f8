/*
 * wrong-target — fix-incr built for the OTHER build of the server.
 *
 * build.rs compiles this file for variant V with the symbol values of the other variant
 * (the build-id and checksums of kvserver-fp for a kvserver-nofp process, and the reverse),
 * so applying wrong-target-<V>.so to a kvserver-<V> process must be refused: the build-id in
 * the manifest is not the running executable's. Same source, same function names, different
 * binary: exactly the mistake a build-id pin exists to catch.
 */
#define FIX_INCR_NAME "wrong-target"
#include "fix-incr.c"
