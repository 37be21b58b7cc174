//! Snapshot tests: recorded `/v1/status` answers drawn on ratatui's `TestBackend` and compared
//! with the text in `snapshots/` (insta; `cargo insta review` or `INSTA_UPDATE=always` to
//! accept a deliberate change).

use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::app::{App, Key};
use super::view;
use crate::status::Status;

const WIDTH: u16 = 120;
const HEIGHT: u16 = 34;

/// A status the coordinator of a demo run served (3 nodes, mid-run), and one of the attack
/// suite's runs (an adversary among honest nodes, its deltas rejected, itself banned).
fn recorded(name: &str) -> Status {
    let path = format!(
        "{}/src/dashboard/testdata/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn screen(app: &App) -> String {
    let mut terminal = Terminal::new(TestBackend::new(WIDTH, HEIGHT)).unwrap();
    terminal.draw(|frame| view::draw(frame, app)).unwrap();
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        let line: String = (0..buffer.area.width)
            .map(|x| buffer[(x, y)].symbol())
            .collect();
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The time of the recorded status, plus `later_ms`: "last seen" figures stay fixed.
fn app_with(status: Status, later_ms: u64) -> App {
    let at = status
        .peers
        .iter()
        .map(|p| p.last_seen_ms)
        .max()
        .unwrap_or(0);
    let mut app = App::new("http://127.0.0.1:8080");
    app.on_status(status, at);
    app.now_ms = at + later_ms;
    app
}

#[test]
fn before_the_first_status() {
    let app = App::new("http://127.0.0.1:8080");
    insta::assert_snapshot!(screen(&app));
}

#[test]
fn an_empty_run() {
    let status = Status {
        run: "alpaca-smollm".into(),
        peer_id: "12D3KooWQqoq7eU1nL3xcwW9Hcx3pa8fRr5NFLgoPy1rR8pMbwQz".into(),
        rounds_total: 20,
        quorum: 3,
        shards: 4,
        heldout_loss: vec![6.9535],
        ..Default::default()
    };
    insta::assert_snapshot!(screen(&app_with(status, 0)));
}

#[test]
fn a_demo_run_mid_way() {
    insta::assert_snapshot!(screen(&app_with(recorded("demo.json"), 2_000)));
}

#[test]
fn a_run_with_rejects_and_a_ban_with_the_rejects_pane_focused() {
    let mut app = app_with(recorded("attacked.json"), 3_000);
    app.on_key(Key::NextPane);
    app.on_key(Key::Down);
    insta::assert_snapshot!(screen(&app));
}

#[test]
fn a_coordinator_that_went_away_leaves_its_last_status_marked_stale() {
    let mut app = app_with(recorded("demo.json"), 0);
    let now = app.now_ms;
    app.on_error("Connection refused".into(), now + 1_000);
    app.on_error("Connection refused".into(), now + 13_000);
    let text = screen(&app);
    assert!(
        text.contains("coordinator unreachable for 12 s (Connection refused)"),
        "{text}"
    );
    assert!(text.contains("peers (3 connected)"), "{text}");
    insta::assert_snapshot!(text);
}
