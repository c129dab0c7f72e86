//! How uploads are shown: progress bars (per file and total: bytes, rate,
//! ETA) on a terminal, a plain line per file otherwise, or a JSON object per
//! file and a summary (`--json`) for scripts.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::client::Uploaded;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Plain,
    Json,
}

impl Mode {
    /// Bars only where a person watches (stderr is a terminal).
    pub fn pick(json: bool) -> Mode {
        if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Plain
        }
    }
}

pub struct Reporter {
    mode: Mode,
    multi: MultiProgress,
    total: Option<ProgressBar>,
    /// Files announced by [`Reporter::add_work`].
    files: AtomicU64,
    started: Instant,
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

/// One file's bar (nothing drawn outside [`Mode::Bars`]); moves the total.
#[derive(Clone, Default)]
pub struct FileBar {
    bar: Option<ProgressBar>,
    total: Option<ProgressBar>,
    position: Arc<AtomicU64>,
}

impl FileBar {
    pub fn inc(&self, n: u64) {
        self.position.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(t) = &self.total {
            t.inc(n);
        }
    }

    /// Jumps to `p` (a resume point): the total moves by the difference.
    pub fn set_position(&self, p: u64) {
        let old = self.position.swap(p, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_position(p);
        }
        if let Some(t) = &self.total {
            t.set_position((t.position() + p).saturating_sub(old));
        }
    }

    pub fn message(&self, m: &'static str) {
        if let Some(b) = &self.bar {
            b.set_message(m);
        }
    }
}

impl Reporter {
    /// A reporter with no work yet: [`Reporter::add_work`] says what comes.
    pub fn new(mode: Mode) -> Reporter {
        let multi = MultiProgress::with_draw_target(if mode == Mode::Bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let total = (mode == Mode::Bars).then(|| {
            let t = multi.add(ProgressBar::new(0));
            t.set_style(style(
                "total {bytes}/{total_bytes} of {msg} file(s) {bar:30} {binary_bytes_per_sec} ETA {eta}",
            ));
            t
        });
        Reporter {
            mode,
            multi,
            total,
            files: AtomicU64::new(0),
            started: Instant::now(),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// More files to send (a sync pass finds its work as it goes): the
    /// total bar grows by them.
    pub fn add_work(&self, files: usize, bytes: u64) {
        let n = self.files.fetch_add(files as u64, Ordering::Relaxed) + files as u64;
        if let Some(t) = &self.total {
            t.inc_length(bytes);
            t.set_message(n.to_string());
        }
    }

    pub fn file(&self, key: &str, size: u64) -> FileBar {
        let bar = (self.mode == Mode::Bars).then(|| {
            let b = self.multi.insert_from_back(1, ProgressBar::new(size));
            b.set_style(style(&format!(
                "{} {{bytes}}/{{total_bytes}} {{bar:30}} {{binary_bytes_per_sec}} ETA {{eta}} {{msg}}",
                shorten(key, 40)
            )));
            b
        });
        FileBar {
            bar,
            total: self.total.clone(),
            position: Arc::default(),
        }
    }

    /// A file ended: its bar goes, a line (plain) or an object (JSON) says how.
    pub fn finished(&self, path: &str, bar: &FileBar, result: &anyhow::Result<Uploaded>) {
        if let Some(b) = &bar.bar {
            b.finish_and_clear();
            self.multi.remove(b);
        }
        match result {
            Ok(u) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(u.bytes_sent, Ordering::Relaxed);
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let line = match (self.mode, result) {
            (Mode::Json, Ok(u)) => {
                serde_json::json!({"path": path, "status": "ok", "result": u}).to_string()
            }
            (Mode::Json, Err(e)) => {
                serde_json::json!({"path": path, "status": "failed", "error": format!("{e:#}")})
                    .to_string()
            }
            (_, Ok(u)) => {
                let how = if u.replayed {
                    "already uploaded".to_string()
                } else if u.skipped {
                    "skipped (exists)".to_string()
                } else if u.deduplicated {
                    "deduplicated (server-side copy)".to_string()
                } else if u.bytes_resumed > 0 {
                    format!("uploaded, resumed at byte {}", u.bytes_resumed)
                } else {
                    "uploaded".to_string()
                };
                format!(
                    "{how}: {path} -> {} ({} bytes, sha256 {}, version {})",
                    u.key, u.size, u.sha256, u.version
                )
            }
            (_, Err(e)) => format!("FAILED: {path}: {e:#}"),
        };
        if self.mode == Mode::Json {
            println!("{line}");
        } else {
            self.say(&line);
        }
    }

    /// A line that does not break the bars.
    pub fn say(&self, line: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(line);
            }
            Mode::Plain => eprintln!("{line}"),
            Mode::Json => {}
        }
    }

    /// The last line; the number of files that failed.
    pub fn summary(&self) -> u64 {
        if let Some(t) = &self.total {
            t.finish_and_clear();
        }
        let (ok, failed) = (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        let bytes = self.bytes.load(Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        if self.mode == Mode::Json {
            println!(
                "{}",
                serde_json::json!({"summary": {"ok": ok, "failed": failed, "bytes_sent": bytes, "seconds": seconds}})
            );
        } else {
            eprintln!(
                "{ok} file(s) done, {failed} failed; {bytes} bytes sent in {seconds:.1} s ({:.1} MiB/s)",
                bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9)
            );
        }
        failed
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// At most `n` characters, the end kept (where file names differ).
fn shorten(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        format!("{s:n$}")
    } else {
        let tail: String = s.chars().skip(count - (n - 1)).collect();
        format!("…{tail}")
    }
}
