//! Stale sockets of exited targets are cleaned up (issue 10, item 7): an agent starting in a
//! runtime directory removes the sockets nobody serves any more, and `kgpatch ps` does too —
//! but never a socket that accepts connections, whatever its pid, and never another file.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A socket file at `dir/<pid>.sock` that nobody listens on any more (its listener closed
/// without unlinking it, as a killed process leaves it).
fn stale_socket(dir: &Path, pid: u32) -> PathBuf {
    let path = dir.join(format!("{pid}.sock"));
    drop(UnixListener::bind(&path).expect("binding a socket"));
    assert!(path.exists());
    path
}

/// The pid of a process that has exited.
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn stale_sockets_are_removed_live_ones_kept() {
    let dir = TempDir::new("sockets");
    let rt = dir.runtime_dir();
    // A process that exited, and a live process (not an agent) that reuses a pid whose
    // socket was left behind: both sockets refuse connections.
    let gone = stale_socket(&rt, dead_pid());
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let reused = stale_socket(&rt, sleeper.id());
    // A live socket under the pid of a live process, and a file that is not a socket.
    let live_path = rt.join(format!("{}.sock", std::process::id()));
    let live = UnixListener::bind(&live_path).unwrap();
    let other = rt.join("999999.sock");
    std::fs::write(&other, b"not a socket").unwrap();

    let exe = build_target(&dir, "target", &[]);
    let t = Spawn::new(&exe, &rt).arg("1").start();
    let own = rt.join(format!("{}.sock", t.pid()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while (gone.exists() || reused.exists() || !own.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!gone.exists(), "the socket of an exited process stays");
    assert!(!reused.exists(), "a stale socket under a reused pid stays");
    assert!(own.exists(), "the agent has no socket");
    assert!(live_path.exists(), "a live socket was removed");
    assert!(other.exists(), "a file that is not a socket was removed");
    t.kg(&["status", &t.pid_arg()]).expect_code(0);

    // `kgpatch ps` prunes too (a target killed after the agent started), and lists the rest.
    let later = stale_socket(&rt, dead_pid());
    let out = t.kg(&["ps"]);
    out.expect(0, &format!("removed {}", later.display()));
    assert!(!later.exists(), "ps left a stale socket:\n{out}");
    assert!(out.stdout.contains(&own.display().to_string()), "{out}");
    assert!(
        live_path.exists() && other.exists() && own.exists(),
        "{out}"
    );
    // Nothing stale is left: a second ps removes nothing.
    let again = t.kg(&["ps"]);
    assert!(!again.stderr.contains("removed"), "{again}");

    drop(live);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// `status` (human and `--json`) and `ps` (human and `--json`) say the agent was preloaded,
/// and since when (issue 11).
#[test]
fn status_and_ps_say_how_the_agent_came_in() {
    use kgpatch_protocol::{AgentProcess, Origin};
    let dir = TempDir::new("origin");
    let exe = build_target(&dir, "target", &[]);
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let t = Spawn::new(&exe, &dir.runtime_dir()).arg("1").start();
    let info = t.status().agent.expect("the agent says how it came in");
    assert_eq!(info.origin, Origin::Preload);
    let after_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        (before_ms..=after_ms).contains(&info.since_unix_ms),
        "{before_ms} <= {} <= {after_ms}",
        info.since_unix_ms
    );
    t.kg(&["status", &t.pid_arg()])
        .expect(0, "preloaded since ");

    let out = t.kg(&["ps", "--json"]);
    out.expect_code(0);
    let listed: Vec<AgentProcess> =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{out}"));
    let me = listed
        .iter()
        .find(|p| p.pid == t.pid())
        .unwrap_or_else(|| panic!("ps does not list the target:\n{out}"));
    assert_eq!(me.agent, Some(info), "{out}");
    t.kg(&["ps"]).expect(0, "preloaded since ");
}
