//! What the OS layer's calls cost on this machine (median of many runs), with 16 extra
//! threads parked. Run: `cargo run --release -p kgpatch-sys --example costs`.

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kgpatch_sys::proc::{self, Pid};
use kgpatch_sys::{objects, thread};

fn median<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[runs / 2]
}

fn main() {
    let (stop, stop_rx) = mpsc::channel::<()>();
    let stop_rx = std::sync::Arc::new(std::sync::Mutex::new(stop_rx));
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (tx, stop_rx) = (tx.clone(), std::sync::Arc::clone(&stop_rx));
            std::thread::spawn(move || {
                tx.send(thread::gettid()).unwrap();
                let _ = stop_rx.lock().unwrap().recv();
            })
        })
        .collect();
    let tids: Vec<i32> = (0..16).map(|_| rx.recv().unwrap()).collect();
    let other = tids[3];
    std::thread::sleep(Duration::from_millis(20));
    let status_text = std::fs::read_to_string(Pid::This.task_file(other, "status")).unwrap();
    let maps_text = std::fs::read_to_string("/proc/self/maps").unwrap();
    // The parse redirect's sweep had before kgpatch-sys: one scan per field.
    let old_parse = |status: &str| {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let mask = |name: &str| field(name).and_then(|m| u64::from_str_radix(m, 16).ok());
        (
            field("State:").map(|s| s.starts_with('Z')),
            mask("SigBlk:"),
            mask("SigPnd:"),
            mask("ShdPnd:"),
        )
    };
    let rows: [(&str, Duration); 10] = [
        ("gettid", median(100_001, thread::gettid)),
        (
            "tgkill(self, 0)",
            median(10_001, || {
                thread::tgkill(thread::getpid(), thread::gettid(), 0).unwrap()
            }),
        ),
        (
            "proc::tasks (17 threads)",
            median(2_001, || proc::tasks(Pid::This).unwrap()),
        ),
        (
            "proc::task_status",
            median(2_001, || proc::task_status(Pid::This, other).unwrap()),
        ),
        (
            "Status::parse (text only)",
            median(20_001, || proc::Status::parse(&status_text)),
        ),
        (
            "old 4-field parse (text)",
            median(20_001, || old_parse(&status_text)),
        ),
        (
            "proc::parked",
            median(2_001, || proc::parked(Pid::This, other)),
        ),
        (
            "proc::maps",
            median(2_001, || proc::maps(Pid::This).unwrap()),
        ),
        (
            "parse_maps (text only)",
            median(20_001, || proc::parse_maps(&maps_text)),
        ),
        (
            "objects::for_each (count)",
            median(20_001, || {
                let mut n = 0;
                objects::for_each(|_| {
                    n += 1;
                    ControlFlow::Continue(())
                });
                std::hint::black_box(n);
            }),
        ),
    ];
    for (what, t) in rows {
        println!("{what:28} {:>9.2} µs", t.as_secs_f64() * 1e6);
    }
    println!("({} maps lines)", maps_text.lines().count());
    drop(stop);
    for t in threads {
        t.join().unwrap();
    }
}
