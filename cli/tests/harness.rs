//! The end-to-end harness: the `kgpatch` binary and the agent library, C fixtures compiled
//! into per-test temporary directories, target processes that are killed when dropped, and
//! kgpatch runs with a private runtime directory per test.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kgpatch_protocol::{CommandError, Outcome, OutcomeKind, Status, StatusOutput};

/// The `kgpatch` binary under test.
pub fn kgpatch_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kgpatch"))
}

/// `libkgpatch_agent.so` of the same build as `kgpatch` (built once if needed).
///
/// The library lives next to the binary (`<target-dir>/<profile>/`); `cargo test` does not
/// build a cdylib of another package, so the first caller runs `cargo build -p
/// kgpatch-agent` with the same target directory and profile. Cargo makes that a no-op when
/// the library is current, so a stale library is never used.
pub fn agent_so() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let profile_dir = kgpatch_exe().parent().expect("kgpatch is in a directory");
        let target_dir = profile_dir.parent().expect("the profile dir has a parent");
        let so = profile_dir.join("libkgpatch_agent.so");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "kgpatch-agent"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .expect("running cargo to build the agent library");
        assert!(
            out.status.success(),
            "building kgpatch-agent failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(so.exists(), "cargo built no {}", so.display());
        so
    })
}

/// A fixture source file.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The directory of `kgpatch.h`.
pub fn kmod_include() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kmod/include")
}

/// A temporary directory removed when dropped, with a private (0700) runtime directory
/// for the agents of this test's targets.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh directory named after the test.
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kgpatch-e2e-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.join("rt")).expect("creating the test's temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(path.join("rt"), std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The runtime directory (`KGPATCH_RUNTIME_DIR`) of this test's agents.
    pub fn runtime_dir(&self) -> PathBuf {
        self.path.join("rt")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a compiler (or any build tool) and panics with its output if it fails.
pub fn run_tool(program: &str, args: &[&OsStr]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {:?} failed:\n{}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `gcc`/`g++` with string arguments.
pub fn cc(program: &str, args: &[&str]) {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run_tool(program, &args);
}

/// Size and checksum of a function, as a patch entry carries them.
#[derive(Clone, Copy, Debug)]
pub struct Sym {
    /// Link-time address.
    pub address: u64,
    /// `st_size`.
    pub size: u64,
    /// FNV-1a-64 of the body in the file.
    pub checksum: u64,
}

/// The one function `name` of `exe` (panics if there is not exactly one).
pub fn describe(exe: &Path, name: &str) -> Sym {
    let found = kgpatch_kmod::describe_symbol(exe, name, None)
        .unwrap_or_else(|e| panic!("describing {name} in {}: {e}", exe.display()));
    assert_eq!(found.len(), 1, "{name} in {}: {found:?}", exe.display());
    let d = &found[0];
    Sym {
        address: d.address,
        size: d.size,
        checksum: d.checksum.expect("a function has file bytes"),
    }
}

/// `-DSZ_<name>=<size> -DSUM_<name>=<checksum>` for each function.
pub fn sym_defines(exe: &Path, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| {
            let s = describe(exe, n);
            [
                format!("-DSZ_{n}={}", s.size),
                format!("-DSUM_{n}={:#x}ULL", s.checksum),
            ]
        })
        .collect()
}

/// Builds `fixtures/fix.c` into `out` with `defines` (each `-D...`).
pub fn build_patch(src: &str, out: &Path, defines: &[String]) {
    let include = kmod_include();
    let mut args: Vec<String> = vec![
        "-O2".into(),
        "-shared".into(),
        "-fPIC".into(),
        format!("-I{}", include.display()),
        "-o".into(),
        out.display().to_string(),
        fixture(src).display().to_string(),
    ];
    args.extend(defines.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cc(if src.ends_with(".cpp") { "g++" } else { "gcc" }, &args);
}

/// What a kgpatch run printed and how it ended.
#[derive(Debug)]
pub struct Out {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

impl Out {
    /// Both streams.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Its stdout as `--json` output (a status or an error), parsed; panics if it is not.
    #[track_caller]
    pub fn json(&self) -> StatusOutput {
        StatusOutput::parse(&self.stdout).unwrap_or_else(|e| panic!("{e}\n{self}"))
    }

    /// The outcome of the transition an `apply`/`revert --json` waited for.
    #[track_caller]
    pub fn outcome(&self) -> Outcome {
        self.json()
            .outcome()
            .cloned()
            .unwrap_or_else(|| panic!("no outcome in the JSON:\n{self}"))
    }

    /// The error a `--json` command failed with.
    #[track_caller]
    pub fn error(&self) -> CommandError {
        self.json()
            .error()
            .cloned()
            .unwrap_or_else(|| panic!("no error in the JSON:\n{self}"))
    }

    /// Panics unless the command failed with class `kind` (a name of the protocol's
    /// `ErrorKind`, or `failed` for a local failure): the exit code is that class's documented code, the `--json` error names
    /// the class and its code, and the output holds `needle`.
    #[track_caller]
    pub fn expect_refused(&self, kind: &str, needle: &str) -> &Out {
        let code = refusal_code(kind);
        self.expect(code, needle);
        let e = self.error();
        assert_eq!(
            (e.kind.as_str(), i32::from(e.exit_code)),
            (kind, code),
            "{self}"
        );
        self
    }

    /// Panics unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Out {
        assert_eq!(self.code, code, "unexpected exit code:\n{self}");
        self
    }

    /// Panics unless the exit code is `code` and the output holds `needle`.
    #[track_caller]
    pub fn expect(&self, code: i32, needle: &str) -> &Out {
        self.expect_code(code);
        assert!(
            self.text().contains(needle),
            "output lacks {needle:?}:\n{self}"
        );
        self
    }
}

/// The exit code the CLI documents for a refusal of class `kind` (its `//!` table; an
/// independent copy, so a change of the policy fails here).
#[track_caller]
pub fn refusal_code(kind: &str) -> i32 {
    match kind {
        "internal" | "failed" => 1,
        "busy" => 5,
        "bad_module" => 6,
        "unpatchable" => 7,
        "vetoed" => 8,
        "no_such_patch" => 9,
        "no_transition" => 10,
        "bad_request" => 11,
        other => panic!("no such error kind {other:?}"),
    }
}

/// A `kgpatch` command not yet run.
pub fn kgpatch_cmd(runtime_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(kgpatch_exe());
    cmd.args(args)
        .env("KGPATCH_RUNTIME_DIR", runtime_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `cmd` to its end; panics if it takes longer than `limit` (a hung kgpatch is a bug).
pub fn run_limited(mut cmd: Command, limit: Duration) -> Out {
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawning kgpatch");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for kgpatch") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kgpatch {:?} did not finish within {limit:?}; stderr so far:\n{}",
                cmd.get_args().collect::<Vec<_>>(),
                t_err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Out {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Runs kgpatch with `args` against the agents of `runtime_dir` (60 s limit).
pub fn kgpatch(runtime_dir: &Path, args: &[&str]) -> Out {
    run_limited(kgpatch_cmd(runtime_dir, args), Duration::from_secs(60))
}

struct Lines {
    lines: Mutex<(Vec<String>, bool)>,
    cv: Condvar,
}

/// A target process with the agent preloaded, killed (SIGKILL) and reaped when dropped.
/// Its stdout is collected line by line; commands go to its stdin.
pub struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
    exe: PathBuf,
    runtime_dir: PathBuf,
    out: Arc<Lines>,
    cursor: usize,
    seq: u64,
}

/// How to start a [`Target`].
pub struct Spawn {
    exe: PathBuf,
    args: Vec<OsString>,
    runtime_dir: PathBuf,
    preload: bool,
    ready: String,
    env: Vec<(OsString, OsString)>,
}

impl Spawn {
    /// Runs `exe` with the agent preloaded and `runtime_dir` as its runtime directory; waits
    /// for a line starting with `READY`.
    pub fn new(exe: &Path, runtime_dir: &Path) -> Spawn {
        Spawn {
            exe: exe.to_owned(),
            args: Vec::new(),
            runtime_dir: runtime_dir.to_owned(),
            preload: true,
            ready: "READY".into(),
            env: Vec::new(),
        }
    }

    /// An environment variable of the target.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Spawn {
        self.env.push((key.into(), value.into()));
        self
    }

    /// An argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Spawn {
        self.args.push(a.into());
        self
    }

    /// Arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, a: I) -> Spawn {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    /// Without the agent.
    pub fn no_agent(mut self) -> Spawn {
        self.preload = false;
        self
    }

    /// Starts it.
    pub fn start(self) -> Target {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .env("KGPATCH_RUNTIME_DIR", &self.runtime_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if self.preload {
            cmd.env("LD_PRELOAD", agent_so());
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.exe.display()));
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let out = Arc::new(Lines {
            lines: Mutex::new((Vec::new(), false)),
            cv: Condvar::new(),
        });
        let sink = Arc::clone(&out);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut g = sink.lines.lock().unwrap();
                g.0.push(line);
                sink.cv.notify_all();
            }
            sink.lines.lock().unwrap().1 = true;
            sink.cv.notify_all();
        });
        let mut t = Target {
            stdin: child.stdin.take(),
            child,
            pid,
            exe: self.exe,
            runtime_dir: self.runtime_dir,
            out,
            cursor: 0,
            seq: 0,
        };
        t.wait_line(&self.ready, Duration::from_secs(20));
        t
    }
}

impl Target {
    /// The pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pid as an argument.
    pub fn pid_arg(&self) -> String {
        self.pid.to_string()
    }

    /// The executable.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").expect("writing to the target");
        stdin.flush().unwrap();
    }

    /// Waits for the next line (after the last one matched) that starts with `prefix`.
    #[track_caller]
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut g = self.out.lines.lock().unwrap();
        loop {
            if let Some(i) = g.0[self.cursor..]
                .iter()
                .position(|l| l.starts_with(prefix))
            {
                self.cursor += i + 1;
                return g.0[self.cursor - 1].clone();
            }
            let now = Instant::now();
            if g.1 || now >= deadline {
                let tail: Vec<_> = g.0.iter().rev().take(10).rev().cloned().collect();
                let ended = g.1;
                drop(g);
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "target {} printed no line starting with {prefix:?} (output ended: {ended}, exit: {status:?}); last lines: {tail:#?}",
                    self.pid
                );
            }
            g = self.out.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Sends `stats <seq>` and parses the `STATS seq=<seq> k=v...` answer.
    #[track_caller]
    pub fn stats(&mut self) -> HashMap<String, u64> {
        self.seq += 1;
        let seq = self.seq;
        self.send(&format!("stats {seq}"));
        let line = self.wait_line(&format!("STATS seq={seq} "), Duration::from_secs(10));
        parse_kv(&line)
    }

    /// `true` while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Runs kgpatch with `args` against this target's agent. When kgpatch fails and the
    /// target has died, how it died is added to the output, so every assertion shows it.
    pub fn kg(&self, args: &[&str]) -> Out {
        let mut out = kgpatch(&self.runtime_dir, args);
        if out.code != 0 {
            if let Some(death) = self.death() {
                out.stderr
                    .push_str(&format!("\n*** the target process {death}\n"));
            }
        }
        out
    }

    /// How the target died, if it did (read from its zombie's `/proc/<pid>/stat`).
    pub fn death(&self) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
        if fields.first() != Some(&"Z") && fields.first() != Some(&"X") {
            return None;
        }
        // Field 52 of proc(5), the 50th after the command name: the waitpid status.
        let code: i32 = fields.get(49)?.trim().parse().ok()?;
        Some(if code & 0x7f != 0 {
            format!(
                "was killed by signal {} (core dumped: {})",
                code & 0x7f,
                code & 0x80 != 0
            )
        } else {
            format!("exited with status {}", (code >> 8) & 0xff)
        })
    }

    /// A kgpatch command for this target's agent, not yet run.
    pub fn kg_cmd(&self, args: &[&str]) -> Command {
        kgpatch_cmd(&self.runtime_dir, args)
    }

    /// `kgpatch apply <pid> <module> --timeout <timeout> --json` (read it with
    /// [`Out::outcome`] or [`Out::error`]).
    pub fn apply(&self, module: &Path, timeout: &str) -> Out {
        self.kg(&[
            "apply",
            &self.pid_arg(),
            module.to_str().unwrap(),
            "--timeout",
            timeout,
            "--json",
        ])
    }

    /// `kgpatch revert <pid> <patch> --timeout <timeout> --json`.
    pub fn revert(&self, patch: &str, timeout: &str) -> Out {
        self.kg(&[
            "revert",
            &self.pid_arg(),
            patch,
            "--timeout",
            timeout,
            "--json",
        ])
    }

    /// `kgpatch status --json`, parsed.
    #[track_caller]
    pub fn status(&self) -> Status {
        let out = self.kg(&["status", &self.pid_arg(), "--json"]);
        out.expect_code(0);
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not a Status ({e}):\n{out}"))
    }

    /// Polls `status --json` until `pred` holds (panics after `timeout`).
    #[track_caller]
    pub fn status_until(&self, timeout: Duration, pred: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "status did not reach the expected state in {timeout:?}; last: {s:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The load bias of the executable (start of its mapping at file offset 0).
    pub fn load_bias(&self) -> u64 {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)).unwrap();
        let exe = std::fs::canonicalize(&self.exe).unwrap();
        let exe = exe.to_str().unwrap();
        maps.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 6 && f[5] == exe && u64::from_str_radix(f[2], 16) == Ok(0))
                    .then(|| u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap())
            })
            .unwrap_or_else(|| panic!("no mapping of {exe} at offset 0 in:\n{maps}"))
    }

    /// The live code bytes of `sym` of the executable, from `/proc/<pid>/mem`.
    pub fn code_bytes(&self, sym: &Sym) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).unwrap();
        let mut buf = vec![0u8; sym.size as usize];
        mem.read_exact_at(&mut buf, self.load_bias() + sym.address)
            .expect("reading the target's code");
        buf
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` pairs of a line (values that are numbers).
pub fn parse_kv(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The build-id of an ELF file, as hex.
pub fn build_id(path: &Path) -> String {
    kgpatch_kmod::file_build_id(path)
        .expect("reading the build-id")
        .expect("gcc writes a build-id")
        .to_string()
}

/// Exit code 0 and a completed outcome in the `--json` output.
#[track_caller]
pub fn expect_completed(out: &Out) {
    out.expect_code(0);
    assert_eq!(out.outcome().result, OutcomeKind::Completed, "{out}");
}

/// Builds `fixtures/<source>` with `compiler` (`gcc`, `g++`) into `dir/<name>`:
/// `-O2 -g -Wall`, linked with pthreads.
pub fn build_fixture(dir: &TempDir, compiler: &str, source: &str, name: &str) -> PathBuf {
    let exe = dir.join(name);
    let src = fixture(source);
    cc(
        compiler,
        &[
            "-O2",
            "-g",
            "-Wall",
            "-o",
            exe.to_str().unwrap(),
            src.to_str().unwrap(),
            "-lpthread",
        ],
    );
    exe
}

/// Builds `fixtures/target.c` (with `amb_a.c`, `amb_b.c`) into `dir/<name>` with `-O2 -g`
/// and `flags`.
pub fn build_target(dir: &TempDir, name: &str, flags: &[&str]) -> PathBuf {
    let exe = dir.join(name);
    let (src, a, b) = (fixture("target.c"), fixture("amb_a.c"), fixture("amb_b.c"));
    let mut args = vec!["-O2", "-g", "-Wall", "-o", exe.to_str().unwrap()];
    args.extend_from_slice(flags);
    args.extend([
        src.to_str().unwrap(),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "-lpthread",
    ]);
    cc("gcc", &args);
    exe
}

/// The milliseconds the transition of an `apply`/`revert --json` took, from its outcome.
pub fn transition_ms(out: &Out) -> Option<u64> {
    let out = StatusOutput::parse(&out.stdout).ok()?;
    out.outcome().map(|o| o.elapsed_ms)
}

/// Median, p90 and max of `v` (sorted in place).
pub fn summary(v: &mut [u64]) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_unstable();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} median={} p90={} max={} ms",
        v.len(),
        p(0.5),
        p(0.9),
        v[v.len() - 1]
    )
}
