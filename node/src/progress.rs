//! Progress for long work: a bar on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Reports training steps either to an indicatif bar (TTY) or to `tracing` every `log_every` steps.
#[derive(Debug)]
pub struct StepProgress {
    bar: Option<ProgressBar>,
    total: usize,
    log_every: usize,
    started: std::time::Instant,
    tokens: u64,
}

impl StepProgress {
    pub fn new(total: usize, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        StepProgress {
            bar,
            total,
            log_every: (total / 10).max(1),
            started: std::time::Instant::now(),
            tokens: 0,
        }
    }

    pub fn step(&mut self, step: usize, loss: f64, tokens: usize) {
        self.tokens += tokens as u64;
        let rate = self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        match &self.bar {
            Some(bar) => {
                bar.set_position(step as u64 + 1);
                bar.set_message(format!("loss {loss:.4}, {rate:.0} tok/s"));
            }
            None if (step + 1).is_multiple_of(self.log_every) || step + 1 == self.total => {
                tracing::info!(
                    step = step + 1,
                    total = self.total,
                    loss = format!("{loss:.4}"),
                    tokens_per_s = format!("{rate:.0}"),
                    "training"
                );
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Reports bytes of a download: an indicatif bar on a TTY, a log line per tenth otherwise.
#[derive(Debug)]
pub struct ByteProgress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    next_log: u64,
}

impl ByteProgress {
    /// Starts at `done` of `total` bytes (a resumed download starts part-way).
    pub fn new(total: u64, done: u64, label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(done);
            bar
        });
        ByteProgress {
            bar,
            label: label.to_string(),
            total,
            done,
            next_log: done + total / 10,
        }
    }

    pub fn add(&mut self, bytes: u64) {
        self.done += bytes;
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if self.done >= self.next_log && self.done < self.total => {
                self.next_log = self.done + self.total / 10;
                tracing::info!(what = %self.label, done = self.done, total = self.total, "downloading");
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
