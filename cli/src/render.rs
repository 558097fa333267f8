//! Human output of `status`, `list`, `force` and the live progress of a transition.

use std::fmt::Write as _;

use kgpatch_protocol::{
    AgentInfo, BlockerInfo, Cost, Kind, Origin, Outcome, OutcomeKind, Status, ThreadInfo,
    TransitionInfo,
};

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Apply => "apply",
        Kind::Revert => "revert",
    }
}

/// The patch stack, oldest first.
pub fn patches(s: &Status) -> String {
    let mut out = String::new();
    if s.patches.is_empty() {
        let _ = writeln!(out, "no patches applied in process {}", s.pid);
    }
    for (i, p) in s.patches.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}. {} {} (transition {}) — {}",
            i + 1,
            p.name,
            p.version,
            p.applied_by,
            p.description
        );
        let _ = writeln!(
            out,
            "   module {} ({} bytes mapped)",
            p.module.display(),
            p.mapped_bytes
        );
        for f in &p.functions {
            let _ = writeln!(out, "   {} at {:#x} -> {:#x}", f.name, f.old, f.new);
        }
    }
    out
}

/// A progress bar of `width` cells.
pub fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// One line of progress.
pub fn progress_line(t: &TransitionInfo) -> String {
    let dir = if t.reversed { " (reversing)" } else { "" };
    let forced = if t.forced { " FORCED" } else { "" };
    format!(
        "{} {}{}{} {} {}/{} threads, {:.1}s elapsed, {:.1}s to deadline",
        kind(t.kind),
        t.patch,
        dir,
        forced,
        bar(t.migrated, t.total, 30),
        t.migrated,
        t.total,
        t.elapsed_ms as f64 / 1000.0,
        t.remaining_ms as f64 / 1000.0
    )
}

fn blocker(b: &Option<BlockerInfo>) -> String {
    match b {
        None => "not reached yet".into(),
        Some(BlockerInfo::Busy { function, depth }) => {
            format!("inside {function} (frame {depth})")
        }
        Some(BlockerInfo::Unreliable { reason }) => format!("stack not checkable: {reason}"),
        Some(BlockerInfo::SignalBlocked) => {
            "blocks the migration signal (moves only at a quiescent point)".into()
        }
    }
}

/// The transition in progress: progress and the threads not yet moved.
pub fn transition(t: &TransitionInfo) -> String {
    let mut out = format!("transition {}: {}\n", t.t, progress_line(t));
    if let Some(e) = &t.waiting_on_error {
        let _ = writeln!(
            out,
            "  waiting: {e} (no thread is counted and nothing completes until it clears; the deadline still applies)"
        );
    }
    if !t.pending.is_empty() {
        let _ = writeln!(
            out,
            "  {:>8}  {:<16} {:>8}  blocked by",
            "tid", "name", "attempts"
        );
        for th in &t.pending {
            let _ = writeln!(
                out,
                "  {:>8}  {:<16} {:>8}  {}",
                th.tid,
                th.name,
                th.attempts,
                blocker(&th.blocker)
            );
        }
    }
    out
}

/// `kgpatch force`'s answer: what force moved, and each thread it cannot move with why.
pub fn forced(t: u64, completed: bool, moved: usize, unmoved: &[ThreadInfo]) -> String {
    let threads = |n: usize| if n == 1 { "thread" } else { "threads" };
    let mut out = format!(
        "kgpatch: WARNING: transition {t} forced: the stack check is lifted; {moved} {} moved without it and may keep running code the patch replaced\n",
        threads(moved)
    );
    if completed {
        let _ = writeln!(out, "kgpatch: transition {t} completed");
        return out;
    }
    if unmoved.is_empty() {
        let _ = writeln!(
            out,
            "kgpatch: every thread moved; transition {t} completes at the agent's next step"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "kgpatch: force cannot move {} {}; transition {t} stays pending (forced) until they move:",
        unmoved.len(),
        threads(unmoved.len())
    );
    let _ = writeln!(out, "  {:>8}  {:<16} why", "tid", "name");
    for th in unmoved {
        // With the stack check lifted, a frame no longer holds a thread back: only the
        // signal not being taken does.
        let why = match &th.blocker {
            Some(BlockerInfo::SignalBlocked) => {
                "blocks the migration signal: moves only at a quiescent point or when it unblocks the signal"
            }
            _ => "did not take the migration signal in time (stopped, or not scheduled): retried",
        };
        let _ = writeln!(out, "  {:>8}  {:<16} {}", th.tid, th.name, why);
    }
    out
}

/// How a transition ended.
pub fn outcome(o: &Outcome) -> String {
    let how = match o.result {
        OutcomeKind::Completed => "completed",
        OutcomeKind::Reversed => "reversed",
    };
    format!(
        "transition {} ({} {}) {} in {} ms: {}",
        o.t,
        kind(o.kind),
        o.patch,
        how,
        o.elapsed_ms,
        o.message
    )
}

/// What the last transition cost the target (two lines, indented under `last:`).
pub fn cost(c: &Cost) -> String {
    format!(
        "   cost: {} migration signals ({} spared, {} rounds), {} text-sweep signals, {} SIGTRAPs, {} membarriers, {} wake-ups of sleeping threads\n   \
         threads interrupted: {} ({} more than once, at most {} times); in our handlers {:.1} µs per thread at most ({:.1} µs longest run, {:.1} µs in all); agent CPU {} µs{}\n",
        c.migration_signals,
        c.skipped,
        c.rounds,
        c.text_sweep_signals,
        c.sigtraps,
        c.membarriers,
        c.wakeups,
        c.threads_interrupted,
        c.threads_interrupted_more_than_once,
        c.max_interrupts,
        c.max_thread_handler_ns as f64 / 1000.0,
        c.max_handler_ns as f64 / 1000.0,
        c.total_handler_ns as f64 / 1000.0,
        c.agent_cpu_us,
        if c.table_full {
            " (the per-thread table was full: some threads uncounted)"
        } else {
            ""
        }
    )
}

/// Modules no longer applied that stay mapped, and the libraries kgpatch keeps loaded.
pub fn mapped(s: &Status) -> String {
    let mut out = String::new();
    if !s.retired.is_empty() {
        let total: u64 = s.retired.iter().map(|r| r.mapped_bytes).sum();
        let _ = writeln!(
            out,
            "reverted modules still mapped ({total} bytes; the program may still point into them; `kgpatch unload` unmaps one):"
        );
        for r in &s.retired {
            let _ = writeln!(
                out,
                "   {} {} ({}, transition {}) {} bytes, module {}",
                r.name,
                r.version,
                r.how,
                r.retired_by,
                r.mapped_bytes,
                r.module.display()
            );
        }
    }
    if !s.pinned.is_empty() {
        let _ = writeln!(
            out,
            "libraries kept loaded by kgpatch (a dlclose does not unmap them while patched):"
        );
        for p in &s.pinned {
            let sites: Vec<String> = p.sites.iter().map(|e| format!("{e:#x}")).collect();
            let mut why = Vec::new();
            if !sites.is_empty() {
                why.push(format!("sites at {}", sites.join(", ")));
            }
            if !p.modules.is_empty() {
                why.push(format!("referred to by {}", p.modules.join(", ")));
            }
            let _ = writeln!(out, "   {} ({})", p.library.display(), why.join("; "));
        }
    }
    out
}

/// `ms` milliseconds after the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (proleptic Gregorian), after Howard Hinnant's `civil_from_days`.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// How the agent came in: `preloaded since 2026-12-02 01:53:36 UTC`, or `?` when the
/// agent did not say.
pub fn agent(info: Option<&AgentInfo>) -> String {
    let Some(info) = info else {
        return "?".into();
    };
    let how = match info.origin {
        Origin::Preload => "preloaded",
        Origin::Attach => "attached",
        Origin::Linked => "linked in",
    };
    format!("{how} since {}", utc(info.since_unix_ms))
}

/// The whole status.
pub fn status(s: &Status) -> String {
    let came_in = s
        .agent
        .as_ref()
        .map_or(String::new(), |a| format!(", {}", agent(Some(a))));
    let mut out = format!("process {} (agent {}{came_in})\n", s.pid, s.agent_version);
    if let Some(f) = &s.agent_failure {
        let _ = writeln!(
            out,
            "AGENT FAILURE: {f}; the agent refuses every further transition (the process runs on as it is)"
        );
    }
    out.push_str(&patches(s));
    out.push_str(&mapped(s));
    match &s.transition {
        Some(t) => out.push_str(&transition(t)),
        None => out.push_str("no transition in progress\n"),
    }
    if let Some(o) = &s.last {
        let _ = writeln!(out, "last: {}", outcome(o));
        if let Some(c) = &o.cost {
            out.push_str(&cost(c));
        }
    }
    let h = &s.handler;
    if h.count > 0 {
        let _ = writeln!(
            out,
            "migration handler: {} runs, p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            h.count,
            h.p50_ns as f64 / 1000.0,
            h.p99_ns as f64 / 1000.0,
            h.max_ns as f64 / 1000.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_in_proportion() {
        assert_eq!(bar(0, 4, 4), "[----]");
        assert_eq!(bar(2, 4, 4), "[##--]");
        assert_eq!(bar(4, 4, 4), "[####]");
        assert_eq!(bar(0, 0, 4), "[####]");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_999), "2023-11-14 22:13:20 UTC");
        let info = AgentInfo {
            origin: Origin::Preload,
            since_unix_ms: 0,
        };
        assert_eq!(
            agent(Some(&info)),
            "preloaded since 1970-01-01 00:00:00 UTC"
        );
        assert_eq!(agent(None), "?");
    }

    #[test]
    fn a_transition_waiting_on_an_os_error_says_so() {
        let mut t = TransitionInfo {
            t: 3,
            kind: Kind::Apply,
            patch: "fix".into(),
            reversed: false,
            forced: false,
            elapsed_ms: 10,
            remaining_ms: 990,
            left_pending: false,
            migrated: 1,
            total: 2,
            pending: Vec::new(),
            waiting_on_error: None,
        };
        assert!(!transition(&t).contains("waiting:"));
        t.waiting_on_error = Some("listing /proc/self/task: Too many open files".into());
        let text = transition(&t);
        assert!(
            text.contains("waiting: listing /proc/self/task: Too many open files"),
            "{text}"
        );
    }
}
