//! `kvload`: closed-loop load against the demo server, every answer checked.
//!
//! ```text
//! kvload --port P [--connections C] [--duration S] [--rate R] [--json]
//!        [--keys K] [--value-len N] [--negative-incr] [--incr-sign applied|ignored|either]
//! ```
//! Prints requests, failures and latency percentiles (µs). SIGINT or SIGTERM stops the load
//! early; the report is printed all the same. Exit codes: 0 all requests answered correctly,
//! 1 some failed, 2 bad arguments.

#![deny(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use kgpatch_examples::load::{self, IncrSign, LoadConfig};

const USAGE: &str = "usage: kvload --port P [--connections C] [--duration S] [--rate R] [--json]
              [--keys K] [--value-len N] [--negative-incr] [--incr-sign S]
  --port P          the demo server's port on 127.0.0.1 (required)
  --connections C   concurrent connections, one thread each (default 4)
  --duration S      seconds to run, fractions allowed (default 5)
  --rate R          total requests per second (default: as fast as answers come)
  --keys K          keys per connection (default 64)
  --value-len N     longest value in bytes (default 64)
  --negative-incr   also send negative INCR amounts (fails on the unpatched server)
  --incr-sign S     what INCR k -n must do: applied (subtract; default), ignored (add: the
                    planted bug), either (a server being patched: each answer one or the other)
  --json            print one JSON object instead of the table
SIGINT/SIGTERM stop the load early and print the report.
exit status: 0 no failure, 1 some request failed, 2 bad arguments";

fn parse<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag} {v}: not a valid number"))
}

fn main() -> ExitCode {
    let mut port: Option<u16> = None;
    let mut cfg = LoadConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let mut json = false;
    let mut args = std::env::args().skip(1);
    let result = (|| -> Result<(), String> {
        while let Some(a) = args.next() {
            match a.as_str() {
                "--port" => port = Some(parse(&a, args.next())?),
                "--connections" => cfg.connections = parse(&a, args.next())?,
                "--duration" => {
                    let s: f64 = parse(&a, args.next())?;
                    if !(s.is_finite() && s > 0.0) {
                        return Err(format!("--duration {s}: must be positive"));
                    }
                    cfg.duration = Duration::from_secs_f64(s);
                }
                "--rate" => {
                    let r: f64 = parse(&a, args.next())?;
                    if !(r.is_finite() && r > 0.0) {
                        return Err(format!("--rate {r}: must be positive"));
                    }
                    cfg.rate = Some(r);
                }
                "--keys" => cfg.keys_per_connection = parse(&a, args.next())?,
                "--value-len" => cfg.max_value_len = parse(&a, args.next())?,
                "--negative-incr" => cfg.negative_incr = true,
                "--incr-sign" => {
                    cfg.incr_sign = match args.next().as_deref() {
                        Some("applied") => IncrSign::Applied,
                        Some("ignored") => IncrSign::Ignored,
                        Some("either") => IncrSign::Either,
                        other => {
                            return Err(format!(
                                "--incr-sign wants applied, ignored or either, not {other:?}"
                            ))
                        }
                    }
                }
                "--json" => json = true,
                "--help" | "-h" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("kvload: {e}\n{USAGE}");
        return ExitCode::from(2);
    }
    let Some(port) = port.filter(|p| *p != 0) else {
        eprintln!(
            "kvload: --port is required (the number the server printed after LISTENING)\n{USAGE}"
        );
        return ExitCode::from(2);
    };
    if cfg.connections == 0 || cfg.keys_per_connection == 0 || cfg.max_value_len == 0 {
        eprintln!("kvload: --connections, --keys and --value-len must be at least 1");
        return ExitCode::from(2);
    }
    if cfg.max_value_len > 2048 {
        eprintln!(
            "kvload: --value-len {} exceeds the server's 2048-byte limit",
            cfg.max_value_len
        );
        return ExitCode::from(2);
    }
    cfg.addr.set_port(port);
    let stop = match kgpatch_examples::sys::stop_flag_on(&[libc::SIGINT, libc::SIGTERM]) {
        Ok(flag) => flag,
        Err(e) => {
            eprintln!("kvload: cannot install the SIGINT/SIGTERM handler: {e}");
            return ExitCode::from(1);
        }
    };
    let report = load::run_until(cfg, stop);
    if json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    if report.failures == 0 && report.requests > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
