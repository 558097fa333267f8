//! A blocking client for the demo server's line protocol, and the parsed `STATS` answer.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::Error;

/// One connection to the demo server. Each [`Client::request`] sends a line and reads one.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    addr: SocketAddr,
}

impl Client {
    /// Connects with `TCP_NODELAY` and a 30 s read timeout.
    pub fn connect(addr: SocketAddr) -> Result<Client, Error> {
        let connect = || -> io::Result<Client> {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let writer = stream.try_clone()?;
            Ok(Client {
                reader: BufReader::new(stream),
                writer,
                addr,
            })
        };
        connect().map_err(|source| Error::Connect { addr, source })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the read timeout (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(|source| Error::Connect {
                addr: self.addr,
                source,
            })
    }

    /// Sends `line` (a newline is added) and returns the answer line without its newline.
    pub fn request(&mut self, line: &str) -> Result<String, Error> {
        self.request_io(line).map_err(|source| Error::Request {
            request: line.to_string(),
            source,
        })
    }

    /// [`Client::request`] with the bare I/O error (the load generator's hot path).
    pub(crate) fn request_io(&mut self, line: &str) -> io::Result<String> {
        self.send_io(line)?;
        self.read_line_io()
    }

    /// Sends `line` without waiting for the answer; read it later with [`Client::read_line`].
    pub fn send(&mut self, line: &str) -> Result<(), Error> {
        self.send_io(line).map_err(|source| Error::Request {
            request: line.to_string(),
            source,
        })
    }

    /// Reads one answer line (without its newline).
    pub fn read_line(&mut self) -> Result<String, Error> {
        self.read_line_io().map_err(|source| Error::Request {
            request: String::new(),
            source,
        })
    }

    fn send_io(&mut self, line: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.writer.write_all(&buf)
    }

    fn read_line_io(&mut self) -> io::Result<String> {
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer)?;
        if n == 0 || !answer.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        answer.pop();
        Ok(answer)
    }

    /// Sends `STATS` and parses the answer.
    pub fn stats(&mut self) -> Result<Stats, Error> {
        let line = self.request("STATS")?;
        Stats::parse(&line)
    }
}

/// The server's `STATS` answer: `STATS key=value key=value ...`.
///
/// Keys (all counters since start unless noted): `requests`, `violations` (failed codec
/// round trips), `threads` (the server's own, main included), `uptime_ms`, `keys`,
/// `connections`, `open_connections`, `compactions`, `flushes`, `ticks`, `signals` (handled
/// by `--install-noop-handler`), `bug_probe` (INCR's amount parser applied to `-7`: `7`
/// while the planted bug is live, `-7` once fixed), `codec` (the tag byte `kv_encode`
/// writes: `1` for the original codec), and `eintr_<call>` (how often each blocking call
/// returned EINTR: `epoll_wait`, `poll`, `accept`, `read`, `write`, `nanosleep`,
/// `clock_nanosleep`, `cond_timedwait`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    fields: BTreeMap<String, String>,
}

impl Stats {
    /// Parses a `STATS ...` line.
    pub fn parse(line: &str) -> Result<Stats, Error> {
        let bad = || Error::BadStats {
            line: line.to_string(),
        };
        let rest = line.strip_prefix("STATS ").ok_or_else(bad)?;
        let mut fields = BTreeMap::new();
        for pair in rest.split(' ').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(bad)?;
            fields.insert(k.to_string(), v.to_string());
        }
        Ok(Stats { fields })
    }

    /// A field as text.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// An unsigned counter; 0 when absent or not a number.
    pub fn counter(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// `requests`.
    pub fn requests(&self) -> u64 {
        self.counter("requests")
    }

    /// `violations`: failed codec round trips (the two-function invariant).
    pub fn violations(&self) -> u64 {
        self.counter("violations")
    }

    /// `bug_probe`: `7` while the planted INCR bug is live, `-7` once it is fixed.
    pub fn bug_probe(&self) -> Option<i64> {
        self.get("bug_probe").and_then(|v| v.parse().ok())
    }

    /// All fields, sorted by key.
    pub fn fields(&self) -> &BTreeMap<String, String> {
        &self.fields
    }
}
