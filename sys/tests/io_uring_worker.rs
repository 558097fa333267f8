//! An io_uring worker is a kernel task inside our thread group: `proc::tasks` must leave it
//! out (it runs no user code and blocks every signal), and keep every real thread.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use kgpatch_sys::proc::{self, Pid, PF_IO_WORKER};

/// Every task of this process with its `PF_*` flags, unfiltered.
fn raw_tasks() -> Vec<(i32, u64)> {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(|tid| Some((tid, proc::task_flags(Pid::This, tid).ok()??)))
        .collect()
}

#[test]
fn io_uring_workers_are_not_listed_as_threads() {
    let mut ring = match IoUring::new(8) {
        Ok(ring) => ring,
        Err(e) => panic!(
            "io_uring_setup failed ({e}): this test needs io_uring (sysctl kernel.io_uring_disabled=0)"
        ),
    };
    let (reader, mut writer) = UnixStream::pair().unwrap();
    let mut buf = [0u8; 16];
    // IOSQE_ASYNC: the kernel hands the read to an io-wq worker, which blocks in it.
    let read = opcode::Recv::new(types::Fd(reader.as_raw_fd()), buf.as_mut_ptr(), 16)
        .build()
        .flags(squeue::Flags::ASYNC)
        .user_data(7);
    submit(&mut ring, &read);

    let deadline = Instant::now() + Duration::from_secs(5);
    let worker = loop {
        if let Some(&(tid, _)) = raw_tasks().iter().find(|(_, f)| f & PF_IO_WORKER != 0) {
            break tid;
        }
        assert!(Instant::now() < deadline, "no io_uring worker appeared");
        std::thread::sleep(Duration::from_millis(1));
    };
    // A new worker starts with its creator's name and renames itself `iou-wrk-<tid>`.
    let comm = loop {
        let comm = proc::task_comm(Pid::This, worker).unwrap();
        if comm.starts_with("iou-") {
            break comm;
        }
        assert!(
            Instant::now() < deadline,
            "worker {worker} is still named {comm}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let listed = proc::tasks(Pid::This).unwrap();
    assert!(
        !listed.contains(&worker),
        "worker {worker} ({comm}) listed: {listed:?}"
    );
    let me = rustix::thread::gettid().as_raw_nonzero().get();
    assert!(listed.contains(&me) && listed.contains(&(std::process::id() as i32)));
    let users: Vec<i32> = raw_tasks()
        .into_iter()
        .filter(|(_, f)| f & PF_IO_WORKER == 0)
        .map(|(t, _)| t)
        .collect();
    assert!(
        users.iter().all(|t| listed.contains(t)),
        "{users:?} vs {listed:?}"
    );

    writer.write_all(b"done").unwrap();
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().expect("a completion");
    assert_eq!((cqe.user_data(), cqe.result()), (7, 4));
}

/// Queues one entry and submits it.
fn submit(ring: &mut IoUring, entry: &squeue::Entry) {
    // SAFETY: the entry's buffer (`buf` in the test) and descriptor outlive the operation:
    // the test waits for its completion before either is dropped.
    unsafe { ring.submission().push(entry).expect("queue has room") };
    ring.submit().unwrap();
}
