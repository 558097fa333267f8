//! [`DemoServer`]: a running demo server owned by a test, killed when dropped.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kgpatch_sys::proc::{self, Pid};

use crate::{server_path, sys, Client, Error, Stats, Variant};

/// How to start a [`DemoServer`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    variant: Variant,
    program: Option<std::path::PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    startup_timeout: Duration,
}

impl ServerOptions {
    /// The server of `variant` on an ephemeral port, 4 workers, no extra environment.
    pub fn new(variant: Variant) -> ServerOptions {
        ServerOptions {
            variant,
            program: None,
            args: Vec::new(),
            env: Vec::new(),
            startup_timeout: Duration::from_secs(10),
        }
    }

    /// Runs `path` instead of the built variant (e.g. a sanitizer build of the same sources);
    /// [`DemoServer::variant`] still reports the variant given to [`ServerOptions::new`].
    pub fn program(mut self, path: impl Into<std::path::PathBuf>) -> ServerOptions {
        self.program = Some(path.into());
        self
    }

    /// Adds a command-line argument (see the crate docs for the server's options).
    pub fn arg(mut self, arg: impl Into<OsString>) -> ServerOptions {
        self.args.push(arg.into());
        self
    }

    /// `--workers n`.
    pub fn workers(self, n: u32) -> ServerOptions {
        self.arg("--workers").arg(n.to_string())
    }

    /// `--install-noop-handler signo[:norestart]`: the server counts deliveries of `signo`
    /// in `STATS signals=`; with `restart == false` the handler lacks `SA_RESTART`.
    pub fn noop_handler(self, signo: i32, restart: bool) -> ServerOptions {
        let spec = if restart {
            signo.to_string()
        } else {
            format!("{signo}:norestart")
        };
        self.arg("--install-noop-handler").arg(spec)
    }

    /// `--transcode-pause-us us`: `kv_transcode` sleeps this long between `kv_encode` and
    /// `kv_decode`, widening the window in which a thread could change universe between them.
    pub fn transcode_pause_us(self, us: u32) -> ServerOptions {
        self.arg("--transcode-pause-us").arg(us.to_string())
    }

    /// `--block-signals-in-workers`: each `kv-worker-<i>` blocks every signal with
    /// `pthread_sigmask` when it starts, as many servers do (the hostile case for a patcher
    /// that migrates threads with a signal).
    pub fn block_signals_in_workers(self) -> ServerOptions {
        self.arg("--block-signals-in-workers")
    }

    /// `--churn n`: `n` threads `kv-churn-<i>` churning malloc/free, dlopen/dlclose of libm
    /// and short-lived `kv-ephemeral` threads, each round through `kv_transcode`.
    pub fn churn(self, n: u32) -> ServerOptions {
        self.arg("--churn").arg(n.to_string())
    }

    /// Sets an environment variable for the server (e.g. `LD_PRELOAD` for the agent).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> ServerOptions {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long to wait for `LISTENING` (default 10 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> ServerOptions {
        self.startup_timeout = timeout;
        self
    }
}

/// A running demo server. Dropping it kills the process (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct DemoServer {
    child: Option<Child>,
    pid: u32,
    port: u16,
    variant: Variant,
    output: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl DemoServer {
    /// Starts the server of `variant` with default options.
    pub fn start(variant: Variant) -> Result<DemoServer, Error> {
        DemoServer::spawn(ServerOptions::new(variant))
    }

    /// Starts a server and waits until it prints `LISTENING <port>` (other lines before it
    /// are kept, see [`DemoServer::output`]). Its stderr is inherited.
    pub fn spawn(opts: ServerOptions) -> Result<DemoServer, Error> {
        let path = opts
            .program
            .as_deref()
            .unwrap_or_else(|| server_path(opts.variant));
        let mut cmd = Command::new(path);
        cmd.args(&opts.args)
            .env("KVSERVER_PORT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&output);
        let reader = std::thread::Builder::new()
            .name(format!("kvserver-{pid}-stdout"))
            .spawn(move || {
                // Lines before LISTENING (e.g. from a preloaded library) are kept in output()
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.is_some() && line.starts_with("LISTENING") {
                        let _ = tx.take().expect("checked").send(line);
                    } else {
                        sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    }
                }
            })
            .expect("spawning a thread");
        let mut server = DemoServer {
            child: Some(child),
            pid,
            port: 0,
            variant: opts.variant,
            output,
            reader: Some(reader),
        };
        let first = match rx.recv_timeout(opts.startup_timeout) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(Error::StartTimeout {
                    timeout: opts.startup_timeout,
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.child.as_mut().and_then(|c| c.wait().ok());
                return Err(Error::exited(status));
            }
        };
        server.port = first
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or(Error::BadBanner { line: first })?;
        Ok(server)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Which binary runs.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// A new connection.
    pub fn connect(&self) -> Result<Client, Error> {
        Client::connect(self.addr())
    }

    /// One request on a fresh connection.
    pub fn request(&self, line: &str) -> Result<String, Error> {
        self.connect()?.request(line)
    }

    /// `STATS`, parsed.
    pub fn stats(&self) -> Result<Stats, Error> {
        self.connect()?.stats()
    }

    /// The server as `kgpatch_sys::proc` names it.
    fn proc_pid(&self) -> Pid {
        Pid::Other(self.pid as i32)
    }

    /// The server's threads as `(tid, name)`, from `/proc/<pid>/task`, sorted by tid.
    pub fn threads(&self) -> Result<Vec<(i32, String)>, Error> {
        let err = |source| Error::Threads {
            pid: self.pid,
            source,
        };
        let pid = self.proc_pid();
        let tids = proc::tasks(pid).map_err(err)?;
        // a thread may exit between the listing and the read of its name
        Ok(tids
            .into_iter()
            .map(|tid| (tid, proc::task_comm(pid, tid).unwrap_or_default()))
            .collect())
    }

    /// The signals thread `tid` of the server blocks (`SigBlk` of its `/proc` status, bit
    /// `n - 1` for signal `n`).
    pub fn blocked_signals(&self, tid: i32) -> Result<u64, Error> {
        let err = |kind, what: &str| Error::Threads {
            pid: self.pid,
            source: std::io::Error::new(kind, format!("thread {tid}: {what}")),
        };
        let status = proc::task_status(self.proc_pid(), tid)
            .map_err(|source| Error::Threads {
                pid: self.pid,
                source,
            })?
            .ok_or_else(|| err(std::io::ErrorKind::NotFound, "gone"))?;
        status.sig_blk.ok_or_else(|| {
            err(
                std::io::ErrorKind::InvalidData,
                "no SigBlk line in its status",
            )
        })
    }

    /// Sends `sig` to the whole process.
    pub fn signal(&self, sig: i32) -> Result<(), Error> {
        let pid = self.pid as i32;
        sys::kill(pid, sig).map_err(|source| Error::Signal {
            pid,
            signal: sig,
            source,
        })
    }

    /// Whether the process is still running (not exited, or exited but not yet reaped).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Lines the server printed on stdout other than `LISTENING` (e.g. `STOPPED ...`).
    pub fn output(&self) -> Vec<String> {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends `SHUTDOWN` and waits up to 10 s for a clean exit.
    pub fn shutdown(&mut self) -> Result<ExitStatus, Error> {
        let answer = self.request("SHUTDOWN")?;
        debug_assert_eq!(answer, "BYE");
        self.wait_exit(Duration::from_secs(10))
    }

    /// Sends SIGTERM and waits up to 10 s for a clean exit.
    pub fn terminate(&mut self) -> Result<ExitStatus, Error> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits for the process to exit; kills it after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let pid = self.pid;
        let child = self.child.as_mut().ok_or(Error::StopTimeout {
            pid,
            timeout: Duration::ZERO,
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    if let Some(r) = self.reader.take() {
                        let _ = r.join();
                    }
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.child = None;
                    return Err(Error::StopTimeout { pid, timeout });
                }
                Err(source) => return Err(Error::Wait { pid, source }),
            }
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
