/* mariadb_time.c: patch modules for Debian's mariadbd (10.11), one per set of -D switches.
 * Both functions are reached on every query: THD::set_time() calls my_hrtime() for the
 * statement's start time (NOW(), binlog and slow-log timestamps), and the query timers
 * (my_interval_timer) run around each statement.
 *
 * NAME "..."          patch name
 * EQUIVALENT          my_hrtime and my_interval_timer replaced by bodies that compute
 *                     exactly what mysys/my_getsystime.c computes (no visible change)
 * SHIFT_SECONDS n     my_hrtime() n seconds ahead: NOW() moves, a client sees it
 * SZ_x, SUM_x         size and checksum of x (from `kgpatch describe /usr/sbin/mariadbd x`)
 */
#include <time.h>
#include "kgpatch.h"

#ifndef NAME
#define NAME "mariadb-time"
#endif

KGPATCH_MODULE(NAME, "1", "MariaDB per-query time functions");
KGPATCH_TARGET_EXE();

#ifndef SHIFT_SECONDS
#define SHIFT_SECONDS 0
#endif

/* my_hrtime_t is struct { unsigned long long val; }: returned in rax like the integer. */
unsigned long long fixed_my_hrtime(void) {
    struct timespec tp;
    clock_gettime(CLOCK_REALTIME, &tp);
    return (unsigned long long)(tp.tv_sec + SHIFT_SECONDS) * 1000000ULL +
           (unsigned long long)tp.tv_nsec / 1000ULL;
}
KGPATCH_REPLACE("my_hrtime", fixed_my_hrtime, SZ_my_hrtime, SUM_my_hrtime);

#ifdef EQUIVALENT
unsigned long long fixed_my_interval_timer(void) {
    struct timespec tp;
    clock_gettime(CLOCK_MONOTONIC, &tp);
    return (unsigned long long)tp.tv_sec * 1000000000ULL + (unsigned long long)tp.tv_nsec;
}
KGPATCH_REPLACE("my_interval_timer", fixed_my_interval_timer, SZ_my_interval_timer,
                SUM_my_interval_timer);
#endif
