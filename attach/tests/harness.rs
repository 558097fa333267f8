//! Fixtures, the target process and before/after snapshots.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kgpatch_sys::proc::{self, Mapping, Pid, Status};
use kgpatch_sys::ptrace;

pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("attach-fixtures")
}

fn build(out: &str, args: &[&str], compiler: &str) -> PathBuf {
    let d = dir();
    std::fs::create_dir_all(&d).unwrap();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let outp = d.join(out);
    let mut cmd = Command::new(compiler);
    cmd.current_dir(&fx).args(args).arg("-o").arg(&outp);
    let st = cmd.status().expect("running the compiler");
    assert!(st.success(), "{compiler} {args:?} failed");
    outp
}

static FIXTURES: OnceLock<Fixtures> = OnceLock::new();

pub struct Fixtures {
    pub target: PathBuf,
    pub target_static: Option<PathBuf>,
    pub standin: PathBuf,
    pub noentry: PathBuf,
}

pub fn fixtures() -> &'static Fixtures {
    FIXTURES.get_or_init(|| {
        let target = build("target", &["-O1", "-pthread", "target.c"], "cc");
        let standin = build(
            "libstandin.so",
            &["-O1", "-shared", "-fPIC", "standin.c"],
            "cc",
        );
        let noentry = build(
            "libnoentry.so",
            &["-O1", "-shared", "-fPIC", "noentry.c"],
            "cc",
        );
        let d = dir();
        let st = Command::new("cc")
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
            .args(["-O1", "-static", "-pthread", "target.c", "-o"])
            .arg(d.join("target-static"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        Fixtures {
            target,
            target_static: st.then(|| d.join("target-static")),
            standin,
            noentry,
        }
    })
}

/// A fresh runtime directory for one test.
pub fn runtime(name: &str) -> PathBuf {
    let d = dir().join(format!("rt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct Target {
    pub child: Child,
    pub pid: i32,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub eintr: i64,
    pub short: i64,
    pub corrupt: i64,
    pub loops: i64,
    pub maxgap_us: i64,
}

impl Target {
    pub fn start(exe: &Path, mode: &str, threads: usize, extra: &[&str]) -> Target {
        let mut child = Command::new(exe)
            .args((!mode.is_empty()).then_some(mode))
            .arg(threads.to_string())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the target");
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "target said {line:?}");
        let pid = child.id() as i32;
        // let every thread reach its syscall
        let deadline = Instant::now() + Duration::from_secs(20);
        while thread_count(pid) < threads {
            assert!(Instant::now() < deadline, "threads did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        Target {
            child,
            pid,
            stdin,
            out,
        }
    }

    pub fn stats(&mut self) -> Stats {
        self.stdin.write_all(b"s\n").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let mut s = Stats::default();
        for kv in line.split_whitespace().skip(1) {
            let (k, v) = kv.split_once('=').unwrap();
            let v: i64 = v.parse().unwrap();
            match k {
                "eintr" => s.eintr = v,
                "short" => s.short = v,
                "corrupt" => s.corrupt = v,
                "loops" => s.loops = v,
                "maxgap_us" => s.maxgap_us = v,
                _ => {}
            }
        }
        assert!(line.starts_with("stats"), "target said {line:?}");
        s
    }

    /// Still alive (not a zombie) after all.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn quit(mut self) {
        let _ = self.stdin.write_all(b"q\n");
        let _ = self.stdin.flush();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "target ended with {st}");
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The signal fields of a thread's (or the process's) `/proc` status.
#[derive(Debug, PartialEq, Eq)]
pub struct Signals {
    pub blocked: Option<u64>,
    pub ignored: Option<u64>,
    pub caught: Option<u64>,
    pub pending: Option<u64>,
    pub shared_pending: Option<u64>,
}

impl Signals {
    pub fn of(s: &Status) -> Signals {
        Signals {
            blocked: s.sig_blk,
            ignored: s.sig_ign,
            caught: s.sig_cgt,
            pending: s.sig_pnd,
            shared_pending: s.shd_pnd,
        }
    }
}

/// How many threads `pid` has now.
pub fn thread_count(pid: i32) -> usize {
    proc::tasks(Pid::Other(pid)).unwrap().len()
}

/// What must be the same before and after a refusal.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub maps: Vec<Mapping>,
    /// Per thread: SigBlk, SigIgn, SigCgt, SigPnd, ShdPnd.
    pub signals: Vec<(i32, Signals)>,
    /// Per thread: rip, rsp, rbx, rbp, r12..r15, fs_base (threads asleep in nanosleep
    /// stay at the same place).
    pub regs: Vec<(i32, [u64; 9])>,
}

pub fn snapshot(pid: i32) -> Snapshot {
    let maps = proc::maps(Pid::Other(pid)).unwrap();
    let mut signals = Vec::new();
    let mut regs = Vec::new();
    for t in proc::tasks(Pid::Other(pid)).unwrap() {
        let st = proc::task_status(Pid::Other(pid), t).unwrap().unwrap();
        signals.push((t, Signals::of(&st)));
        ptrace::seize(t, 0).unwrap();
        ptrace::interrupt(t).unwrap();
        let s = ptrace::wait_stop(t, Duration::from_secs(5)).unwrap();
        assert_eq!(s, ptrace::Stop::Interrupt);
        let r = ptrace::get_regs(t).unwrap();
        ptrace::detach(t, 0).unwrap();
        regs.push((
            t,
            [
                r.rip, r.rsp, r.rbx, r.rbp, r.r12, r.r13, r.r14, r.r15, r.fs_base,
            ],
        ));
    }
    Snapshot {
        maps,
        signals,
        regs,
    }
}

/// Wait until `f` holds (at most `secs`).
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
