//! `herd-coordinator dashboard --url URL`: a terminal view of a running coordinator (rounds,
//! peers, held-out loss, traffic, rejects, checkpoints), polling `/v1/status` once a second.
//! When the coordinator goes away the last status stays on screen, marked stale, and the
//! dashboard picks up again once it is back.
//!
//! - [`app`]: the state and what the keys do (no terminal).
//! - [`view`]: drawing that state (pure; snapshot-tested with ratatui's `TestBackend`).

pub mod app;
pub mod view;

#[cfg(test)]
mod tests;

use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use herd_protocol::messages::now_ms;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::status::Status;
use app::{App, Key};

/// How often the coordinator is asked for its status.
const POLL: Duration = Duration::from_secs(1);

/// Runs the dashboard until the operator quits.
pub fn run(url: &str) -> Result<()> {
    let base = url.trim_end_matches('/').to_string();
    let (tx, rx) = mpsc::sync_channel(2);
    let status_url = format!("{base}/v1/status");
    // The poller ends when the dashboard drops its receiver.
    let poller = std::thread::spawn(move || {
        loop {
            if tx.send(fetch(&status_url)).is_err() {
                return;
            }
            std::thread::sleep(POLL);
        }
    });
    let mut app = App::new(base);
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        while !app.quit {
            while let Ok(fetched) = rx.try_recv() {
                match fetched {
                    Ok(status) => app.on_status(status, now_ms()),
                    Err(e) => app.on_error(e, now_ms()),
                }
            }
            app.now_ms = now_ms();
            terminal.draw(|frame| view::draw(frame, &app))?;
            if event::poll(Duration::from_millis(250))?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
                && let Some(key) = map_key(key.code, key.modifiers)
            {
                app.on_key(key);
            }
        }
        Ok(())
    })();
    ratatui::restore();
    drop(rx);
    let _ = poller.join();
    result
}

fn map_key(code: KeyCode, modifiers: KeyModifiers) -> Option<Key> {
    Some(match code {
        KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
        KeyCode::Tab => Key::NextPane,
        KeyCode::BackTab => Key::PreviousPane,
        KeyCode::Up | KeyCode::Char('k') => Key::Up,
        KeyCode::Down | KeyCode::Char('j') => Key::Down,
        KeyCode::Home | KeyCode::Char('g') => Key::First,
        KeyCode::End | KeyCode::Char('G') => Key::Last,
        _ => return None,
    })
}

/// One `/v1/status`, or why not, in words.
fn fetch(url: &str) -> Result<Status, String> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .new_agent();
    let body = agent
        .get(url)
        .call()
        .map_err(|e| e.to_string())?
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("unexpected /v1/status: {e}"))
}
