//! The messages: one JSON object per line, a request from `kgpatch` and one response
//! from the agent, over the agent's Unix socket. Every message carries `"v"`, the protocol
//! version; an agent answers a request of another version with an error that names both.
//!
//! The shapes here are the stable `--json` output of `kgpatch status` too: fields may be
//! added in a later version, never renamed or removed within one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// What happens when a transition's deadline passes with threads still not migrated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// Turn the transition around: every thread goes back (the default).
    #[default]
    Reverse,
    /// Leave it pending: keep retrying until `force`, `revert` or completion.
    Pending,
}

/// A request, as sent on the wire: `{"v":1,"op":"status"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Protocol version of the sender.
    pub v: u32,
    /// The message.
    #[serde(flatten)]
    pub body: T,
}

/// Requests `kgpatch` sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Load a patch module and begin the transition that applies it.
    Apply {
        /// Absolute path of the module, as the target process sees it.
        module: PathBuf,
        /// Deadline for the transition, in milliseconds (agent default when absent).
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// What to do at the deadline.
        #[serde(default)]
        on_timeout: OnTimeout,
        /// Halt every thread at once instead (the benchmark's baseline).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stop_the_world: bool,
    },
    /// Begin the transition that reverts the patch on top of the stack (or turn around the
    /// transition applying it, if it is still in progress).
    Revert {
        /// The patch's name.
        patch: String,
        /// Deadline, in milliseconds.
        #[serde(default)]
        timeout_ms: Option<u64>,
        /// What to do at the deadline.
        #[serde(default)]
        on_timeout: OnTimeout,
        /// Halt every thread at once instead (the benchmark's baseline).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stop_the_world: bool,
    },
    /// The patch stack and the transition in progress.
    Status,
    /// Migrate the remaining threads without a stack check.
    Force,
    /// Unmap a reverted patch module (`dlclose`). Dangerous: the program may still hold
    /// pointers into it (string constants, function pointers, callbacks it registered).
    /// Refused while the module is applied or a transition is in progress.
    Unload {
        /// The module's patch name.
        patch: String,
    },
}

/// Responses of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// A transition began.
    Started {
        /// Its number.
        t: u64,
        /// `apply` or `revert`.
        kind: Kind,
        /// The patch.
        patch: String,
    },
    /// A transition that was in progress was turned around (a revert of a patch still being
    /// applied).
    Reversed {
        /// Its number.
        t: u64,
    },
    /// `force` was accepted: the stack check is lifted, and the agent swept the threads
    /// at once. Says exactly what force moved and what it cannot move.
    Forced {
        /// The transition forced.
        t: u64,
        /// Every thread reached the goal: the transition completed.
        #[serde(default)]
        completed: bool,
        /// Threads that force's sweep moved without a stack check.
        #[serde(default)]
        moved: usize,
        /// Threads force could not move. A thread that blocks the migration signal
        /// (`SignalBlocked`) moves only at a `quiescent()` call or when it unblocks the
        /// signal; any other did not take the signal in time (stopped, not scheduled) and
        /// is retried.
        /// The transition stays pending (and forced) until they move.
        #[serde(default)]
        unmoved: Vec<ThreadInfo>,
    },
    /// The state of the agent.
    Status(Box<Status>),
    /// A reverted module was unloaded.
    Unloaded {
        /// Its patch name.
        patch: String,
        /// Its file.
        module: PathBuf,
        /// Bytes it mapped.
        mapped_bytes: u64,
    },
    /// The request was refused or failed; nothing changed unless the message says so.
    Error {
        /// A stable classification for scripts.
        kind: ErrorKind,
        /// One sentence for a human: what is wrong and what to do.
        message: String,
    },
}

/// Stable error classes. New classes may be added in a later version; scripts read the
/// name ([`ErrorKind::as_str`], the `kind` of an error answer), `kgpatch` maps each to an
/// exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed or of another protocol version.
    BadRequest,
    /// Another transition is in progress.
    Busy,
    /// The patch module is unusable (format, target, symbols, checksums).
    BadModule,
    /// A function cannot be patched.
    Unpatchable,
    /// The module's pre-apply or pre-revert callback vetoed.
    Vetoed,
    /// No such patch, or not on top of the stack.
    NoSuchPatch,
    /// No transition is in progress.
    NoTransition,
    /// The agent could not do it (OS error); the message says which call.
    Internal,
}

impl ErrorKind {
    /// Every class, in declaration order.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::BadRequest,
        ErrorKind::Busy,
        ErrorKind::BadModule,
        ErrorKind::Unpatchable,
        ErrorKind::Vetoed,
        ErrorKind::NoSuchPatch,
        ErrorKind::NoTransition,
        ErrorKind::Internal,
    ];

    /// The name on the wire (`bad_request`, `busy`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Busy => "busy",
            ErrorKind::BadModule => "bad_module",
            ErrorKind::Unpatchable => "unpatchable",
            ErrorKind::Vetoed => "vetoed",
            ErrorKind::NoSuchPatch => "no_such_patch",
            ErrorKind::NoTransition => "no_transition",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `apply` or `revert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Applying a patch.
    Apply,
    /// Reverting a patch.
    Revert,
}

/// The agent's state, for `kgpatch status` and `kgpatch list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The target's pid.
    pub pid: u32,
    /// The agent's version.
    pub agent_version: String,
    /// Applied patches, oldest first.
    pub patches: Vec<PatchInfo>,
    /// The transition in progress.
    pub transition: Option<TransitionInfo>,
    /// The most recent finished transition.
    pub last: Option<Outcome>,
    /// How the agent came into the process, and when (absent from agents older than this
    /// field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    /// How long the migration handler held threads, over the agent's life.
    #[serde(default)]
    pub handler: HandlerTimes,
    /// How long stop-the-world rendezvous held every thread (benchmark baseline only).
    #[serde(default)]
    pub halted: HandlerTimes,
    /// Heap bytes of the unwind index (0 before the first transition).
    #[serde(default)]
    pub unwind_index_bytes: u64,
    /// Patch modules no longer applied that stay mapped (reverted, or whose apply was
    /// reversed): the program may still point into them. `kgpatch unload` unmaps one.
    #[serde(default)]
    pub retired: Vec<RetiredInfo>,
    /// Libraries kgpatch keeps loaded because they hold patch sites (a program's `dlclose`
    /// does not unmap them until the sites are gone).
    #[serde(default)]
    pub pinned: Vec<PinnedInfo>,
    /// The agent thread hit an internal error (a caught panic): what it was. The agent then
    /// refuses every further transition; the process runs on as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_failure: Option<String>,
}

/// How the agent came into the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `LD_PRELOAD=libkgpatch_agent.so`: it started itself when the process loaded it.
    Preload,
    /// `kgpatch attach`: loaded into the running process from outside.
    Attach,
    /// Linked in as a crate: the program called `kgpatch_agent::start()`.
    Linked,
}

impl Origin {
    /// The name used on the wire and in `kgpatch status` (`preload`, `attach`, `linked`).
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Preload => "preload",
            Origin::Attach => "attach",
            Origin::Linked => "linked",
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How and when the agent came into the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// How it came in.
    pub origin: Origin,
    /// When it started, in milliseconds since the Unix epoch (wall clock).
    pub since_unix_ms: u64,
}

/// What `kgpatch` prints on stdout, as `{"error": {...}}`, when a command run with `--json`
/// fails (the sentence goes to stderr too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandError {
    /// The class: an [`ErrorKind`] name when the agent refused, `unreachable` when the
    /// process or its agent could not be reached, `failed` for anything else.
    pub kind: String,
    /// The sentence for a human.
    pub message: String,
    /// The exit code the command ends with.
    pub exit_code: u8,
}

/// What `kgpatch apply`, `revert` and `status` print on stdout with `--json`: the final
/// status, or the error the command failed with. Tests and scripts parse it with
/// [`StatusOutput::parse`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatusOutput {
    /// The command failed: `{"error": {...}}`.
    Failed {
        /// What failed.
        error: CommandError,
    },
    /// The agent's status after the command (for `apply`/`revert`: after the transition
    /// ended or was left pending).
    Status(Box<Status>),
}

impl StatusOutput {
    /// Parses a command's stdout; the error names what was not understood.
    pub fn parse(stdout: &str) -> Result<StatusOutput, String> {
        serde_json::from_str(stdout)
            .map_err(|e| format!("not the JSON of a kgpatch status or error ({e}): {stdout:?}"))
    }

    /// The status, if the command printed one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            StatusOutput::Status(s) => Some(s),
            StatusOutput::Failed { .. } => None,
        }
    }

    /// The error, if the command failed.
    pub fn error(&self) -> Option<&CommandError> {
        match self {
            StatusOutput::Failed { error } => Some(error),
            StatusOutput::Status(_) => None,
        }
    }

    /// How the last transition ended (an `apply` or `revert` that waited: its own).
    pub fn outcome(&self) -> Option<&Outcome> {
        self.status()?.last.as_ref()
    }
}

impl Outcome {
    /// Its duration in milliseconds, to the microsecond when the agent measured it so.
    pub fn elapsed_ms_f64(&self) -> f64 {
        if self.elapsed_us > 0 {
            self.elapsed_us as f64 / 1000.0
        } else {
            self.elapsed_ms as f64
        }
    }
}

/// One process of `kgpatch ps --json`: a process with an agent socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProcess {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
    /// Its agent's socket.
    pub socket: PathBuf,
    /// How its agent came in; `None` if the agent did not answer within `ps`'s short
    /// timeouts, or is older than the field.
    pub agent: Option<AgentInfo>,
}

/// Percentiles of durations the agent recorded (migration handler runs, stop-the-world
/// holds) over its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerTimes {
    /// Runs recorded.
    pub count: u64,
    /// Median, in nanoseconds (bucket upper bound, 100 ns resolution).
    pub p50_ns: u64,
    /// 99th percentile, in nanoseconds.
    pub p99_ns: u64,
    /// Longest, in nanoseconds.
    pub max_ns: u64,
}

/// A patch module that is no longer applied and stays mapped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredInfo {
    /// Its patch name.
    pub name: String,
    /// Its version string.
    pub version: String,
    /// The module file.
    pub module: PathBuf,
    /// Bytes it maps (its `PT_LOAD` segments, in whole pages).
    pub mapped_bytes: u64,
    /// The transition that took it out.
    pub retired_by: u64,
    /// How: `reverted`, `reversed` (its apply was turned around) or `apply failed`.
    pub how: String,
}

/// A library kgpatch keeps loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedInfo {
    /// The loader's name of the library.
    pub library: PathBuf,
    /// Patch sites in it (their function entries), or empty when a module refers to it.
    pub sites: Vec<u64>,
    /// Patch modules whose code refers to it (reference slots), applied or retired.
    #[serde(default)]
    pub modules: Vec<String>,
}

/// An applied patch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchInfo {
    /// Its name.
    pub name: String,
    /// Its version string.
    pub version: String,
    /// Its description.
    pub description: String,
    /// The module file.
    pub module: PathBuf,
    /// The transition that applied it.
    pub applied_by: u64,
    /// The functions it replaces.
    pub functions: Vec<FunctionInfo>,
    /// Bytes the module maps (its `PT_LOAD` segments, in whole pages).
    #[serde(default)]
    pub mapped_bytes: u64,
}

/// One replaced function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInfo {
    /// The old function's symbol.
    pub name: String,
    /// Its address in the target.
    pub old: u64,
    /// The replacement's address.
    pub new: u64,
}

/// A transition in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionInfo {
    /// Its number.
    pub t: u64,
    /// Apply or revert.
    pub kind: Kind,
    /// The patch.
    pub patch: String,
    /// Turned around: threads are going back.
    pub reversed: bool,
    /// The stack check is lifted.
    pub forced: bool,
    /// Milliseconds since it began.
    pub elapsed_ms: u64,
    /// Milliseconds until the deadline (0 once passed).
    pub remaining_ms: u64,
    /// The deadline passed and the transition was left pending (`--keep-pending`): it
    /// keeps retrying until `force`, `revert` or completion.
    #[serde(default)]
    pub left_pending: bool,
    /// Threads on the goal side.
    pub migrated: usize,
    /// Threads in the process.
    pub total: usize,
    /// Every thread not yet on the goal side.
    pub pending: Vec<ThreadInfo>,
    /// Why completion waits although no thread blocks it: the last OS error (a failed
    /// `/proc/self/task` or `/proc/self/maps` read) that kept the driver from checking every
    /// thread. Completion and slot reclaim wait while it lasts; the deadline still applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_on_error: Option<String>,
}

/// A thread not yet migrated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadInfo {
    /// Kernel thread id.
    pub tid: u32,
    /// Thread name (`/proc/<pid>/task/<tid>/comm`).
    pub name: String,
    /// Failed attempts in this transition.
    pub attempts: u32,
    /// Why the last attempt failed, if one did.
    pub blocker: Option<BlockerInfo>,
}

/// Why a thread could not migrate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BlockerInfo {
    /// A frame is inside a function the transition leaves.
    Busy {
        /// The function.
        function: String,
        /// Frame depth, 0 = innermost.
        depth: u16,
    },
    /// The stack walk could not prove the stack clean.
    Unreliable {
        /// Why.
        reason: String,
    },
    /// The thread blocks the migration signal.
    SignalBlocked,
}

/// How a transition ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Its number.
    pub t: u64,
    /// Apply or revert.
    pub kind: Kind,
    /// The patch.
    pub patch: String,
    /// What happened.
    pub result: OutcomeKind,
    /// Milliseconds from begin to end.
    pub elapsed_ms: u64,
    /// Microseconds from begin to end.
    #[serde(default)]
    pub elapsed_us: u64,
    /// A sentence for a human.
    pub message: String,
    /// What went wrong after every thread had moved (one sentence each): e.g. a site whose
    /// bytes were no longer kgpatch's jump, so its original bytes were not written back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// What the transition cost the target's threads and the agent (docs/PERFORMANCE.md,
    /// "Cost per transition"); absent from agents older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// What one transition cost, from the request to its completion. Counts are of the whole
/// process during the transition (a text write of another client's request would be
/// counted too; one transition runs at a time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// Migration signals sent (`tgkill`), over every sweep round.
    pub migration_signals: u64,
    /// Signals of the text-write sweeps (moving threads out of overwritten bytes, or
    /// serialising cores where membarrier is missing).
    pub text_sweep_signals: u64,
    /// SIGTRAPs kgpatch's handler took (threads that ran into an int3 of a site write).
    pub sigtraps: u64,
    /// membarrier `SYNC_CORE` calls.
    pub membarriers: u64,
    /// Signals sent to threads that were asleep (state S or D) when they were sent: each
    /// woke a thread that had nothing else to do.
    pub wakeups: u64,
    /// Migration signals the skip rule spared (a thread parked where its last check found
    /// it busy, that has not run since).
    pub skipped: u64,
    /// Migration sweep rounds.
    pub rounds: u64,
    /// Threads that ran one of kgpatch's handlers at least once.
    pub threads_interrupted: u64,
    /// Threads that ran kgpatch's handlers more than once.
    pub threads_interrupted_more_than_once: u64,
    /// The most handler runs (migration, text sweep, SIGTRAP) any one thread had.
    pub max_interrupts: u64,
    /// The most time any one thread spent in kgpatch's handlers, in total, in nanoseconds.
    pub max_thread_handler_ns: u64,
    /// The longest single handler run, in nanoseconds.
    pub max_handler_ns: u64,
    /// Time in kgpatch's handlers over all threads, in nanoseconds.
    pub total_handler_ns: u64,
    /// CPU time of the agent's thread from the request to the completion, in microseconds
    /// (`CLOCK_THREAD_CPUTIME_ID`), less the status requests it served meanwhile.
    pub agent_cpu_us: u64,
    /// `true` when the per-thread table was full and some threads went uncounted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub table_full: bool,
}

/// How a transition ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// Every thread reached the goal.
    Completed,
    /// It was turned around and every thread went back.
    Reversed,
}

/// Encodes a message as one line.
pub fn encode<T: Serialize>(body: T) -> String {
    let mut line = serde_json::to_string(&Envelope {
        v: PROTOCOL_VERSION,
        body,
    })
    .expect("protocol types always serialise");
    line.push('\n');
    line
}

/// Decodes one line, checking the version.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, String> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let version: Version =
        serde_json::from_str(line).map_err(|e| format!("not a kgpatch protocol message ({e})"))?;
    if version.v != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not supported (this side speaks version {PROTOCOL_VERSION}); use a kgpatch and agent of the same release",
            version.v
        ));
    }
    let env: Envelope<T> =
        serde_json::from_str(line).map_err(|e| format!("malformed message ({e})"))?;
    Ok(env.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_look_stable() {
        let r = Request::Apply {
            module: "/tmp/fix.so".into(),
            timeout_ms: Some(5000),
            on_timeout: OnTimeout::Reverse,
            stop_the_world: false,
        };
        let line = encode(&r);
        assert_eq!(
            line,
            "{\"v\":1,\"op\":\"apply\",\"module\":\"/tmp/fix.so\",\"timeout_ms\":5000,\"on_timeout\":\"reverse\"}\n"
        );
        assert_eq!(decode::<Request>(&line).unwrap(), r);
        assert_eq!(
            decode::<Request>("{\"v\":1,\"op\":\"status\"}").unwrap(),
            Request::Status
        );
        let unload = Request::Unload {
            patch: "fix".into(),
        };
        assert_eq!(
            encode(&unload),
            "{\"v\":1,\"op\":\"unload\",\"patch\":\"fix\"}\n"
        );
    }

    #[test]
    fn older_status_without_lifetime_fields_still_decodes() {
        let line = "{\"v\":1,\"result\":\"status\",\"pid\":1,\"agent_version\":\"0\",\"patches\":[],\"transition\":null,\"last\":null}";
        let Response::Status(s) = decode::<Response>(line).unwrap() else {
            panic!("not a status");
        };
        assert!(s.retired.is_empty() && s.pinned.is_empty());
        assert_eq!(s.agent, None, "an older agent does not say how it came in");
    }

    #[test]
    fn error_kind_names_are_their_wire_names() {
        for kind in ErrorKind::ALL {
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
        }
    }

    #[test]
    fn command_output_is_a_status_or_an_error() {
        let err = "{\"error\":{\"kind\":\"busy\",\"message\":\"m\",\"exit_code\":5}}";
        let out = StatusOutput::parse(err).unwrap();
        assert_eq!(out.error().map(|e| e.kind.as_str()), Some("busy"));
        assert!(out.status().is_none());
        let st = "{\"pid\":1,\"agent_version\":\"0\",\"patches\":[],\"transition\":null,\"last\":{\"t\":1,\"kind\":\"apply\",\"patch\":\"p\",\"result\":\"completed\",\"elapsed_ms\":2,\"elapsed_us\":2500,\"message\":\"ok\"}}";
        let out = StatusOutput::parse(st).unwrap();
        let o = out.outcome().expect("an outcome");
        assert_eq!(o.result, OutcomeKind::Completed);
        assert_eq!(o.elapsed_ms_f64(), 2.5);
        assert!(StatusOutput::parse("transition 1 completed").is_err());
    }

    #[test]
    fn agent_info_round_trips() {
        let line = "{\"v\":1,\"result\":\"status\",\"pid\":1,\"agent_version\":\"0\",\"patches\":[],\"transition\":null,\"last\":null,\"agent\":{\"origin\":\"preload\",\"since_unix_ms\":1700000000000}}";
        let Response::Status(s) = decode::<Response>(line).unwrap() else {
            panic!("not a status");
        };
        let info = s.agent.expect("the agent field decodes");
        assert_eq!(info.origin, Origin::Preload);
        assert_eq!(info.since_unix_ms, 1_700_000_000_000);
        assert!(encode(Response::Status(s)).contains("\"origin\":\"preload\""));
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let err = decode::<Request>("{\"v\":2,\"op\":\"status\"}").unwrap_err();
        assert!(err.contains("protocol version 2"), "{err}");
        assert!(decode::<Request>("hello").is_err());
        assert!(decode::<Request>("{\"v\":1,\"op\":\"dance\"}").is_err());
    }
}
