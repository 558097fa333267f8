//! Attach (issue 12): the time to inject the agent into a running process, how long the one
//! borrowed thread is held, and how much every other thread stalls meanwhile — kgpatch's
//! one-thread injection against the stop-the-world injection libcare and upatch do (every
//! thread seized and interrupted for the whole injection), at 8, 64 and 1,024 threads.
//!
//! The target (C, built here) runs N threads; each loops: spin ~50 µs on `clock_gettime`
//! recording the largest gap between two reads, then `nanosleep(N × 100 µs)` recording how
//! late it woke (so all threads together keep half of one core busy, at every N). A thread's *stall* is the larger of the two, so a thread held while spinning shows
//! the hold as a gap, and one held while asleep shows how much later than due it ran. The
//! injected library is a stand-in exporting `kgpatch_agent_attach` (copied under a fresh
//! name each run, so every run really loads something): what is measured is the injection,
//! not the agent's start-up.
//!
//! Run alone: `cargo run --release -p kgpatch-bench -- --only attach [--quick]`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use kgpatch_attach::{attach, AttachOptions};
use serde::Serialize;
use serde_json::Value;

const TARGET_C: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#define MAXT 4096
static atomic_long stall[MAXT];
static int tids[MAXT];
static long nap;
static long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }
static void note(int i, long v) { long m = atomic_load(&stall[i]); while (v > m && !atomic_compare_exchange_weak(&stall[i], &m, v)) {} }
static void *run(void *arg) {
  int i = (int)(long)arg; tids[i] = gettid();
  for (;;) {
    long t0 = now(), last = t0;
    while (last - t0 < 50000) { long t = now(); note(i, t - last); last = t; }
    struct timespec d = {nap / 1000000000L, nap % 1000000000L};
    long s = now(); nanosleep(&d, NULL); long late = now() - s - nap; note(i, late);
  }
  return NULL;
}
int main(int argc, char **argv) {
  int n = atoi(argv[1]);
  nap = atol(argv[2]);
  for (int i = 0; i < n; i++) { pthread_t t; pthread_attr_t a; pthread_attr_init(&a); pthread_attr_setstacksize(&a, 65536);
    if (pthread_create(&t, &a, run, (void *)(long)i)) { perror("pthread_create"); return 2; } }
  printf("ready\n"); fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    if (line[0] == 'r') { for (int i = 0; i < n; i++) atomic_store(&stall[i], 0); printf("ok\n"); }
    else if (line[0] == 's') { for (int i = 0; i < n; i++) printf("%d:%ld ", tids[i], atomic_load(&stall[i]) / 1000); printf("\n"); }
    else break;
    fflush(stdout);
  }
  return 0;
}
"#;

const STANDIN_C: &str = r#"
#include <stddef.h>
int kgpatch_agent_attach(const char *rt, char *err, size_t len) { (void)rt; (void)err; (void)len; return 0; }
"#;

/// One line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct AttachRow {
    /// Threads in the target (all running the loop above; the main thread waits on stdin).
    pub threads: usize,
    /// "one thread" (kgpatch) or "stop the world" (every thread seized).
    pub method: &'static str,
    /// Attaches measured.
    pub runs: usize,
    /// Call to answer, median, ms.
    pub attach_ms_p50: f64,
    /// The borrowed thread's hold as the injector saw it (stop to release), µs.
    pub hold_us_p50: f64,
    /// p99 of the same.
    pub hold_us_p99: f64,
    /// Largest.
    pub hold_us_max: f64,
    /// The borrowed thread's own stall in the run window, µs (median over runs).
    pub borrowed_stall_us_p50: f64,
    /// Largest of the same.
    pub borrowed_stall_us_max: f64,
    /// The other threads' largest stall in the run window, µs (median over runs).
    pub others_stall_us_p50: f64,
    /// Largest of the same.
    pub others_stall_us_max: f64,
    /// The other threads' largest stall in a window of the same length without an attach
    /// (the machine's noise floor), µs (median over runs).
    pub noise_us_p50: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn cc(dir: &Path, name: &str, src: &str, args: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).expect("writing a bench source");
    let out = dir.join(name);
    let st = Command::new("cc")
        .args(args)
        .arg(&c)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("running cc");
    assert!(st.success(), "cc {name} failed");
    out
}

struct Target {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Target {
    fn start(exe: &Path, n: usize) -> Target {
        let mut child = Command::new(exe)
            .arg(n.to_string())
            // each thread spins 50 µs per nap: all together half of one core
            .arg((n as u64 * 100_000).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the attach target");
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), "ready");
        Target { child, stdin, out }
    }
    fn cmd(&mut self, c: &str) -> String {
        self.stdin.write_all(c.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l
    }
    /// (tid, stall µs) of every worker since the last reset.
    fn stalls(&mut self) -> Vec<(i32, f64)> {
        self.cmd("s")
            .split_whitespace()
            .filter_map(|kv| {
                let (t, v) = kv.split_once(':')?;
                Some((t.parse().ok()?, v.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The observation window after an attach: two naps of every thread.
fn window(n: usize) -> Duration {
    Duration::from_micros(2 * n as u64 * 100 + 20_000)
}

/// Measure both methods at each thread count; `quick` makes fewer runs.
pub fn measure(quick: bool, counts: &[usize]) -> Vec<AttachRow> {
    let dir = std::env::temp_dir().join(format!("kgpatch-bench-attach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let exe = cc(&dir, "target", TARGET_C, &["-O2", "-pthread"]);
    let so = cc(
        &dir,
        "libstandin.so",
        STANDIN_C,
        &["-O2", "-shared", "-fPIC"],
    );
    let mut rows = Vec::new();
    let mut k = 0u32;
    for &n in counts {
        let runs = match (quick, n) {
            (true, _) => 5,
            (false, n) if n >= 1000 => 10,
            _ => 25,
        };
        for (method, stw) in [("one thread", false), ("stop the world", true)] {
            let mut t = Target::start(&exe, n);
            std::thread::sleep(Duration::from_millis(300));
            let (mut total, mut hold, mut borrowed, mut others, mut noise) =
                (vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..runs {
                // noise floor: the same window without an attach
                t.cmd("r");
                std::thread::sleep(window(n));
                noise.push(t.stalls().iter().map(|s| s.1).fold(0.0, f64::max));
                k += 1;
                let copy = dir.join(format!("libstandin{k}.so"));
                std::fs::copy(&so, &copy).expect("copying the stand-in");
                t.cmd("r");
                let mut o = AttachOptions::new(&copy);
                o.stop_the_world = stw;
                let r = match attach(t.child.id() as i32, &o) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("attach bench: {n} threads, {method}: {e}");
                        continue;
                    }
                };
                std::thread::sleep(window(n));
                let st = t.stalls();
                total.push(r.total.as_secs_f64() * 1e3);
                hold.push(r.pause.as_secs_f64() * 1e6);
                let mine = st.iter().find(|s| s.0 == r.tid).map_or(f64::NAN, |s| s.1);
                borrowed.push(mine);
                others.push(
                    st.iter()
                        .filter(|s| s.0 != r.tid)
                        .map(|s| s.1)
                        .fold(0.0, f64::max),
                );
            }
            let bmax = borrowed.iter().copied().fold(0.0, f64::max);
            let omax = others.iter().copied().fold(0.0, f64::max);
            rows.push(AttachRow {
                threads: n,
                method,
                runs: total.len(),
                attach_ms_p50: pct(&mut total, 0.5),
                hold_us_p50: pct(&mut hold, 0.5),
                hold_us_p99: pct(&mut hold, 0.99),
                hold_us_max: pct(&mut hold, 1.0),
                borrowed_stall_us_p50: pct(&mut borrowed, 0.5),
                borrowed_stall_us_max: bmax,
                others_stall_us_p50: pct(&mut others, 0.5),
                others_stall_us_max: omax,
                noise_us_p50: pct(&mut noise, 0.5),
            });
            let _ = t.cmd("q");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

/// Print the rows as a table.
pub fn print(rows: &[AttachRow]) {
    println!("\n## Attach: one borrowed thread vs. stop the world (µs unless noted)");
    println!(
        "{:>7} {:<15} {:>4} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11} {:>8}",
        "threads",
        "method",
        "runs",
        "attach ms",
        "hold p50",
        "hold p99",
        "hold max",
        "borrowed50",
        "borrowedmx",
        "others p50",
        "others max",
        "noise"
    );
    for r in rows {
        println!(
            "{:>7} {:<15} {:>4} {:>9.2} {:>9.0} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>11.0} {:>11.0} {:>8.0}",
            r.threads, r.method, r.runs, r.attach_ms_p50, r.hold_us_p50, r.hold_us_p99,
            r.hold_us_max, r.borrowed_stall_us_p50, r.borrowed_stall_us_max,
            r.others_stall_us_p50, r.others_stall_us_max, r.noise_us_p50
        );
    }
}

/// Measure, print, and return the JSON for the report (8, 64, 1,024 threads unless
/// `counts` says otherwise).
pub fn run(quick: bool, counts: Option<&[usize]>) -> Value {
    let rows = measure(quick, counts.unwrap_or(&[8, 64, 1024]));
    print(&rows);
    serde_json::to_value(&rows).expect("json")
}
