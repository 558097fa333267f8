//! MariaDB end to end (issue 13, the CI-sized run): Debian's `mariadbd` with the agent
//! preloaded, `sysbench oltp_read_write` on 16 connections, and while it runs: ten
//! apply/revert cycles of a patch that replaces two per-query functions with equivalent
//! bodies, then a patch a client can see (`NOW()` an hour ahead), reverted. After: every
//! transition completed, sysbench ended cleanly (no error it does not ignore, no
//! reconnect), `CHECK TABLE` is clean on every table, and the server shuts down cleanly on
//! SIGTERM. Once with one thread per connection, once with the thread pool, and once with
//! mariadbd started without the agent and `kgpatch attach` while sysbench runs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kgpatch_db::{build_patch, describe, MariaDb, MariaDbOptions, Sysbench, ThreadHandling};
use kgpatch_examples::tools::{RuntimeDir, Tools};

const MARIADBD: &str = "/usr/sbin/mariadbd";

fn kgpatch(tools: &Tools, rt: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(tools.kgpatch())
        .env("KGPATCH_RUNTIME_DIR", rt)
        .args(args)
        .output()
        .expect("running kgpatch");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Seconds `NOW()` is ahead of this machine's clock, as a client sees it.
fn now_offset(db: &MariaDb) -> i64 {
    let server: i64 = db
        .sql("SELECT UNIX_TIMESTAMP(NOW())")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let here = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    server - here
}

/// How the agent comes into mariadbd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Agent {
    Preload,
    /// Started without it; `kgpatch attach` while sysbench runs.
    Attach,
}

fn patched_live_under_sysbench(threads: ThreadHandling, agent: Agent) {
    kgpatch_db::require().unwrap_or_else(|e| panic!("{e}"));
    let tools = Tools::get().unwrap();
    let rt = RuntimeDir::new().unwrap();
    let mut opts = MariaDbOptions {
        threads,
        ..MariaDbOptions::default()
    };
    if agent == Agent::Preload {
        opts = opts
            .env("LD_PRELOAD", tools.agent_library())
            .env("KGPATCH_RUNTIME_DIR", rt.path());
    }
    let mut db = MariaDb::start(&opts).unwrap_or_else(|e| panic!("{e}"));
    let pid = db.pid().to_string();

    let bin = Path::new(MARIADBD);
    let hrtime = describe(tools.kgpatch(), bin, "my_hrtime").unwrap();
    let timer = describe(tools.kgpatch(), bin, "my_interval_timer").unwrap();
    let equivalent = db.dir().join("mariadb-equivalent.so");
    build_patch(
        "mariadb_time.c",
        &equivalent,
        &["NAME=\"mariadb-equivalent\"".into(), "EQUIVALENT".into()],
        &[hrtime.clone(), timer],
    )
    .unwrap();
    let shift = db.dir().join("mariadb-shift.so");
    build_patch(
        "mariadb_time.c",
        &shift,
        &["NAME=\"mariadb-shift\"".into(), "SHIFT_SECONDS=3600".into()],
        &[hrtime],
    )
    .unwrap();

    let sb = Sysbench::prepare(&db, 4, 10_000).unwrap_or_else(|e| panic!("{e}"));
    let run = sb.start(16, Duration::from_secs(30), 99).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut attached = String::new();
    if agent == Agent::Attach {
        let (code, out) = kgpatch(tools, rt.path(), &["attach", &pid]);
        assert!(code == 0 && out.contains("attached the agent"), "{out}");
        attached = format!("; {}", out.trim());
    }

    let eq = equivalent.to_str().unwrap();
    for cycle in 0..10 {
        let (code, out) = kgpatch(tools, rt.path(), &["apply", &pid, eq, "--timeout", "20s"]);
        assert!(
            code == 0 && out.contains("completed"),
            "cycle {cycle}: {out}"
        );
        let (code, out) = kgpatch(
            tools,
            rt.path(),
            &["revert", &pid, "mariadb-equivalent", "--timeout", "20s"],
        );
        assert!(
            code == 0 && out.contains("completed"),
            "cycle {cycle}: {out}"
        );
    }
    assert!(
        now_offset(&db).abs() < 60,
        "NOW() moved before the shift patch"
    );
    let (code, out) = kgpatch(
        tools,
        rt.path(),
        &["apply", &pid, shift.to_str().unwrap(), "--timeout", "20s"],
    );
    assert!(code == 0, "{out}");
    let ahead = now_offset(&db);
    assert!(
        (3540..3660).contains(&ahead),
        "NOW() is {ahead} s ahead with the shift patch"
    );
    let (code, out) = kgpatch(
        tools,
        rt.path(),
        &["revert", &pid, "mariadb-shift", "--timeout", "20s"],
    );
    assert!(code == 0, "{out}");
    assert!(
        now_offset(&db).abs() < 60,
        "NOW() did not come back on revert"
    );

    let report = Sysbench::finish(run).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.transactions > 0, "{report:?}");
    assert_eq!(report.reconnects, 0, "{report:?}");
    assert!(db.alive(), "mariadbd died");
    let bad = sb.check_tables(&db).unwrap();
    assert!(bad.is_empty(), "CHECK TABLE: {bad:?}");
    let status = db
        .stop(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "mariadbd exited with {status} on SIGTERM");
    eprintln!(
        "mariadb ({threads:?}, {agent:?}{attached}): 22 transitions under sysbench, {} transactions ({:.0} tps), \
         p99 {:.1} ms, max {:.1} ms, {} ignored errors (deadlocks), 0 reconnects, \
         CHECK TABLE clean, clean shutdown",
        report.transactions, report.tps, report.percentile_ms, report.max_ms, report.ignored_errors
    );
}

#[test]
fn mariadb_one_thread_per_connection_is_patched_live_under_sysbench() {
    patched_live_under_sysbench(ThreadHandling::OnePerConnection, Agent::Preload);
}

#[test]
fn mariadb_thread_pool_is_patched_live_under_sysbench() {
    patched_live_under_sysbench(ThreadHandling::Pool, Agent::Preload);
}

/// mariadbd started without kgpatch: the agent attached while sysbench runs.
#[test]
fn mariadb_attached_under_sysbench_is_patched_live() {
    patched_live_under_sysbench(ThreadHandling::OnePerConnection, Agent::Attach);
}
