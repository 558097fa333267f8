//! The client against real Unix sockets: an agent stand-in that answers, one that never
//! answers, one that hangs up, one whose backlog is full, and sockets nobody serves.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kgpatch_protocol::{
    decode, encode, prune_stale_sockets, Client, ClientError, ErrorKind, Request, Response,
    Timeouts,
};

/// A fresh private directory for this test's sockets.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kgproto-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn short() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(300),
        write: Duration::from_millis(300),
        read: Duration::from_millis(300),
    }
}

#[test]
fn a_call_sends_one_line_and_reads_one_answer() {
    let d = dir("answer");
    let listener = UnixListener::bind(d.join("7.sock")).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        let req: Request = decode(&line).unwrap();
        let answer = Response::Error {
            kind: ErrorKind::NoTransition,
            message: format!("seen {req:?}"),
        };
        (&stream).write_all(encode(&answer).as_bytes()).unwrap();
    });
    let client = Client::in_dir(&d, 7).with_timeouts(short());
    match client.status() {
        Err(ClientError::Refused { kind, message }) => {
            assert_eq!(kind, ErrorKind::NoTransition);
            assert_eq!(message, "seen Status");
        }
        other => panic!("{other:?}"),
    }
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn an_agent_that_never_answers_times_out_on_the_read() {
    let d = dir("silent");
    let listener = UnixListener::bind(d.join("8.sock")).unwrap();
    let client = Client::in_dir(&d, 8).with_timeouts(short());
    let began = Instant::now();
    // The listener accepts (the kernel queues the connection) but nobody reads or answers.
    let err = client.call(&Request::Status).unwrap_err();
    let took = began.elapsed();
    assert!(
        matches!(err, ClientError::TimedOut { step: "answer", .. }),
        "{err:?}"
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    drop(listener);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn an_agent_that_hangs_up_is_reported_as_closed() {
    let d = dir("hangup");
    let listener = UnixListener::bind(d.join("9.sock")).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
    });
    let err = Client::in_dir(&d, 9)
        .with_timeouts(short())
        .call(&Request::Status)
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Closed { pid: Some(9) }),
        "{err:?}"
    );
    assert!(err.to_string().contains("process 9"), "{err}");
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn nobody_serving_the_socket_is_no_agent_and_pruned() {
    let d = dir("stale");
    // Bound, then dropped: the file stays, nobody listens (a killed agent's socket).
    drop(UnixListener::bind(d.join("11.sock")).unwrap());
    let live = UnixListener::bind(d.join("12.sock")).unwrap();
    let err = Client::in_dir(&d, 11).call(&Request::Status).unwrap_err();
    assert!(matches!(err, ClientError::NoAgent { .. }), "{err:?}");
    assert!(err.to_string().contains("runs no kgpatch agent"), "{err}");
    let err = Client::in_dir(&d, 13).call(&Request::Status).unwrap_err();
    assert!(matches!(err, ClientError::NoAgent { .. }), "{err:?}");

    let removed = prune_stale_sockets(&d, None);
    assert_eq!(removed, vec![d.join("11.sock")]);
    assert!(d.join("12.sock").exists(), "a listening socket is kept");
    drop(live);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_full_backlog_times_out_on_connect_instead_of_hanging() {
    let d = dir("backlog");
    let listener = UnixListener::bind(d.join("14.sock")).unwrap();
    let client = Client::in_dir(&d, 14).with_timeouts(short());
    // Fill the backlog with connections nobody accepts: a closed client's connection stays
    // queued until the listener accepts it. (A blocking std connect would hang here.)
    let mut queued = 0;
    let err = loop {
        match client.wait_until_listening(Duration::ZERO) {
            Ok(()) => queued += 1,
            Err(e) => break e,
        }
        assert!(queued < 100_000, "the backlog never filled");
    };
    assert!(
        matches!(
            err,
            ClientError::TimedOut {
                step: "accept the connection",
                ..
            }
        ),
        "{err:?}"
    );
    let began = Instant::now();
    let err = client.call(&Request::Status).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::TimedOut {
                step: "accept the connection",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(began.elapsed() >= Duration::from_millis(300));
    drop(listener);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_pid_that_does_not_exist_is_no_process() {
    let err = Client::for_pid(2_147_483_646).unwrap_err();
    assert!(
        matches!(err, ClientError::NoProcess { pid: 2_147_483_646 }),
        "{err:?}"
    );
}
