//! The dashboard's state: the last status fetched, what the operator has selected, and the
//! byte rates between two snapshots. No terminal here, so tests drive it directly.

use crate::status::Status;

/// The panes that take the arrow keys, in Tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Peers,
    Rejects,
    Checkpoints,
}

impl Pane {
    fn next(self) -> Self {
        match self {
            Pane::Peers => Pane::Rejects,
            Pane::Rejects => Pane::Checkpoints,
            Pane::Checkpoints => Pane::Peers,
        }
    }

    fn previous(self) -> Self {
        self.next().next()
    }
}

/// A key, as the dashboard understands it (the terminal loop maps crossterm's keys to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Quit,
    NextPane,
    PreviousPane,
    Up,
    Down,
    First,
    Last,
}

/// Counters of the last snapshot, to turn the next one into rates.
#[derive(Debug, Clone, Copy)]
struct Counters {
    at_ms: u64,
    received: u64,
    served: u64,
}

#[derive(Debug)]
pub struct App {
    /// The coordinator's HTTP address, shown in the header.
    pub url: String,
    /// The last status that arrived; kept while the coordinator is away.
    pub status: Option<Status>,
    /// When it arrived.
    pub updated_ms: Option<u64>,
    /// Why the fetches since then failed, and since when.
    pub error: Option<(String, u64)>,
    /// The clock the view reads ("last seen 3 s ago"), set by the loop, fixed by tests.
    pub now_ms: u64,
    pub focus: Pane,
    /// Selected row of each pane.
    pub rows: [usize; 3],
    /// Submission payload bytes received and blob bytes served, per second.
    pub rate_in: f64,
    pub rate_out: f64,
    last: Option<Counters>,
    pub quit: bool,
}

impl App {
    pub fn new(url: impl Into<String>) -> Self {
        App {
            url: url.into(),
            status: None,
            updated_ms: None,
            error: None,
            now_ms: 0,
            focus: Pane::Peers,
            rows: [0; 3],
            rate_in: 0.0,
            rate_out: 0.0,
            last: None,
            quit: false,
        }
    }

    /// A fresh snapshot. The counters restart with the coordinator ("since this start"), so a
    /// snapshot whose counters went down starts the rates over instead of showing nonsense.
    pub fn on_status(&mut self, status: Status, now_ms: u64) {
        let now = Counters {
            at_ms: now_ms,
            received: status.bytes_received,
            served: status.blob_bytes_served,
        };
        if let Some(prev) = self.last
            && now.at_ms > prev.at_ms
            && now.received >= prev.received
            && now.served >= prev.served
        {
            let secs = (now.at_ms - prev.at_ms) as f64 / 1000.0;
            self.rate_in = (now.received - prev.received) as f64 / secs;
            self.rate_out = (now.served - prev.served) as f64 / secs;
        } else {
            self.rate_in = 0.0;
            self.rate_out = 0.0;
        }
        self.last = Some(now);
        self.status = Some(status);
        self.updated_ms = Some(now_ms);
        self.error = None;
        self.now_ms = now_ms;
        self.clamp_rows();
    }

    /// A failed fetch: the last status stays on screen, marked stale.
    pub fn on_error(&mut self, error: String, now_ms: u64) {
        let since = self.error.as_ref().map_or(now_ms, |(_, since)| *since);
        self.error = Some((error, since));
        self.now_ms = now_ms;
    }

    pub fn on_key(&mut self, key: Key) {
        let focus = self.focus as usize;
        let row = &mut self.rows[focus];
        match key {
            Key::Quit => self.quit = true,
            Key::NextPane => self.focus = self.focus.next(),
            Key::PreviousPane => self.focus = self.focus.previous(),
            Key::Up => *row = row.saturating_sub(1),
            Key::Down => *row += 1,
            Key::First => *row = 0,
            Key::Last => *row = usize::MAX,
        }
        self.clamp_rows();
    }

    /// How many rows each pane has now.
    fn lengths(&self) -> [usize; 3] {
        self.status.as_ref().map_or([0; 3], |s| {
            [
                s.peers.len(),
                s.totals.recent_rejects.len(),
                s.checkpoints.len(),
            ]
        })
    }

    fn clamp_rows(&mut self) {
        let lengths = self.lengths();
        for (row, len) in self.rows.iter_mut().zip(lengths) {
            *row = (*row).min(len.saturating_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(received: u64, served: u64, peers: usize) -> Status {
        Status {
            bytes_received: received,
            blob_bytes_served: served,
            peers: (0..peers)
                .map(|i| crate::status::PeerStatus {
                    peer: format!("peer{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rates_come_from_two_snapshots_and_restart_with_the_coordinator() {
        let mut app = App::new("http://x");
        app.on_status(status(1000, 0, 0), 10_000);
        assert_eq!(app.rate_in, 0.0, "one snapshot is no rate");
        app.on_status(status(3000, 4096, 0), 12_000);
        assert_eq!((app.rate_in, app.rate_out), (1000.0, 2048.0));
        // The coordinator restarted: its counters begin at zero again.
        app.on_status(status(10, 0, 0), 13_000);
        assert_eq!((app.rate_in, app.rate_out), (0.0, 0.0));
    }

    #[test]
    fn errors_keep_the_status_and_remember_since_when() {
        let mut app = App::new("http://x");
        app.on_status(status(0, 0, 2), 1_000);
        app.on_error("refused".into(), 2_000);
        app.on_error("refused again".into(), 5_000);
        assert_eq!(app.error, Some(("refused again".into(), 2_000)));
        assert!(app.status.is_some());
        app.on_status(status(0, 0, 2), 6_000);
        assert_eq!(app.error, None);
    }

    #[test]
    fn keys_move_within_the_focused_pane_and_stop_at_its_ends() {
        let mut app = App::new("http://x");
        app.on_status(status(0, 0, 3), 0);
        app.on_key(Key::Down);
        app.on_key(Key::Down);
        app.on_key(Key::Down);
        assert_eq!(app.rows, [2, 0, 0]);
        app.on_key(Key::NextPane);
        assert_eq!(app.focus, Pane::Rejects);
        app.on_key(Key::Down);
        assert_eq!(app.rows, [2, 0, 0], "no rejects: nothing to move to");
        app.on_key(Key::PreviousPane);
        app.on_key(Key::First);
        assert_eq!(app.rows[0], 0);
        app.on_key(Key::Last);
        assert_eq!(app.rows[0], 2);
        // Fewer peers in the next snapshot: the selection follows.
        app.on_status(status(0, 0, 1), 1);
        assert_eq!(app.rows[0], 0);
        app.on_key(Key::Quit);
        assert!(app.quit);
    }
}
