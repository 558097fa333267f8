//! `/proc/<pid>`: the one task lister, maps parser, status parser and syscall-file parser.
//!
//! Every reader here opens a file, so it allocates and may fail for reasons that prove
//! nothing about the process (`EMFILE` at the descriptor limit, `ENOMEM`): none is
//! async-signal-safe, and callers fail closed on errors. The parsers (`parse_*`,
//! [`Status::parse`]) take fixed text and are tested on both real `/proc` and fixed strings.

use std::fs;
use std::io;

/// Which process a `/proc` read is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pid {
    /// The calling process (`/proc/self`).
    This,
    /// Another process, by id (`/proc/<pid>`).
    Other(i32),
}

impl Pid {
    /// `/proc/self` or `/proc/<pid>`.
    pub fn dir(self) -> String {
        match self {
            Pid::This => "/proc/self".to_owned(),
            Pid::Other(pid) => format!("/proc/{pid}"),
        }
    }

    /// The path of `file` of task `tid` (`/proc/<pid>/task/<tid>/<file>`).
    pub fn task_file(self, tid: i32, file: &str) -> String {
        format!("{}/task/{tid}/{file}", self.dir())
    }
}

/// `true` for the errors that mean "the process or thread is gone" (`ENOENT`, `ESRCH`),
/// as opposed to errors that prove nothing (`EMFILE`, `ENOMEM`, `EACCES`...).
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// `PF_IO_WORKER` in a task's `stat` flags (include/linux/sched.h): an io_uring worker
/// (`iou-wrk-*`, `iou-sqp-*`). The kernel creates these inside the thread group of a process
/// that uses io_uring; they never return to user space, block every signal but SIGKILL and
/// SIGSTOP, and never run a byte of the program's code.
pub const PF_IO_WORKER: u64 = 0x10;

/// The thread ids of process `pid` that run user code, sorted, from `/proc/<pid>/task`.
///
/// io_uring workers ([`PF_IO_WORKER`]) are left out: they share the thread group but run
/// only kernel code, so they can neither enter a patched function nor take a signal — a
/// lister that kept them would see a thread that "blocks SIGTRAP" and one that never
/// answers a migration signal (MariaDB's InnoDB makes them under load).
///
/// Fails closed: any error opening the directory, reading one entry or one task's `stat`
/// (other than the task being gone), an entry that is not a tid, or an empty list is an
/// error, never a short list (a caller would skip a living thread).
///
/// Each task's flags are read once: tids found to run user code are remembered (per
/// process) while they stay listed, so a listing costs one `stat` read per *new* task. A
/// remembered tid that ends and is reused by an io_uring worker before the next listing
/// would be listed: the safe direction (a thread too many shows as one that blocks
/// signals, a visible refusal), never a thread hidden.
pub fn tasks(pid: Pid) -> io::Result<Vec<i32>> {
    let path = format!("{}/task", pid.dir());
    let mut listed = Vec::new();
    for entry in fs::read_dir(&path)? {
        let entry = entry?;
        let tid = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::other(format!("an entry of {path} is not a tid")))?;
        listed.push(tid);
    }
    listed.sort_unstable();
    let owner = match pid {
        Pid::This => std::process::id() as i32,
        Pid::Other(p) => p,
    };
    let mut known = USER_TASKS.lock().unwrap_or_else(|e| e.into_inner());
    // Forget tids no longer listed (and other processes' entries): a tid is remembered
    // only while it is continuously seen.
    known.retain(|&(p, t)| p != owner || listed.binary_search(&t).is_ok());
    let mut tids = Vec::with_capacity(listed.len());
    for tid in listed {
        if known.contains(&(owner, tid)) {
            tids.push(tid);
            continue;
        }
        match task_flags(pid, tid)? {
            Some(flags) if flags & PF_IO_WORKER != 0 => {}
            Some(_) => {
                known.insert((owner, tid));
                tids.push(tid);
            }
            None => {} // ended since the directory was read
        }
    }
    if tids.is_empty() {
        return Err(io::Error::other(format!("{path} listed no thread")));
    }
    Ok(tids)
}

/// `(pid, tid)` of tasks seen to run user code, while they stay listed ([`tasks`]).
static USER_TASKS: std::sync::Mutex<std::collections::BTreeSet<(i32, i32)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The kernel's `PF_*` flags of a `stat` line (field 9).
pub fn parse_stat_flags(text: &str) -> Option<u64> {
    // After the comm: state is field 3, so flags (9) is the 7th word.
    text.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()
}

/// The `PF_*` flags of thread `tid` of `pid`; `Ok(None)` when the thread is gone.
pub fn task_flags(pid: Pid, tid: i32) -> io::Result<Option<u64>> {
    match fs::read_to_string(pid.task_file(tid, "stat")) {
        Ok(text) => parse_stat_flags(&text)
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("no flags in stat of task {tid}"))),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `r`.
    pub read: bool,
    /// `w`.
    pub write: bool,
    /// `x`.
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
    /// Offset in the mapped file.
    pub offset: u64,
    /// Inode of the mapped file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-path (`[stack]`, `[heap]`, `[vdso]`...; empty for anonymous
    /// memory; a deleted file ends with ` (deleted)`).
    pub path: String,
}

impl Mapping {
    /// `true` for the main thread's grow-down stack (`[stack]`).
    pub fn is_main_stack(&self) -> bool {
        self.path == "[stack]"
    }

    /// `true` for the program break heap (`[heap]`).
    pub fn is_heap(&self) -> bool {
        self.path == "[heap]"
    }
}

/// Parses one maps line; `None` if it is not one.
pub fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut field = || {
        let t = rest.trim_start_matches(' ');
        let end = t.find(' ').unwrap_or(t.len());
        let (f, r) = t.split_at(end);
        rest = r;
        (!f.is_empty()).then_some(f)
    };
    let (range, perms, offset, _dev, inode) = (field()?, field()?, field()?, field()?, field()?);
    let (start, end) = range.split_once('-')?;
    let perms = perms.as_bytes();
    if perms.len() < 4 {
        return None;
    }
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path: rest.trim_start_matches(' ').to_owned(),
    })
}

/// Parses the text of a maps file, in its order (the kernel's: by address). Lines that do
/// not parse are left out.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// The mappings of process `pid`, from `/proc/<pid>/maps`.
pub fn maps(pid: Pid) -> io::Result<Vec<Mapping>> {
    Ok(parse_maps(&fs::read_to_string(format!(
        "{}/maps",
        pid.dir()
    ))?))
}

/// The fields of a `/proc/<pid>[/task/<tid>]/status` file kgpatch reads. A field the
/// kernel did not show is `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// `State:` letter (`R`, `S`, `D`, `T`, `t`, `Z`, `X`...).
    pub state: Option<char>,
    /// `Tgid:` (the process).
    pub tgid: Option<i32>,
    /// `TracerPid:` (0 when not traced).
    pub tracer_pid: Option<i32>,
    /// `Uid:` real, effective, saved, filesystem.
    pub uid: Option<[u32; 4]>,
    /// `SigPnd:` signals pending for this thread.
    pub sig_pnd: Option<u64>,
    /// `ShdPnd:` signals pending for the whole process.
    pub shd_pnd: Option<u64>,
    /// `SigBlk:` signals the thread blocks.
    pub sig_blk: Option<u64>,
    /// `SigIgn:` signals ignored.
    pub sig_ign: Option<u64>,
    /// `SigCgt:` signals with a handler.
    pub sig_cgt: Option<u64>,
    /// `CapEff:` effective capabilities (bit `n` for capability `n`).
    pub cap_eff: Option<u64>,
    /// `Seccomp:` mode: 0 none, 1 strict, 2 filter.
    pub seccomp: Option<u32>,
    /// `x86_Thread_features:` lists `shstk`: the thread runs with a shadow stack.
    pub shadow_stack: Option<bool>,
    /// `Threads:` (the process's thread count).
    pub threads: Option<u32>,
    /// `VmRSS:` resident memory, KiB.
    pub vm_rss_kib: Option<u64>,
}

impl Status {
    /// Parses status text. Unknown and malformed fields are left `None`.
    pub fn parse(text: &str) -> Status {
        let mut s = Status::default();
        for line in text.lines() {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            let mask = || u64::from_str_radix(value, 16).ok();
            match name {
                "State" => s.state = value.chars().next(),
                "Tgid" => s.tgid = value.parse().ok(),
                "TracerPid" => s.tracer_pid = value.parse().ok(),
                "Uid" => {
                    let mut ids = [0u32; 4];
                    let mut words = value.split_whitespace();
                    let all = ids.iter_mut().all(|id| {
                        words
                            .next()
                            .and_then(|w| w.parse().ok())
                            .map(|v| *id = v)
                            .is_some()
                    });
                    s.uid = (all && words.next().is_none()).then_some(ids);
                }
                "SigPnd" => s.sig_pnd = mask(),
                "ShdPnd" => s.shd_pnd = mask(),
                "SigBlk" => s.sig_blk = mask(),
                "SigIgn" => s.sig_ign = mask(),
                "SigCgt" => s.sig_cgt = mask(),
                "CapEff" => s.cap_eff = mask(),
                "Seccomp" => s.seccomp = value.parse().ok(),
                "Threads" => s.threads = value.parse().ok(),
                "VmRSS" => {
                    s.vm_rss_kib = value.strip_suffix("kB").and_then(|v| v.trim().parse().ok())
                }
                "x86_Thread_features" => {
                    s.shadow_stack = Some(value.split_whitespace().any(|f| f == "shstk"))
                }
                _ => {}
            }
        }
        s
    }

    /// `true` for a zombie or dead task (`State: Z` or `X`): it runs no more user code.
    pub fn exiting(&self) -> bool {
        matches!(self.state, Some('Z' | 'X'))
    }
}

/// The status of thread `tid` of process `pid`; `Ok(None)` when the thread is gone (see
/// [`is_gone`]). Any other failure is an error: it proves nothing about the thread.
pub fn task_status(pid: Pid, tid: i32) -> io::Result<Option<Status>> {
    match fs::read_to_string(pid.task_file(tid, "status")) {
        Ok(text) => Ok(Some(Status::parse(&text))),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The status of process `pid` (`/proc/<pid>/status`: its main thread's view).
pub fn status(pid: Pid) -> io::Result<Status> {
    Ok(Status::parse(&fs::read_to_string(format!(
        "{}/status",
        pid.dir()
    ))?))
}

/// What `/proc/<pid>/task/<tid>/syscall` says about a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syscall {
    /// The thread is running or runnable (in user mode or preempted): no stable pc.
    Running,
    /// The thread is blocked in the kernel, at user stack pointer `sp` and pc `pc`.
    Blocked {
        /// The system call number, `-1` when blocked outside a system call.
        nr: i64,
        /// User stack pointer.
        sp: u64,
        /// User program counter (just after the `syscall` instruction).
        pc: u64,
    },
}

/// Parses a syscall file: `running`, `-1 <sp> <pc>`, or `<nr> <6 args> <sp> <pc>`.
pub fn parse_syscall(text: &str) -> Option<Syscall> {
    let text = text.trim();
    if text == "running" {
        return Some(Syscall::Running);
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < 3 {
        return None;
    }
    let hex = |w: &str| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok();
    Some(Syscall::Blocked {
        nr: words[0].parse().ok()?,
        sp: hex(words[words.len() - 2])?,
        pc: hex(words[words.len() - 1])?,
    })
}

/// A thread blocked in a system call, as its syscall file shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InSyscall {
    /// The system call number (never negative).
    pub nr: i64,
    /// Its six arguments (`rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9`).
    pub args: [u64; 6],
}

/// Parses a syscall file of a thread blocked in a system call: `<nr> <6 args> <sp> <pc>`;
/// `None` for `running`, for `-1 <sp> <pc>` (blocked outside a system call) and for text
/// that is not a syscall file.
pub fn parse_syscall_args(text: &str) -> Option<InSyscall> {
    let Syscall::Blocked { nr, .. } = parse_syscall(text)? else {
        return None;
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    if nr < 0 || words.len() != 9 {
        return None;
    }
    let mut args = [0u64; 6];
    for (a, w) in args.iter_mut().zip(&words[1..7]) {
        *a = u64::from_str_radix(w.trim_start_matches("0x"), 16).ok()?;
    }
    Some(InSyscall { nr, args })
}

/// The system call thread `tid` of `pid` is blocked in, with its arguments; `None` while it
/// runs or is blocked outside a system call, when it is gone, or when the file cannot be
/// read (the kernel hides it without ptrace rights).
pub fn task_syscall(pid: Pid, tid: i32) -> Option<InSyscall> {
    parse_syscall_args(&fs::read_to_string(pid.task_file(tid, "syscall")).ok()?)
}

/// The state letter of a `/proc/<pid>/task/<tid>/stat` line (the field after the
/// parenthesised name, which may itself hold spaces and parentheses).
pub fn parse_stat_state(text: &str) -> Option<char> {
    text.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// User plus system CPU time in clock ticks (`utime` + `stime`, fields 14 and 15) from a
/// `stat` file's text.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let mut after = text.rsplit_once(')')?.1.split_whitespace();
    // After the comm: state is field 3, so utime (14) is the 12th word and stime the 13th.
    let utime: u64 = after.nth(11)?.parse().ok()?;
    let stime: u64 = after.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time process `pid` has used, in clock ticks (all its threads).
pub fn cpu_ticks(pid: Pid) -> io::Result<u64> {
    let text = fs::read_to_string(format!("{}/stat", pid.dir()))?;
    parse_stat_cpu_ticks(&text).ok_or_else(|| io::Error::other("no utime/stime in stat"))
}

/// The state letter of thread `tid` of `pid` (`R`, `S`, `D`, `T`, `t`, `Z`, `X`...), from
/// its `stat` file (cheaper for the kernel to produce than `status`); `Ok(None)` when the
/// thread is gone (see [`is_gone`]).
pub fn task_state(pid: Pid, tid: i32) -> io::Result<Option<char>> {
    match fs::read_to_string(pid.task_file(tid, "stat")) {
        Ok(text) => parse_stat_state(&text)
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("no state in stat of task {tid}"))),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where thread `tid` of `pid` is blocked, `(sp, pc)`; `None` while it runs, when it is
/// gone, or when the file cannot be read (the kernel hides it without ptrace rights).
pub fn parked(pid: Pid, tid: i32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(pid.task_file(tid, "syscall")).ok()?;
    match parse_syscall(&text)? {
        Syscall::Running => None,
        Syscall::Blocked { sp, pc, .. } => Some((sp, pc)),
    }
}

/// The name of thread `tid` of `pid` (`comm`, without its newline).
pub fn task_comm(pid: Pid, tid: i32) -> io::Result<String> {
    let mut name = fs::read_to_string(pid.task_file(tid, "comm"))?;
    name.truncate(name.trim_end().len());
    Ok(name)
}

/// The name of process `pid` (`/proc/<pid>/comm`, without its newline).
pub fn comm(pid: Pid) -> io::Result<String> {
    let mut name = fs::read_to_string(format!("{}/comm", pid.dir()))?;
    name.truncate(name.trim_end().len());
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thread::{getpid, gettid};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A thread that runs `setup`, then sleeps in a channel receive until `end` is called.
    struct Sleeper {
        tid: i32,
        stop: mpsc::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Sleeper {
        fn start(setup: impl FnOnce() + Send + 'static) -> Sleeper {
            let (tx, rx) = mpsc::channel();
            let (stop, stop_rx) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                setup();
                tx.send(gettid()).unwrap();
                let _ = stop_rx.recv();
            });
            let tid = rx.recv().unwrap();
            Sleeper { tid, stop, thread }
        }

        fn end(self) {
            drop(self.stop);
            self.thread.join().unwrap();
        }
    }

    const MAPS: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 08:01 1234567                    /usr/bin/cat
55d0c8a02000-55d0c8a07000 r-xp 00002000 08:01 1234567                    /usr/bin/cat
55d0c9b1e000-55d0c9b3f000 rw-p 00000000 00:00 0                          [heap]
7f3a1c000000-7f3a1c021000 rw-s 00000000 00:01 42                         /memfd:x (deleted)
7f3a1d000000-7f3a1d001000 ---p 00000000 00:00 0 
7f3a1d200000-7f3a1d228000 r--p 00000000 08:01 7654321                    /usr/lib/my lib.so
7ffc3e1f0000-7ffc3e211000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
not a mapping
";

    #[test]
    fn maps_parse_fixed_text() {
        let m = parse_maps(MAPS);
        assert_eq!(m.len(), 8);
        assert_eq!(
            m[1],
            Mapping {
                start: 0x55d0c8a02000,
                end: 0x55d0c8a07000,
                read: true,
                write: false,
                exec: true,
                shared: false,
                offset: 0x2000,
                inode: 1234567,
                path: "/usr/bin/cat".into(),
            }
        );
        assert!(m[2].is_heap() && m[2].write && !m[2].exec);
        assert!(m[3].shared && m[3].path == "/memfd:x (deleted)");
        assert!(m[4].path.is_empty() && !m[4].read);
        assert_eq!(m[5].path, "/usr/lib/my lib.so");
        assert!(m[6].is_main_stack());
        assert_eq!(m[7].end, 0xffffffffff601000);
    }

    #[test]
    fn maps_of_this_process_hold_our_code_stack_and_data() {
        let m = maps(Pid::This).unwrap();
        let code = maps_parse_fixed_text as fn() as usize as u64;
        let here = m.iter().find(|m| m.start <= code && code < m.end).unwrap();
        assert!(here.exec && here.read && !here.write);
        let local = 0u64;
        let sp = &local as *const u64 as u64;
        let stack = m.iter().find(|m| m.start <= sp && sp < m.end).unwrap();
        assert!(stack.read && stack.write && !stack.exec);
        assert!(m.iter().any(Mapping::is_main_stack));
        assert!(m.windows(2).all(|w| w[0].end <= w[1].start));
        assert!(maps(Pid::Other(getpid())).unwrap().len() > 5);
    }

    #[test]
    fn tasks_list_a_new_thread_until_it_ends() {
        let sleeper = Sleeper::start(|| {});
        let tid = sleeper.tid;
        let listed = tasks(Pid::This).unwrap();
        assert!(listed.contains(&tid) && listed.contains(&gettid()) && listed.contains(&getpid()));
        assert!(listed.windows(2).all(|w| w[0] < w[1]));
        assert!(tasks(Pid::Other(getpid())).unwrap().contains(&tid));
        sleeper.end();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while tasks(Pid::This).unwrap().contains(&tid) {
            assert!(std::time::Instant::now() < deadline, "{tid} still listed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(task_status(Pid::This, tid).unwrap().is_none());
    }

    #[test]
    fn tasks_of_a_missing_process_fail() {
        // pid_max is at most 2^22: this pid cannot exist.
        let e = tasks(Pid::Other(1 << 23)).unwrap_err();
        assert!(is_gone(&e), "{e}");
    }

    /// What the readers return in a child with every descriptor taken (EMFILE): errors,
    /// never an empty list or "gone". The exit code says which check failed.
    fn readers_without_descriptors() -> i32 {
        let me = gettid();
        match tasks(Pid::This) {
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {}
            _ => return 2,
        }
        match task_status(Pid::This, me) {
            Err(e) if !is_gone(&e) => {}
            _ => return 3,
        }
        if maps(Pid::This).is_ok() || status(Pid::This).is_ok() || comm(Pid::This).is_ok() {
            return 4;
        }
        0
    }

    /// Runs `readers_without_descriptors` in a forked child (glibc's fork keeps malloc
    /// usable in the child) after it used up its descriptors; its exit status.
    #[allow(unsafe_code)]
    fn in_child_without_descriptors() -> i32 {
        // SAFETY: the child only allocates (fork-safe in glibc), makes system calls and
        // leaves with `_exit`, running no destructor and no atexit handler of the parent.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            // SAFETY: plain system calls on the child's own descriptor table; `_exit` ends
            // the child at once.
            unsafe {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    libc::_exit(1);
                }
                while libc::dup(0) >= 0 {}
                let code = if crate::thread::errno() == libc::EMFILE {
                    readers_without_descriptors()
                } else {
                    1
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn readers_fail_closed_at_the_descriptor_limit() {
        assert_eq!(in_child_without_descriptors(), 0);
    }

    const STATUS: &str = "\
Name:\tredis-server
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Pid:\t4250
TracerPid:\t0
Uid:\t1000\t1000\t1000\t1000
SigQ:\t0/63371
SigPnd:\t0000000000000000
ShdPnd:\t0000000200000000
SigBlk:\tfffffffe7ffbfeff
SigIgn:\t0000000000001000
SigCgt:\t0000000100004a02
CapEff:\t000001ffffffffff
Seccomp:\t2
x86_Thread_features:\tshstk wrss
x86_Thread_features_locked:\t
";

    #[test]
    fn status_parses_fixed_text() {
        let s = Status::parse(STATUS);
        assert_eq!(s.state, Some('S'));
        assert_eq!(s.tgid, Some(4242));
        assert_eq!(s.tracer_pid, Some(0));
        assert_eq!(s.uid, Some([1000; 4]));
        assert_eq!(s.sig_pnd, Some(0));
        assert_eq!(s.shd_pnd, Some(0x2_0000_0000));
        assert_eq!(s.sig_blk, Some(0xfffffffe7ffbfeff));
        assert_eq!(s.sig_ign, Some(0x1000));
        assert_eq!(s.sig_cgt, Some(0x100004a02));
        assert_eq!(s.cap_eff, Some(0x1ff_ffff_ffff));
        assert_eq!(s.seccomp, Some(2));
        assert_eq!(s.shadow_stack, Some(true));
        assert_eq!(
            Status::parse("x86_Thread_features:\t\n").shadow_stack,
            Some(false)
        );
        assert!(!s.exiting());
        assert!(Status::parse("State:\tZ (zombie)\n").exiting());
        assert!(Status::parse("State:\tX (dead)\n").exiting());
        let empty = Status::parse("SigBlk:\tnot hex\n");
        assert_eq!(empty, Status::default());
    }

    #[test]
    fn status_of_a_real_thread_shows_what_it_blocks() {
        let sleeper = Sleeper::start(|| block(&mut sigset_of(libc::SIGUSR2)));
        let tid = sleeper.tid;
        let s = task_status(Pid::This, tid).unwrap().unwrap();
        assert_eq!(s.tgid, Some(getpid()));
        assert!(crate::signal::SigMask(s.sig_blk.unwrap()).has(libc::SIGUSR2));
        assert!(!s.exiting());
        let me = status(Pid::This).unwrap();
        // SAFETY: getuid has no preconditions.
        #[allow(unsafe_code)]
        let uid = unsafe { libc::getuid() };
        assert_eq!(me.uid.unwrap()[0], uid);
        // SAFETY: PR_GET_SECCOMP takes no pointer; it returns the calling thread's mode.
        #[allow(unsafe_code)]
        let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP) };
        assert_eq!(me.seccomp, Some(mode as u32));
        assert!(me.cap_eff.is_some());
        sleeper.end();
    }

    fn sigset_of(sig: libc::c_int) -> libc::sigset_t {
        #[allow(unsafe_code)]
        // SAFETY: a zeroed sigset is valid input to sigemptyset and sigaddset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            set
        }
    }

    fn block(set: &mut libc::sigset_t) {
        #[allow(unsafe_code)]
        // SAFETY: `set` is a valid sigset; the mask affects only the calling test thread.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut());
        }
    }

    #[test]
    fn syscall_parses_fixed_text() {
        assert_eq!(parse_syscall("running\n"), Some(Syscall::Running));
        assert_eq!(
            parse_syscall("230 0x0 0x0 0x7fff1e7ca7f0 0x0 0x0 0x0 0x7fff1e7ca7e8 0x7fa82c465503\n"),
            Some(Syscall::Blocked {
                nr: 230,
                sp: 0x7fff1e7ca7e8,
                pc: 0x7fa82c465503
            })
        );
        assert_eq!(
            parse_syscall("-1 0x7ffd0 0x401000"),
            Some(Syscall::Blocked {
                nr: -1,
                sp: 0x7ffd0,
                pc: 0x401000
            })
        );
        assert_eq!(parse_syscall(""), None);
        assert_eq!(parse_syscall("0x10"), None);
    }

    #[test]
    fn syscall_args_parse_fixed_text() {
        assert_eq!(
            parse_syscall_args(
                "281 0x3 0x7f00 0x80 0xffffffffffffffff 0x0 0x8 0x7fff1e7ca7e8 0x7fa82c465503\n"
            ),
            Some(InSyscall {
                nr: 281,
                args: [3, 0x7f00, 0x80, u64::MAX, 0, 8]
            })
        );
        assert_eq!(parse_syscall_args("running\n"), None);
        assert_eq!(parse_syscall_args("-1 0x7ffd0 0x401000"), None);
        assert_eq!(parse_syscall_args("7 0x1 0x2 0x7ffd0 0x401000"), None);
        assert_eq!(
            parse_syscall_args("7 0x1 0x2 zz 0x0 0x0 0x0 0x7ffd0 0x401000"),
            None
        );
    }

    #[test]
    fn a_thread_asleep_in_a_futex_shows_it_in_its_syscall_args() {
        let sleeper = Sleeper::start(|| {});
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let blocked = loop {
            if let Some(b) = task_syscall(Pid::This, sleeper.tid) {
                break b;
            }
            assert!(std::time::Instant::now() < deadline, "never blocked");
            std::thread::sleep(Duration::from_millis(1));
        };
        // a channel receive sleeps in futex(2)
        assert_eq!(blocked.nr, libc::SYS_futex);
        sleeper.end();
    }

    #[test]
    fn stat_cpu_ticks_and_status_counts_parse() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(22));
        assert_eq!(parse_stat_cpu_ticks("42 (x) S 1"), None);
        let s = Status::parse("Threads:\t3\nVmRSS:\t  1234 kB\n");
        assert_eq!((s.threads, s.vm_rss_kib), (Some(3), Some(1234)));
        let me = status(Pid::This).unwrap();
        assert!(me.threads.is_some_and(|n| n >= 1) && me.vm_rss_kib.is_some_and(|k| k > 0));
        assert!(cpu_ticks(Pid::This).is_ok());
    }

    #[test]
    fn stat_flags_parse_fixed_and_real_text() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194368 100 0";
        assert_eq!(parse_stat_flags(line), Some(4194368));
        assert_eq!(parse_stat_flags("42 (x) S 1 2"), None);
        let mine = task_flags(Pid::This, gettid()).unwrap().unwrap();
        assert_eq!(mine & PF_IO_WORKER, 0);
        assert!(task_flags(Pid::This, 1 << 23).unwrap().is_none());
    }

    #[test]
    fn stat_state_parses_fixed_and_real_text() {
        assert_eq!(parse_stat_state("42 (a (b) c) S 1 42 42 0"), Some('S'));
        assert_eq!(parse_stat_state("42 (x) Z 1"), Some('Z'));
        assert_eq!(parse_stat_state("42 (x"), None);
        let sleeper = Sleeper::start(|| {});
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while task_state(Pid::This, sleeper.tid).unwrap() != Some('S') {
            assert!(std::time::Instant::now() < deadline, "never asleep");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(task_state(Pid::This, gettid()).unwrap(), Some('R'));
        let tid = sleeper.tid;
        sleeper.end();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while task_state(Pid::This, tid).unwrap().is_some() {
            assert!(std::time::Instant::now() < deadline, "{tid} still there");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_sleeping_thread_is_parked_in_its_syscall() {
        let sleeper = Sleeper::start(|| {});
        let tid = sleeper.tid;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (sp, pc) = loop {
            if let Some(p) = parked(Pid::This, tid) {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "never parked");
            std::thread::sleep(Duration::from_millis(1));
        };
        // The pc is in executable code of this process, the sp in a writable mapping.
        let m = maps(Pid::This).unwrap();
        assert!(m.iter().any(|m| m.exec && m.start <= pc && pc < m.end));
        assert!(m.iter().any(|m| m.write && m.start <= sp && sp < m.end));
        sleeper.end();
        // A spinning thread is running (or preempted): never parked.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let spin = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                tx.send(gettid()).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let tid = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let text = fs::read_to_string(Pid::This.task_file(tid, "syscall")).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spin.join().unwrap();
        assert_eq!(parse_syscall(&text), Some(Syscall::Running), "{text}");
    }

    #[test]
    fn comm_names_threads() {
        let t = std::thread::Builder::new()
            .name("kgsys-comm".into())
            .spawn(|| task_comm(Pid::This, gettid()).unwrap())
            .unwrap();
        assert_eq!(t.join().unwrap(), "kgsys-comm");
        assert!(!comm(Pid::This).unwrap().is_empty());
    }
}
