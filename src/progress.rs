//! Progress of the rsync copy: rsync's `--info=progress2` lines, parsed and shown as one live
//! line on a terminal, or as a plain line every minute otherwise (cron mail, the journal).
//!
//! rsync prints `   1,234,567  45%   12.34MB/s    0:00:12 (xfr#12, to-chk=100/2000)`,
//! rewritten in place with `\r`. While it still scans (`ir-chk`: incremental recursion),
//! its percentage and ETA cover only the files found so far: 95% and a minute to go when a
//! fifth is copied (measured at 100000 files). So they are shown only once the scan is
//! complete (`to-chk`); until then the line says "still scanning".

use std::time::{Duration, Instant};

use crate::logging::{self, Sink};

/// One progress report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub bytes: u64,
    pub percent: u8,
    pub rate: String,
    pub eta: String,
    pub files_transferred: u64,
    /// Files still to check and files found so far.
    pub to_check: Option<(u64, u64)>,
    /// rsync is still finding files (`ir-chk`): percent and ETA are of those found so far.
    pub scanning: bool,
}

/// Parse one `--info=progress2` line; None for anything else (the --stats block, say).
pub fn parse(line: &str) -> Option<Report> {
    let mut w = line.split_whitespace();
    let bytes = w.next()?.replace(',', "").parse().ok()?;
    let percent = w.next()?.strip_suffix('%')?.parse().ok()?;
    let rate = w.next()?.to_string();
    if !rate.ends_with("/s") {
        return None;
    }
    let eta = w.next()?.to_string();
    let rest: String = w.collect::<Vec<_>>().join(" ");
    let inner = rest.strip_prefix('(')?.strip_suffix(')')?;
    let mut files_transferred = 0;
    let mut to_check = None;
    let mut scanning = false;
    for part in inner.split(", ") {
        if let Some(n) = part.strip_prefix("xfr#") {
            files_transferred = n.parse().ok()?;
        } else if let Some((kind, v)) = part.split_once('=') {
            scanning = match kind {
                "to-chk" => false,
                "ir-chk" => true,
                _ => continue,
            };
            let (a, b) = v.split_once('/')?;
            to_check = Some((a.parse().ok()?, b.parse().ok()?));
        }
    }
    Some(Report {
        bytes,
        percent,
        rate,
        eta,
        files_transferred,
        to_check,
        scanning,
    })
}

pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

impl Report {
    pub fn line(&self) -> String {
        let files = match self.to_check {
            Some((left, found)) => format!(
                "{} files copied, {}/{found} checked",
                self.files_transferred,
                found - left.min(found)
            ),
            None => format!("{} files copied", self.files_transferred),
        };
        if self.scanning {
            return format!(
                "{} {} - {files}, still scanning",
                human_bytes(self.bytes),
                self.rate
            );
        }
        format!(
            "{} {:>3}% {} ETA {} - {files}",
            human_bytes(self.bytes),
            self.percent,
            self.rate,
            self.eta
        )
    }
}

/// Shows reports as they come.
pub struct Meter {
    live: bool,
    every: Duration,
    last: Option<Instant>,
    latest: Option<Report>,
}

impl Meter {
    /// A live line on a terminal at normal verbosity; otherwise a line every `every`.
    pub fn new(every: Duration) -> Meter {
        Meter {
            live: logging::sink() == Sink::Terminal && logging::level() >= 0,
            every,
            last: None,
            latest: None,
        }
    }

    pub fn update(&mut self, r: Report) {
        if self.live {
            if self
                .last
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(200))
            {
                eprint!("\r\x1b[K  {}", r.line());
                logging::line_shown();
                self.last = Some(Instant::now());
            }
        } else {
            let due = match self.last {
                None => {
                    self.last = Some(Instant::now());
                    false
                }
                Some(t) => t.elapsed() >= self.every,
            };
            if due {
                crate::info!("progress: {}", r.line());
                self.last = Some(Instant::now());
            }
        }
        self.latest = Some(r);
    }

    pub fn finish(self) {
        logging::clear_line();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rsync_progress2_lines() {
        let r =
            parse("    134,217,728  45%   12.34MB/s    0:00:12 (xfr#12, to-chk=100/2000)").unwrap();
        assert_eq!(r.bytes, 134_217_728);
        assert_eq!(r.percent, 45);
        assert_eq!(r.rate, "12.34MB/s");
        assert_eq!(r.eta, "0:00:12");
        assert_eq!(r.files_transferred, 12);
        assert_eq!(r.to_check, Some((100, 2000)));
        assert_eq!(
            r.line(),
            "128.0 MiB  45% 12.34MB/s ETA 0:00:12 - 12 files copied, 1900/2000 checked"
        );
        assert!(!r.scanning);
        // Still scanning: rsync's percent and ETA are of the files found so far, so they
        // are left out (this one is a line seen at 100000 files, a fifth of the way).
        let r = parse("     82,837,504  95%    1.32MB/s    0:00:59 (xfr#19952, ir-chk=1018/22472)")
            .unwrap();
        assert_eq!(r.to_check, Some((1018, 22472)));
        assert!(r.scanning);
        assert_eq!(
            r.line(),
            "79.0 MiB 1.32MB/s - 19952 files copied, 21454/22472 checked, still scanning"
        );
        // Before the first file, rsync prints no parenthesis at all.
        assert_eq!(parse("              0   0%    0.00kB/s    0:00:00"), None);
    }

    #[test]
    fn stats_lines_are_not_progress() {
        for l in [
            "Number of files: 2,003 (reg: 2,000, dir: 3)",
            "Total transferred file size: 1,024 bytes",
            "sent 1,234 bytes  received 56 bytes  2,580.00 bytes/sec",
            "",
        ] {
            assert_eq!(parse(l), None, "{l}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
