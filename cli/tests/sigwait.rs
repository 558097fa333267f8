//! The agent never takes a signal meant for the program: a daemon that blocks SIGTERM in
//! every thread and takes it with `sigwait` in one (MariaDB does) gets its SIGTERM with the
//! agent preloaded. Before the agent thread blocked asynchronous signals, the kernel gave
//! the process-directed SIGTERM to the agent thread (the one thread that did not block it):
//! MariaDB logged "Got signal 15" from its handler and never shut down.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn a_sigwait_daemon_gets_its_sigterm_with_the_agent_preloaded() {
    let dir = TempDir::new("sigwait");
    let exe = dir.join("sigwait");
    cc(
        "gcc",
        &[
            "-O2",
            "-Wall",
            "-o",
            exe.to_str().unwrap(),
            fixture("sigwait.c").to_str().unwrap(),
            "-lpthread",
        ],
    );
    for round in 0..5 {
        let mut child = Command::new(&exe)
            .env("LD_PRELOAD", agent_so())
            .env("KGPATCH_RUNTIME_DIR", dir.runtime_dir())
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("READY"), "round {round}: {line:?}");
        // The agent is up (its socket answers) before the signal goes.
        let pid = child.id().to_string();
        kgpatch(&dir.runtime_dir(), &["status", &pid]).expect_code(0);
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let mut rest = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        assert!(
            status.is_some_and(|s| s.success()) && rest.contains("SIGWAIT 15"),
            "round {round}: the daemon did not take its SIGTERM with sigwait \
             (exit {status:?}, output {rest:?})"
        );
        assert!(!rest.contains("HANDLER"), "round {round}: {rest:?}");
    }
}
