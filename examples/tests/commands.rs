//! Each command, the planted bug, SLOW, shutdown paths and the DemoServer helper.

use std::time::{Duration, Instant};

use kgpatch_examples::{server_path, DemoServer, ServerOptions, Variant};

use crate::start;

/// Waits until `cond` holds, polling every 10 ms, for at most `deadline` (generous: the
/// machine may be loaded); panics with `what` if it never does.
fn wait_for(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "{what} (waited {deadline:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `true` if the thread of `srv` named `name` is blocked in `nanosleep` or
/// `clock_nanosleep` (`/proc/<pid>/task/<tid>/syscall`), as a worker parked in `SLOW` is.
fn sleeping_in_nanosleep(srv: &DemoServer, name: &str) -> bool {
    let Some((tid, _)) = srv.threads().unwrap().into_iter().find(|(_, n)| n == name) else {
        return false;
    };
    let syscall = std::fs::read_to_string(format!("/proc/{}/task/{tid}/syscall", srv.pid()))
        .unwrap_or_default();
    let nr = syscall
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<i64>().ok());
    nr == Some(libc::SYS_nanosleep) || nr == Some(libc::SYS_clock_nanosleep)
}

/// The milliseconds in a `SLEPT <ms>` answer (the time actually slept).
fn slept_ms(answer: &str) -> u64 {
    answer
        .strip_prefix("SLEPT ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a SLEPT answer: {answer:?}"))
}

#[test]
fn every_command_answers_in_both_variants() {
    for v in Variant::ALL {
        let srv = start(v);
        let mut c = srv.connect().unwrap();
        let mut ask = |req: &str, want: &str| {
            let got = c.request(req).unwrap();
            assert_eq!(got, want, "{}: {req}", v.name());
        };
        ask("PING", "PONG");
        ask("ping", "PONG");
        ask("GET k1", "NOT_FOUND");
        ask("SET k1 hello world", "OK");
        ask("GET k1", "VALUE hello world");
        ask("SET k1 x", "OK");
        ask("GET k1", "VALUE x");
        ask("INCR n 5", "INT 5");
        ask("INCR n +37", "INT 42");
        ask("GET n", "VALUE 42");
        ask("INCR k1 1", "ERR value is not an integer");
        ask("INCR n abc", "ERR amount is not an integer");
        ask("INCR n 9223372036854775807", "ERR overflow");
        ask("DEL k1", "DELETED");
        ask("DEL k1", "NOT_FOUND");
        ask("GET k1", "NOT_FOUND");
        ask("SET onlykey", "ERR usage: SET <key> <value>");
        ask("FLY away", "ERR unknown command");
        ask("", "ERR empty request");
        let slept = srv.request("SLOW 2").unwrap();
        assert!(slept_ms(&slept) >= 2, "{slept}");
        let long_key = "k".repeat(251);
        ask(&format!("SET {long_key} v"), "ERR key or value too long");
        let big = "v".repeat(2048);
        ask(&format!("SET big {big}"), "OK");
        ask("GET big", &format!("VALUE {big}"));
        ask("QUIT", "BYE");
        assert!(c.request("PING").is_err(), "QUIT closes the connection");
        let stats = srv.stats().unwrap();
        assert_eq!(stats.violations(), 0);
        assert!(stats.requests() >= 24, "{stats:?}");
        assert_eq!(
            stats.counter("threads"),
            9,
            "main, acceptor, 4 workers, 3 background"
        );
        assert_eq!(stats.counter("keys"), 2, "n and big");
        assert_eq!(stats.get("codec"), Some("1"));
    }
}

#[test]
fn planted_bug_is_visible_in_one_request() {
    for v in Variant::ALL {
        let srv = start(v);
        assert_eq!(
            srv.request("INCR fresh -5").unwrap(),
            "INT 5",
            "the bug: the sign is dropped"
        );
        assert_eq!(srv.request("INCR fresh 3").unwrap(), "INT 8");
        assert_eq!(
            srv.stats().unwrap().bug_probe(),
            Some(7),
            "the probe shows the bug"
        );
        // the stored-value parser has no such bug: a negative value set directly works
        assert_eq!(srv.request("SET neg -10").unwrap(), "OK");
        assert_eq!(srv.request("INCR neg 4").unwrap(), "INT -6");
    }
}

#[test]
fn threads_are_named() {
    let srv = DemoServer::spawn(ServerOptions::new(Variant::NoFramePointers).workers(3)).unwrap();
    // the server prints LISTENING only once every thread has named itself
    let mut names: Vec<String> = srv.threads().unwrap().into_iter().map(|(_, n)| n).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "kv-acceptor",
            "kv-compactor",
            "kv-flusher",
            "kv-ticker",
            "kv-worker-0",
            "kv-worker-1",
            "kv-worker-2",
            "kvserver-nofp"
        ]
    );
    let stats = srv.stats().unwrap();
    assert_eq!(stats.counter("threads"), 8);
    // The background threads are alive: each one's counter moves on (the flusher wakes every
    // 100 ms, the ticker every 50, the compactor in bursts). Wait for that, not for a time.
    wait_for(
        Duration::from_secs(30),
        "a background thread's counter never moved",
        || {
            let later = srv.stats().unwrap();
            later.counter("flushes") >= stats.counter("flushes") + 2
                && later.counter("ticks") >= stats.counter("ticks") + 4
                && later.counter("compactions") > stats.counter("compactions")
        },
    );
}

#[test]
fn slow_parks_one_worker_while_others_serve() {
    let srv = DemoServer::spawn(ServerOptions::new(Variant::FramePointers).workers(2)).unwrap();
    // connections go round-robin: the first lands on worker 0, the second on worker 1
    let mut parked = srv.connect().unwrap();
    let mut other = srv.connect().unwrap();
    assert_eq!(other.request("PING").unwrap(), "PONG");
    // Park worker 0 for a minute (the server is killed when the test ends) and wait until it
    // sleeps: then every answer on the other connection came from worker 1 meanwhile.
    parked.send("SLOW 60000").unwrap();
    wait_for(
        Duration::from_secs(30),
        "worker 0 never parked in SLOW",
        || sleeping_in_nanosleep(&srv, "kv-worker-0"),
    );
    for _ in 0..20 {
        assert_eq!(other.request("PING").unwrap(), "PONG");
    }
    assert!(
        sleeping_in_nanosleep(&srv, "kv-worker-0"),
        "worker 0 is still parked: the other worker answered meanwhile"
    );
    parked.set_timeout(Some(Duration::from_millis(20))).unwrap();
    assert!(
        parked.read_line().is_err(),
        "the parked request has not answered"
    );
    // SLOW sleeps at least what it says (on worker 1: worker 0 is parked).
    let t0 = Instant::now();
    let slept = other.request("SLOW 200").unwrap();
    assert!(slept_ms(&slept) >= 200, "{slept}");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert_eq!(
        other.request("SLOW 600001").unwrap(),
        "ERR usage: SLOW <ms> (at most 600000)"
    );
}

#[test]
fn shutdown_command_and_sigterm_exit_cleanly() {
    let mut srv = start(Variant::FramePointers);
    srv.request("SET a b").unwrap();
    let mut held = srv.connect().unwrap(); // an open connection must not block shutdown
    assert_eq!(held.request("PING").unwrap(), "PONG");
    let status = srv.shutdown().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        srv.output()
            .iter()
            .any(|l| l.starts_with("STOPPED requests=")),
        "{:?}",
        srv.output()
    );

    let mut srv = start(Variant::NoFramePointers);
    // a thread parked in SLOW does not hold shutdown up either
    let mut parked = srv.connect().unwrap();
    parked.send("SLOW 60000").unwrap();
    wait_for(
        Duration::from_secs(30),
        "worker 0 never parked in SLOW",
        || sleeping_in_nanosleep(&srv, "kv-worker-0"),
    );
    let t0 = Instant::now();
    let status = srv.terminate().unwrap();
    assert!(status.success(), "{status}");
    // Far below the 60 s the parked worker would hold it, far above any scheduling delay.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

#[test]
fn drop_kills_the_server() {
    let srv = start(Variant::NoFramePointers);
    let pid = srv.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(srv);
    // reaped, so not even a zombie remains
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn bad_arguments_exit_2_with_a_reason() {
    for args in [
        &["--workers", "0"][..],
        &["--port", "70000"],
        &["--install-noop-handler", "9"],
        &["--install-noop-handler", "40:sometimes"],
        &["--churn", "1000"],
        &["--frobnicate"],
    ] {
        let out = std::process::Command::new(server_path(Variant::FramePointers))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("kvserver: "),
            "{args:?}"
        );
    }
    let err = DemoServer::spawn(
        ServerOptions::new(Variant::FramePointers)
            .arg("--workers")
            .arg("x"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("exited before listening"), "{err}");
}

#[test]
fn env_reaches_the_server() {
    // KVSERVER_PORT is overridden by DemoServer (it asks for an ephemeral port); a bad value
    // set through env() shows that env() is applied after it
    let err =
        DemoServer::spawn(ServerOptions::new(Variant::FramePointers).env("KVSERVER_PORT", "nope"))
            .unwrap_err();
    assert!(err.to_string().contains("exited before listening"), "{err}");
}
