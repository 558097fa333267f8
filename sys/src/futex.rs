//! Futex wait and wake on a process-private `AtomicU32` (raw system calls through rustix:
//! no libc, no errno, no allocation).

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::thread::futex;

/// Sleeps while `word` holds `seen`, at most `timeout` (a spurious or early return is
/// possible: callers re-check their condition). Async-signal-safe (one system call).
pub fn wait(word: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // EAGAIN (the word changed), EINTR (a signal) and ETIMEDOUT all mean "look again".
    let _ = futex::wait(word, futex::Flags::PRIVATE, seen, Some(&ts));
}

/// Wakes every thread waiting on `word`. Async-signal-safe (one system call).
pub fn wake(word: &AtomicU32) {
    let _ = futex::wake(word, futex::Flags::PRIVATE, i32::MAX as u32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_returns_at_once_when_the_word_differs() {
        let word = AtomicU32::new(1);
        let t = Instant::now();
        wait(&word, 0, Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn wait_times_out() {
        let word = AtomicU32::new(0);
        let t = Instant::now();
        wait(&word, 0, Duration::from_millis(30));
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(25), "{waited:?}");
    }

    #[test]
    fn wake_ends_a_wait_in_another_thread() {
        let word = Arc::new(AtomicU32::new(0));
        let w = Arc::clone(&word);
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            while w.load(Ordering::SeqCst) == 0 {
                wait(&w, 0, Duration::from_secs(10));
            }
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        word.store(1, Ordering::SeqCst);
        wake(&word);
        let waited = waiter.join().unwrap();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }
}
