//! The injection: prechecks, the choice of the thread to borrow, and the ptrace sequence.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kgpatch_sys::proc::{self, Pid, Status};
use kgpatch_sys::ptrace::{self, ProcMem, Regs, Stop};

use crate::target::{self, Libc, LibcProblem};
use crate::x86_64::{self as boot, off, state};
use crate::{AttachError, AttachOptions, AttachReport, AGENT_FILE_NAME};

const CAP_SYS_PTRACE: u64 = 1 << 19;
const PROT_RWX: u64 = 7;
const MAP_PRIVATE_ANON: u64 = 0x22;
/// Rounds over the threads looking for one at a safe point.
const ROUNDS: u32 = 20;

struct Prepared {
    libc: Libc,
    agent: Vec<u8>,
    runtime: Vec<u8>,
    threads: usize,
}

/// Inject the agent into `pid`: see the crate docs. Returns `already: true` without
/// touching the process when the agent is mapped there already.
pub fn attach(pid: i32, opts: &AttachOptions) -> Result<AttachReport, AttachError> {
    let t0 = Instant::now();
    let prep = match precheck(pid, opts)? {
        Some(p) => p,
        None => {
            return Ok(AttachReport {
                pid,
                already: true,
                bootstrap_left: None,
                tid: 0,
                syscall: None,
                pause: Duration::ZERO,
                total: t0.elapsed(),
                threads: proc::tasks(Pid::Other(pid)).map(|t| t.len()).unwrap_or(0),
            })
        }
    };
    let mem = ProcMem::open(pid).map_err(|e| io_or_gone(pid, "opening /proc/<pid>/mem", e))?;
    // the gadget must be what the file says: the mapping is the file we read
    let mut two = [0u8; 2];
    mem.read(prep.libc.syscall_gadget, &mut two)
        .map_err(|e| io_or_gone(pid, "reading libc's text", e))?;
    if two != [0x0f, 0x05] {
        return Err(AttachError::CannotLoad {
            pid,
            why: format!("libc in memory differs from {}", prep.libc.path),
        });
    }
    let held = borrow_thread(pid, &prep.libc, opts.timeout)?;
    let old = ptrace::block_termination_signals();
    let others = if opts.stop_the_world {
        stop_others(pid, held.tid, opts.timeout)
    } else {
        Vec::new()
    };
    let injected = inject(pid, &held, &prep, &mem, opts.timeout);
    for (tid, sig) in others {
        let _ = ptrace::detach(tid, sig);
    }
    ptrace::restore_thread_sigmask(&old);
    let (base, pause) = injected?;
    let answer = wait_answer(pid, &mem, base, opts.timeout);
    // The bootstrap thread unmaps its mapping once it has seen both acknowledgements (it
    // polls every millisecond): return only when it is gone, so the caller finds the
    // process as it was, or say that it stays.
    let bootstrap_left = !bootstrap_unmapped(pid, base, BOOTSTRAP_EXIT);
    let answer = answer?;
    Ok(AttachReport {
        pid,
        bootstrap_left: bootstrap_left.then_some(base),
        already: answer,
        tid: held.tid,
        syscall: held.syscall,
        pause,
        total: t0.elapsed(),
        threads: prep.threads,
    })
}

/// How long the bootstrap thread gets to unmap its mapping after the answer was read.
const BOOTSTRAP_EXIT: Duration = Duration::from_secs(2);

/// Waits until process `pid` no longer maps the bootstrap at `base` (or is gone); `false`
/// if it still does after `t`, or its maps cannot be read.
fn bootstrap_unmapped(pid: i32, base: u64, t: Duration) -> bool {
    let start = Instant::now();
    loop {
        match proc::maps(Pid::Other(pid)) {
            Ok(maps) if !maps.iter().any(|m| m.start == base) => return true,
            Ok(_) => {}
            Err(e) => return proc::is_gone(&e),
        }
        if start.elapsed() >= t {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn io_or_gone(pid: i32, what: &str, e: std::io::Error) -> AttachError {
    if !Path::new(&Pid::Other(pid).dir()).exists() || e.raw_os_error() == Some(libc::ESRCH) {
        return AttachError::TargetExited { pid };
    }
    // A process killed meanwhile reads as end-of-file through /proc/<pid>/mem once its
    // memory is gone, a moment before it shows as a zombie: give it that moment.
    if e.kind() == std::io::ErrorKind::UnexpectedEof && exits_soon(pid) {
        return AttachError::TargetExited { pid };
    }
    AttachError::Io {
        pid,
        what: what.to_string(),
        source: e,
    }
}

fn precheck(pid: i32, opts: &AttachOptions) -> Result<Option<Prepared>, AttachError> {
    let status = match proc::status(Pid::Other(pid)) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AttachError::NoSuchProcess { pid })
        }
        Err(e) => return Err(io_or_gone(pid, "reading its status", e)),
    };
    if status.exiting() {
        return Err(AttachError::TargetExited { pid });
    }
    let tracer = status.tracer_pid.unwrap_or(0);
    if tracer != 0 {
        return Err(AttachError::AlreadyTraced { pid, tracer });
    }
    permission(pid, &status)?;
    let mode = status.seccomp.unwrap_or(0);
    if mode != 0 {
        return Err(AttachError::Seccomp {
            pid,
            mode: mode.into(),
        });
    }
    if status.shadow_stack == Some(true) {
        return Err(AttachError::ShadowStack { pid });
    }
    let agent = &opts.agent_path;
    let bytes = agent.as_os_str().as_encoded_bytes();
    if !agent.is_absolute() || bytes.len() >= 4095 || bytes.contains(&0) {
        return Err(AttachError::BadAgentPath(agent.clone()));
    }
    let root = PathBuf::from(format!("{}/root", Pid::Other(pid).dir()));
    let maps = proc::maps(Pid::Other(pid)).map_err(|e| io_or_gone(pid, "reading its maps", e))?;
    let agent_name = agent.file_name();
    if maps.iter().any(|m| {
        let n = Path::new(&m.path).file_name();
        n.is_some() && (n == agent_name || n.and_then(|n| n.to_str()) == Some(AGENT_FILE_NAME))
    }) {
        return Ok(None);
    }
    let looked = root.join(agent.strip_prefix("/").unwrap_or(agent));
    if !std::fs::metadata(&looked).is_ok_and(|m| m.is_file()) {
        return Err(AttachError::AgentNotVisible {
            pid,
            agent: agent.clone(),
            looked,
        });
    }
    let runtime = match &opts.runtime_dir {
        None => Vec::new(),
        Some(d) => {
            let b = d.as_os_str().as_encoded_bytes();
            if b.len() as u64 >= off::RUNTIME_DIR_MAX - 1 || b.contains(&0) {
                return Err(AttachError::BadRuntimeDir(d.clone()));
            }
            b.to_vec()
        }
    };
    let libc = target::find_libc(&maps, &root).map_err(|p| AttachError::CannotLoad {
        pid,
        why: match p {
            LibcProblem::NotShared => "it has no shared libc mapped (a static binary?)".into(),
            LibcProblem::Deleted(p) => format!("its libc {p} was deleted or replaced on disk"),
            LibcProblem::Unreadable(p, e) => format!("cannot read {}: {e}", p.display()),
            LibcProblem::Missing(p, s) => format!("{p} has no {s} (glibc older than 2.34?)"),
            LibcProblem::NoGadget => "no syscall instruction in libc's text".into(),
            LibcProblem::Parse(e) => format!("cannot parse its libc: {e}"),
        },
    })?;
    let threads = proc::tasks(Pid::Other(pid))
        .map_err(|e| io_or_gone(pid, "listing its threads", e))?
        .len();
    Ok(Some(Prepared {
        libc,
        agent: bytes.to_vec(),
        runtime,
        threads,
    }))
}

fn permission(pid: i32, status: &Status) -> Result<(), AttachError> {
    let me = proc::status(Pid::This).map_err(|e| AttachError::Io {
        pid,
        what: "reading /proc/self/status".into(),
        source: e,
    })?;
    let cap = me.cap_eff.unwrap_or(0) & CAP_SYS_PTRACE != 0;
    let my_uid = me.uid.map_or(u32::MAX, |u| u[1]);
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if yama >= 3 {
        return Err(AttachError::Permission {
            pid,
            why: "Yama ptrace_scope is 3: no process may trace another until reboot".into(),
        });
    }
    if !cap {
        if yama == 2 {
            return Err(AttachError::Permission {
                pid,
                why: "Yama ptrace_scope is 2: only CAP_SYS_PTRACE may trace".into(),
            });
        }
        let uids = status.uid.unwrap_or([u32::MAX; 4]);
        if uids[..3].iter().any(|&u| u != my_uid) {
            return Err(AttachError::Permission {
                pid,
                why: format!("it runs as uid {uids:?} and we as uid {my_uid}"),
            });
        }
    }
    Ok(())
}

/// A thread we hold in a ptrace stop, with what it had.
struct Held {
    tid: i32,
    syscall: Option<i64>,
    regs: Regs,
    xstate: Vec<u8>,
    mask: u64,
    stopped_at: Instant,
}

fn ptrace_err(pid: i32, e: ptrace::PtraceError) -> AttachError {
    if e.is_gone() && (!Path::new(&Pid::Other(pid).dir()).exists() || exits_soon(pid)) {
        return AttachError::TargetExited { pid };
    }
    AttachError::Ptrace { pid, source: e }
}

fn in_ranges(ranges: &[(u64, u64)], pc: u64) -> bool {
    ranges.iter().any(|&(s, e)| pc >= s && pc < e)
}

/// `pid` is gone, a zombie or dead, now or within 100 ms.
fn exits_soon(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        let exiting = proc::status(Pid::Other(pid)).map_or(true, |s| s.exiting());
        if exiting || Instant::now() > deadline {
            return exiting;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Thread `tid` of `pid` is gone, a zombie or dead.
fn exiting(pid: i32, tid: i32) -> bool {
    !matches!(proc::task_state(Pid::Other(pid), tid), Ok(Some(st)) if !matches!(st, 'Z' | 'X' | 'x'))
}

fn rank(pid: i32, tid: i32) -> Option<u8> {
    // a thread in uninterruptible sleep would not stop in time
    let st = proc::task_state(Pid::Other(pid), tid).ok()??;
    if st != 'S' && st != 'R' {
        return None;
    }
    match proc::task_syscall(Pid::Other(pid), tid) {
        Some(s) => target::syscall_rank(s.nr, s.args),
        None => Some(3),
    }
}

/// Seize and interrupt one thread at a safe point; every thread we try and reject is let
/// go at once.
fn borrow_thread(pid: i32, libc: &Libc, timeout: Duration) -> Result<Held, AttachError> {
    let stop_wait = timeout.min(Duration::from_secs(2));
    for round in 0..ROUNDS {
        let tids =
            proc::tasks(Pid::Other(pid)).map_err(|e| io_or_gone(pid, "listing its threads", e))?;
        if tids.is_empty() {
            return Err(AttachError::TargetExited { pid });
        }
        // read /proc only until four threads asleep in a harmless call are found: with
        // 1,000 threads a full scan costs the machine more than the injection
        let mut cands: Vec<(u8, i32)> = Vec::new();
        let mut best = 0;
        for &t in &tids {
            if let Some(r) = rank(pid, t) {
                cands.push((r, t));
                best += usize::from(r == 0);
                if best >= 4 {
                    break;
                }
            }
        }
        cands.sort_unstable();
        for &(_, tid) in cands.iter().take(4) {
            match ptrace::seize(tid, libc::PTRACE_O_TRACESYSGOOD as u32) {
                Ok(()) => {}
                Err(e) if e.is_gone() => continue,
                Err(ptrace::PtraceError::Os { err, .. })
                    if err.raw_os_error() == Some(libc::EPERM) =>
                {
                    // the kernel also says EPERM for a thread that is exiting
                    std::thread::sleep(Duration::from_millis(10));
                    if exiting(pid, pid) {
                        return Err(AttachError::TargetExited { pid });
                    }
                    if exiting(pid, tid) {
                        continue;
                    }
                    return Err(AttachError::Permission {
                        pid,
                        why: format!("the kernel refused PTRACE_SEIZE ({err}; Yama, a dumpable flag or another tracer)"),
                    });
                }
                Err(e) => return Err(ptrace_err(pid, e)),
            }
            if let Err(e) = ptrace::interrupt(tid) {
                // seized but not stoppable: it is gone
                if e.is_gone() {
                    continue;
                }
                return Err(ptrace_err(pid, e));
            }
            let stop = match ptrace::wait_stop(tid, stop_wait) {
                Ok(s) => s,
                Err(e @ ptrace::PtraceError::Timeout { .. }) => {
                    // it will stop when it leaves the kernel: wait for that once more and
                    // let it go, rather than leave it to stop with nobody to resume it
                    if let Ok(Stop::Interrupt | Stop::Syscall | Stop::Event(_)) =
                        ptrace::wait_stop(tid, timeout)
                    {
                        let _ = ptrace::detach(tid, 0);
                    }
                    return Err(ptrace_err(pid, e));
                }
                Err(e) => return Err(ptrace_err(pid, e)),
            };
            match stop {
                Stop::Interrupt => {}
                Stop::Signal(sig) => {
                    // it was about to take a signal: let it have it, unchanged
                    let _ = ptrace::detach(tid, sig);
                    continue;
                }
                Stop::Exited(_) | Stop::Killed(_) => {
                    if !Path::new(&Pid::Other(pid).dir()).exists() {
                        return Err(AttachError::TargetExited { pid });
                    }
                    continue;
                }
                Stop::Syscall | Stop::Event(_) => {
                    let _ = ptrace::detach(tid, 0);
                    continue;
                }
            }
            let stopped_at = Instant::now();
            let regs = match ptrace::get_regs(tid) {
                Ok(r) => r,
                Err(e) => {
                    let _ = ptrace::detach(tid, 0);
                    return Err(ptrace_err(pid, e));
                }
            };
            let nr = regs.orig_rax as i64;
            let safe = if nr >= 0 {
                target::syscall_rank(
                    nr,
                    [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9],
                )
                .is_some()
            } else {
                !in_ranges(&libc.ranges, regs.rip)
            };
            if !safe {
                let _ = ptrace::detach(tid, 0);
                continue;
            }
            let xstate = ptrace::get_xstate(tid);
            let mask = ptrace::get_sigmask(tid);
            let (xstate, mask) = match (xstate, mask) {
                (Ok(x), Ok(m)) => (x, m),
                (Err(e), _) | (_, Err(e)) => {
                    let _ = ptrace::detach(tid, 0);
                    return Err(ptrace_err(pid, e));
                }
            };
            return Ok(Held {
                tid,
                syscall: (nr >= 0).then_some(nr),
                regs,
                xstate,
                mask,
                stopped_at,
            });
        }
        if round + 1 < ROUNDS {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Err(AttachError::NoSafeThread { pid, tries: ROUNDS })
}

/// Put the held thread back exactly as it was and let it go.
fn restore(pid: i32, h: &Held) -> Result<(), AttachError> {
    let r = ptrace::set_regs(h.tid, &h.regs)
        .and_then(|()| ptrace::set_xstate(h.tid, &h.xstate))
        .and_then(|()| ptrace::set_sigmask(h.tid, h.mask))
        .and_then(|()| ptrace::detach(h.tid, 0));
    r.map_err(|e| {
        if e.is_gone() && (!Path::new(&Pid::Other(pid).dir()).exists() || exits_soon(pid)) {
            AttachError::TargetExited { pid }
        } else {
            AttachError::Damaged {
                pid,
                tid: h.tid,
                what: format!("restoring it: {e}"),
            }
        }
    })
}

/// Errors of one step while the thread runs borrowed registers.
enum StepErr {
    /// The process ended.
    Gone,
    /// A ptrace call failed or the thread stopped unexpectedly.
    Other(String),
}

fn step_err(e: ptrace::PtraceError) -> StepErr {
    if e.is_gone() {
        StepErr::Gone
    } else {
        StepErr::Other(e.to_string())
    }
}

fn borrowed(h: &Held) -> Regs {
    let mut r = h.regs;
    // not in a syscall: the kernel must not "restart" anything onto our pc
    r.orig_rax = u64::MAX;
    r.rax = 0;
    // TF and DF clear, as the ABI wants at a call
    r.eflags &= !(0x100 | 0x400);
    r
}

/// Run one syscall in the held thread at the libc gadget (syscall-enter and -exit stops,
/// no signal involved); returns rax.
fn remote_syscall(
    h: &Held,
    gadget: u64,
    nr: u64,
    args: [u64; 6],
    t: Duration,
) -> Result<i64, StepErr> {
    let mut r = borrowed(h);
    r.rip = gadget;
    r.rax = nr;
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = args[4];
    r.r9 = args[5];
    ptrace::set_regs(h.tid, &r).map_err(step_err)?;
    for _ in 0..2 {
        ptrace::cont_syscall(h.tid).map_err(step_err)?;
        match ptrace::wait_stop(h.tid, t).map_err(step_err)? {
            Stop::Syscall => {}
            Stop::Exited(_) | Stop::Killed(_) => return Err(StepErr::Gone),
            s => {
                return Err(StepErr::Other(format!(
                    "unexpected stop {s:?} in a remote syscall"
                )))
            }
        }
    }
    let after = ptrace::get_regs(h.tid).map_err(step_err)?;
    Ok(after.rax as i64)
}

/// Borrow the held thread: mmap the bootstrap, pthread_create the bootstrap thread, restore.
/// Returns the mapping's address and the pause.
fn inject(
    pid: i32,
    h: &Held,
    prep: &Prepared,
    mem: &ProcMem,
    t: Duration,
) -> Result<(u64, Duration), AttachError> {
    let gone = AttachError::TargetExited { pid };
    // no signal reaches this thread while it runs our code (process-directed ones go to
    // other threads; thread-directed ones wait until its mask is put back)
    if let Err(e) = ptrace::set_sigmask(h.tid, !0) {
        let _ = ptrace::detach(h.tid, 0);
        return Err(ptrace_err(pid, e));
    }
    let fail = |what: String| -> AttachError {
        match restore(pid, h) {
            Ok(()) => AttachError::Failed {
                pid,
                tid: h.tid,
                what,
            },
            Err(e) => e,
        }
    };
    let l = &prep.libc;
    let base = match remote_syscall(
        h,
        l.syscall_gadget,
        libc::SYS_mmap as u64,
        [0, boot::LEN, PROT_RWX, MAP_PRIVATE_ANON, u64::MAX, 0],
        t,
    ) {
        Ok(v) if (-4095..0).contains(&v) => {
            restore(pid, h)?;
            return Err(AttachError::RemoteMmap { pid, errno: -v });
        }
        Ok(v) => v as u64,
        Err(StepErr::Gone) => return Err(gone),
        Err(StepErr::Other(w)) => return Err(fail(w)),
    };
    let unmap_and_restore = |h: &Held| -> Result<(), AttachError> {
        match remote_syscall(
            h,
            l.syscall_gadget,
            libc::SYS_munmap as u64,
            [base, boot::LEN, 0, 0, 0, 0],
            t,
        ) {
            Ok(_) => restore(pid, h),
            Err(StepErr::Gone) => Err(AttachError::TargetExited { pid }),
            Err(StepErr::Other(w)) => Err(fail(w)),
        }
    };
    let page = boot::build(
        base,
        &boot::Inputs {
            dlopen: l.dlopen,
            dlsym: l.dlsym,
            dlerror: l.dlerror,
            munmap: l.munmap,
            pthread_self: l.pthread_self,
            pthread_detach: l.pthread_detach,
            agent_path: &prep.agent,
            runtime_dir: &prep.runtime,
        },
    );
    let page = match page {
        Ok(p) => p,
        Err(w) => {
            unmap_and_restore(h)?;
            return Err(AttachError::BadAgentPath(PathBuf::from(w)));
        }
    };
    if let Err(e) = mem.write(base, &page) {
        unmap_and_restore(h)?;
        return Err(io_or_gone(pid, "writing the bootstrap", e));
    }
    // pthread_create(&tid, NULL, thread_main, base) on the mapping's own stack, returning to
    // after_create
    let mut r = borrowed(h);
    r.rip = l.pthread_create;
    r.rsp = base + off::STACK_TOP - 8;
    r.rdi = base + off::TID_SLOT;
    r.rsi = 0;
    r.rdx = base + off::THREAD_MAIN;
    r.rcx = base;
    if let Err(e) = ptrace::set_regs(h.tid, &r).and_then(|()| ptrace::cont(h.tid, 0)) {
        if e.is_gone() {
            return Err(gone);
        }
        unmap_and_restore(h)?;
        return Err(ptrace_err(pid, e));
    }
    let start = Instant::now();
    let mut done = false;
    let mut early: Option<Stop> = None;
    while start.elapsed() < t {
        match mem.read_u32(base + off::HIJACK_DONE) {
            Ok(1) => {
                done = true;
                break;
            }
            Ok(_) => {}
            Err(_) => return Err(gone),
        }
        match ptrace::wait_stop(h.tid, Duration::ZERO) {
            Ok(s) => {
                early = Some(s);
                break;
            }
            Err(ptrace::PtraceError::Timeout { .. }) => {}
            Err(e) if e.is_gone() => return Err(gone),
            Err(e) => return Err(fail(e.to_string())),
        }
        // sleep rather than yield: on a busy machine the borrowed thread needs the CPU
        std::thread::sleep(Duration::from_micros(20));
    }
    if early.is_none() {
        if let Err(e) = ptrace::interrupt(h.tid) {
            return Err(if e.is_gone() {
                gone
            } else {
                fail(e.to_string())
            });
        }
        match ptrace::wait_stop(h.tid, t) {
            Ok(Stop::Interrupt) | Ok(Stop::Syscall) | Ok(Stop::Signal(_)) | Ok(Stop::Event(_)) => {}
            Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) => return Err(gone),
            Err(e) if e.is_gone() => return Err(gone),
            Err(e) => {
                return Err(AttachError::Damaged {
                    pid,
                    tid: h.tid,
                    what: format!("it did not stop after pthread_create: {e}"),
                })
            }
        }
    }
    match early {
        Some(Stop::Exited(_)) | Some(Stop::Killed(_)) => return Err(gone),
        Some(s) => {
            // a fault inside pthread_create: put the thread back; whether a thread was
            // created is unknown, so the mapping stays
            restore(pid, h)?;
            return Err(AttachError::Failed {
                pid,
                tid: h.tid,
                what: format!("pthread_create stopped with {s:?}; a 64 KiB bootstrap mapping at {base:#x} remains"),
            });
        }
        None => {}
    }
    if !done {
        restore(pid, h)?;
        return Err(AttachError::CreateTimeout {
            pid,
            tid: h.tid,
            waited: start.elapsed(),
        });
    }
    let code = mem
        .read_u32(base + off::CREATE_RES)
        .map_err(|_| AttachError::TargetExited { pid })? as i32;
    if code != 0 {
        unmap_and_restore(h)?;
        return Err(AttachError::ThreadCreate { pid, code });
    }
    restore(pid, h)?;
    let pause = h.stopped_at.elapsed();
    // the borrowed thread has left the mapping: the new thread may unmap it
    mem.write(base + off::ACK_LEFT, &1u32.to_le_bytes())
        .map_err(|_| AttachError::TargetExited { pid })?;
    Ok((base, pause))
}

/// Wait for the bootstrap thread's answer; true if the agent says it was already running.
fn wait_answer(pid: i32, mem: &ProcMem, base: u64, t: Duration) -> Result<bool, AttachError> {
    let start = Instant::now();
    let st = loop {
        let st = mem
            .read_u32(base + off::STATE)
            .map_err(|_| AttachError::TargetExited { pid })?;
        if st != state::RUNNING {
            break st;
        }
        if start.elapsed() >= t {
            return Err(AttachError::AgentTimeout {
                pid,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let ret = mem
        .read_u32(base + off::AGENT_RET)
        .map_err(|_| AttachError::TargetExited { pid })? as i32;
    let mut msg = vec![0u8; off::ERRBUF_LEN as usize];
    mem.read(base + off::ERRBUF, &mut msg)
        .map_err(|_| AttachError::TargetExited { pid })?;
    let _ = mem.write(base + off::ACK_READ, &1u32.to_le_bytes());
    let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
    let msg = String::from_utf8_lossy(&msg[..end]).into_owned();
    match st {
        state::CALLED => match ret {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(AttachError::AgentFailed {
                pid,
                msg: if msg.is_empty() {
                    format!("it returned {ret} without a message")
                } else {
                    msg
                },
            }),
        },
        state::DLOPEN_FAILED => Err(AttachError::Dlopen { pid, msg }),
        _ => Err(AttachError::NoEntry { pid, msg }),
    }
}

/// The stop-the-world baseline: seize and stop every thread but `except`; returns each
/// stopped thread with the signal to hand back when it is let go.
fn stop_others(pid: i32, except: i32, t: Duration) -> Vec<(i32, i32)> {
    let tids = proc::tasks(Pid::Other(pid)).unwrap_or_default();
    let mut seized = Vec::new();
    for tid in tids.into_iter().filter(|&x| x != except) {
        if ptrace::seize(tid, 0).is_ok() && ptrace::interrupt(tid).is_ok() {
            seized.push(tid);
        }
    }
    let mut stopped = Vec::new();
    for tid in seized {
        match ptrace::wait_stop(tid, t) {
            Ok(Stop::Signal(sig)) => stopped.push((tid, sig)),
            Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) => {}
            Ok(_) => stopped.push((tid, 0)),
            // not stopped in time: it stays seized until it stops or we exit; the
            // baseline only runs in the benchmark
            Err(_) => {}
        }
    }
    stopped
}
