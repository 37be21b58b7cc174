//! When the daemon may use this machine: inside its active hours (`--active-hours
//! 22:00-07:00`, local time) and while it is not paused (`herd-node pause`, which leaves a
//! `paused` file in the data dir, until `herd-node resume`). Outside them it takes no lease,
//! and a shard in training is handed back at once so its owner gets the machine back.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// How often a running shard checks whether it should stop.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// A daily window of local time, `HH:MM-HH:MM`; it may wrap past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes since midnight; `from == to` is the whole day.
    from: u16,
    to: u16,
}

impl Window {
    fn contains(&self, minute: u16) -> bool {
        if self.from <= self.to {
            self.from == self.to || (self.from..self.to).contains(&minute)
        } else {
            minute >= self.from || minute < self.to
        }
    }
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let bad = || format!("`{s}`: expected HH:MM-HH:MM in local time, e.g. 22:00-07:00");
        let (from, to) = s.split_once('-').ok_or_else(bad)?;
        Ok(Window {
            from: minute(from).ok_or_else(bad)?,
            to: minute(to).ok_or_else(bad)?,
        })
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.from), hm(self.to))
    }
}

/// The daemon's rules for using the machine.
#[derive(Debug, Clone)]
pub struct Availability {
    /// Empty: any time.
    windows: Vec<Window>,
    pause_file: PathBuf,
}

impl Availability {
    pub fn new(windows: Vec<Window>, data_dir: &Path) -> Self {
        Availability {
            windows,
            pause_file: pause_file(data_dir),
        }
    }

    /// Why the daemon must not work at `minute` past local midnight, if it must not.
    fn blocked_at(&self, minute: u16) -> Option<String> {
        if self.pause_file.exists() {
            return Some("paused (`herd-node resume` continues)".into());
        }
        if !self.windows.is_empty() && !self.windows.iter().any(|w| w.contains(minute)) {
            let list: Vec<String> = self.windows.iter().map(Window::to_string).collect();
            return Some(format!(
                "outside its active hours ({}, local time)",
                list.join(", ")
            ));
        }
        None
    }

    /// Why the daemon must not work now, if it must not.
    pub fn blocked(&self) -> Option<String> {
        let now = jiff::Zoned::now();
        self.blocked_at(now.hour() as u16 * 60 + now.minute() as u16)
    }

    /// Resolves, with the reason, once the daemon must stop: for `select!` beside a shard.
    pub async fn stopped(&self) -> String {
        loop {
            if let Some(why) = self.blocked() {
                return why;
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}

/// The file whose presence pauses the daemon (`herd-node pause` writes it, `resume` removes it).
pub fn pause_file(data_dir: &Path) -> PathBuf {
    data_dir.join("paused")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u16, m: u16) -> u16 {
        h * 60 + m
    }

    #[test]
    fn windows_parse_print_and_wrap_past_midnight() {
        let night: Window = "22:00-07:30".parse().unwrap();
        assert_eq!(night.to_string(), "22:00-07:30");
        assert!(
            night.contains(at(23, 59)) && night.contains(at(0, 0)) && night.contains(at(7, 29))
        );
        assert!(!night.contains(at(7, 30)) && !night.contains(at(12, 0)));
        let day: Window = "9:00-17:00".parse().unwrap();
        assert!(day.contains(at(9, 0)) && !day.contains(at(17, 0)) && !day.contains(at(8, 59)));
        let always: Window = "00:00-00:00".parse().unwrap();
        assert!(always.contains(at(13, 13)));
        for bad in ["22-07", "24:00-01:00", "10:60-11:00", "10:00", "a:b-c:d"] {
            let e = bad.parse::<Window>().unwrap_err();
            assert!(e.contains("HH:MM-HH:MM"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_pause_file_blocks_and_hours_block_outside_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let any_time = Availability::new(vec![], dir.path());
        assert_eq!(any_time.blocked_at(at(3, 0)), None);
        std::fs::write(pause_file(dir.path()), b"").unwrap();
        assert!(any_time.blocked_at(at(3, 0)).unwrap().contains("paused"));
        std::fs::remove_file(pause_file(dir.path())).unwrap();
        assert_eq!(any_time.blocked_at(at(3, 0)), None);

        let nights = Availability::new(vec!["22:00-07:00".parse().unwrap()], dir.path());
        assert_eq!(nights.blocked_at(at(23, 0)), None);
        let why = nights.blocked_at(at(12, 0)).unwrap();
        assert!(
            why.contains("outside its active hours (22:00-07:00"),
            "{why}"
        );
    }
}
