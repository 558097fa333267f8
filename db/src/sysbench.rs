//! `sysbench oltp_read_write` against a [`MariaDb`]: prepare a table set, run a timed
//! closed-loop benchmark, read its summary.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{run, Error, MariaDb};

/// A sysbench table set on one server.
#[derive(Clone, Debug)]
pub struct Sysbench {
    socket: std::path::PathBuf,
    /// Tables.
    pub tables: u32,
    /// Rows per table.
    pub table_size: u32,
}

/// What one `sysbench run` printed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SysbenchReport {
    /// Transactions completed.
    pub transactions: u64,
    /// Transactions per second.
    pub tps: f64,
    /// Errors sysbench ignored (deadlocks it retried: MariaDB reports them under this
    /// workload with or without patching).
    pub ignored_errors: u64,
    /// Reconnects.
    pub reconnects: u64,
    /// Latency percentile (the one asked for), ms.
    pub percentile_ms: f64,
    /// Latency max, ms.
    pub max_ms: f64,
    /// sysbench's latency histogram (`--histogram=on`, see [`Sysbench::start_histogram`]):
    /// (bucket value in ms, transactions), ascending; empty when it was not asked for.
    pub histogram: Vec<(f64, u64)>,
}

impl Sysbench {
    /// Creates the `sbtest` database on `db` and loads `tables` tables of `table_size` rows.
    pub fn prepare(db: &MariaDb, tables: u32, table_size: u32) -> Result<Sysbench, Error> {
        db.sql("CREATE DATABASE IF NOT EXISTS sbtest")?;
        let sb = Sysbench {
            socket: db.socket(),
            tables,
            table_size,
        };
        run("sysbench prepare", &mut sb.command("prepare", 1, None, 99))?;
        Ok(sb)
    }

    fn command(&self, verb: &str, threads: u32, time: Option<Duration>, pct: u32) -> Command {
        let mut cmd = Command::new("/usr/bin/sysbench");
        cmd.arg("oltp_read_write")
            .args([
                "--db-driver=mysql",
                "--mysql-user=root",
                "--mysql-db=sbtest",
            ])
            .arg(format!("--mysql-socket={}", self.socket.display()))
            .arg(format!("--tables={}", self.tables))
            .arg(format!("--table-size={}", self.table_size))
            .arg(format!("--threads={threads}"))
            .arg(format!("--percentile={pct}"));
        if let Some(t) = time {
            cmd.arg(format!("--time={}", t.as_secs().max(1)));
        }
        cmd.arg(verb).stdin(Stdio::null());
        cmd
    }

    /// Starts `sysbench run` with `threads` connections for `time` in the background;
    /// [`Sysbench::finish`] waits for it and reads its report.
    pub fn start(&self, threads: u32, time: Duration, percentile: u32) -> Result<Child, Error> {
        self.command("run", threads, Some(time), percentile)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Io {
                what: "starting sysbench run".into(),
                source,
            })
    }

    /// As [`Sysbench::start`] with `--histogram=on`: the report then carries sysbench's
    /// latency histogram, from which [`SysbenchReport::percentile`] reads any percentile of
    /// the run (sysbench itself prints only the one of `--percentile`, here 99).
    pub fn start_histogram(&self, threads: u32, time: Duration) -> Result<Child, Error> {
        self.command("run", threads, Some(time), 99)
            .arg("--histogram=on")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Io {
                what: "starting sysbench run".into(),
                source,
            })
    }

    /// Waits for a run started by [`Sysbench::start`] or [`Sysbench::start_histogram`]; fails when sysbench failed (a query
    /// error it does not ignore ends the run with a non-zero status).
    pub fn finish(child: Child) -> Result<SysbenchReport, Error> {
        let out = child.wait_with_output().map_err(|source| Error::Io {
            what: "waiting for sysbench".into(),
            source,
        })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(Error::Failed {
                what: "sysbench run".into(),
                status: out.status.to_string(),
                output: format!("{}{text}", String::from_utf8_lossy(&out.stderr)),
            });
        }
        SysbenchReport::parse(&text)
    }

    /// Runs `CHECK TABLE` on every table; the tables whose check did not end in `OK`.
    pub fn check_tables(&self, db: &MariaDb) -> Result<Vec<String>, Error> {
        let mut bad = Vec::new();
        for t in 1..=self.tables {
            let out = db.sql(&format!("CHECK TABLE sbtest.sbtest{t}"))?;
            // "sbtest.sbtest1\tcheck\tstatus\tOK"
            let last = out.lines().last().unwrap_or_default();
            if !last.ends_with("\tOK") {
                bad.push(format!("sbtest{t}: {out}"));
            }
        }
        Ok(bad)
    }
}

impl SysbenchReport {
    /// Reads sysbench's summary.
    pub fn parse(text: &str) -> Result<SysbenchReport, Error> {
        // "    transactions:                        7035   (698.57 per sec.)"
        let find = |key: &str| -> Option<(f64, Option<f64>)> {
            let line = text.lines().find(|l| l.trim_start().starts_with(key))?;
            let rest = line.trim_start()[key.len()..].trim();
            let mut words = rest.split_whitespace();
            let first: f64 = words.next()?.parse().ok()?;
            let rate = words
                .next()
                .and_then(|w| w.strip_prefix('('))
                .and_then(|w| w.parse().ok());
            Some((first, rate))
        };
        let missing = |what| Error::Parse {
            what,
            output: text.to_owned(),
        };
        let (transactions, tps) = find("transactions:").ok_or_else(|| missing("transactions"))?;
        let (ignored, _) = find("ignored errors:").ok_or_else(|| missing("ignored errors"))?;
        let (reconnects, _) = find("reconnects:").ok_or_else(|| missing("reconnects"))?;
        let pct = text
            .lines()
            .find(|l| l.contains("th percentile:"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| missing("latency percentile"))?;
        let (max_ms, _) = find("max:").ok_or_else(|| missing("latency max"))?;
        // "Latency histogram (values are in milliseconds)", a header, then
        // "       1.728 |**********                               51" up to a blank line.
        let histogram = text
            .lines()
            .skip_while(|l| !l.starts_with("Latency histogram"))
            .skip(2)
            .take_while(|l| l.contains('|'))
            .filter_map(|l| {
                let (value, bar) = l.split_once('|')?;
                let count = bar.split_whitespace().last()?.parse().ok()?;
                Some((value.trim().parse().ok()?, count))
            })
            .collect();
        Ok(SysbenchReport {
            transactions: transactions as u64,
            tps: tps.unwrap_or(0.0),
            ignored_errors: ignored as u64,
            reconnects: reconnects as u64,
            percentile_ms: pct,
            max_ms,
            histogram,
        })
    }

    /// The `pct`th latency percentile in ms from the histogram, computed as sysbench computes
    /// its own (the first bucket at which the running count reaches `pct` % of all
    /// transactions); `None` without a histogram.
    pub fn percentile(&self, pct: f64) -> Option<f64> {
        let total: u64 = self.histogram.iter().map(|&(_, n)| n).sum();
        let goal = total as f64 * pct / 100.0;
        let mut seen = 0;
        self.histogram.iter().find_map(|&(value, n)| {
            seen += n;
            (seen as f64 >= goal).then_some(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_sysbench_summary() {
        let text = "SQL statistics:\n    queries performed:\n        read:    98504\n\
            \x20   transactions:                        7035   (698.57 per sec.)\n\
            \x20   queries:                             140716 (13972.91 per sec.)\n\
            \x20   ignored errors:                      1      (0.10 per sec.)\n\
            \x20   reconnects:                          0      (0.00 per sec.)\n\
            Latency (ms):\n         min:      1.71\n         avg:      22.77\n\
            \x20        max:                                   72.74\n\
            \x20        99th percentile:                       46.63\n";
        let r = SysbenchReport::parse(text).unwrap();
        assert_eq!(r.transactions, 7035);
        assert_eq!(r.ignored_errors, 1);
        assert_eq!(r.reconnects, 0);
        assert!((r.tps - 698.57).abs() < 1e-9);
        assert!((r.percentile_ms - 46.63).abs() < 1e-9);
        assert!((r.max_ms - 72.74).abs() < 1e-9);
        assert!(SysbenchReport::parse("nothing").is_err());
        assert!(r.histogram.is_empty());
        assert_eq!(r.percentile(99.0), None);
    }

    #[test]
    fn reads_the_histogram_and_its_percentiles() {
        // Trimmed from a real `sysbench --histogram=on` run: 100 transactions.
        let text = "Threads started!\n\nLatency histogram (values are in milliseconds)\n\
            \x20      value  ------------- distribution ------------- count\n\
            \x20      0.715 |*********                                50\n\
            \x20      1.728 |*******                                  40\n\
            \x20      9.057 |*                                        5\n\
            \x20     10.090 |                                         4\n\
            \x20     13.704 |                                         1\n \n\
            SQL statistics:\n\
            \x20   transactions:                        100   (33.3 per sec.)\n\
            \x20   ignored errors:                      0      (0.00 per sec.)\n\
            \x20   reconnects:                          0      (0.00 per sec.)\n\
            Latency (ms):\n         max:                                   13.71\n\
            \x20        99th percentile:                       10.09\n";
        let r = SysbenchReport::parse(text).unwrap();
        assert_eq!(
            r.histogram,
            vec![
                (0.715, 50),
                (1.728, 40),
                (9.057, 5),
                (10.090, 4),
                (13.704, 1)
            ]
        );
        assert_eq!(r.percentile(50.0), Some(0.715));
        assert_eq!(r.percentile(95.0), Some(9.057));
        assert_eq!(r.percentile(99.0), Some(10.090));
        assert_eq!(r.percentile(100.0), Some(13.704));
    }
}
