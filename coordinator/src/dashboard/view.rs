//! Drawing the dashboard: one pure function of the [`App`] state onto a ratatui frame, so the
//! snapshot tests render exactly what an operator sees.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Axis, Block, Cell, Chart, Dataset, Gauge, GraphType, List, ListItem, ListState, Paragraph, Row,
    Table, TableState,
};

use super::app::{App, Pane};
use crate::status::Status;

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &App) {
    let [header, banner, middle, bottom, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(1),
        Constraint::Min(8),
        Constraint::Length(9),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let empty = Status::default();
    let s = app.status.as_ref().unwrap_or(&empty);
    draw_header(frame, header, app, s);
    frame.render_widget(banner_line(app), banner);
    let [peers, chart] =
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(middle);
    draw_peers(frame, peers, app, s);
    draw_loss(frame, chart, s);
    let [rejects, checkpoints, traffic] = Layout::horizontal([
        Constraint::Percentage(40),
        Constraint::Percentage(30),
        Constraint::Percentage(30),
    ])
    .areas(bottom);
    draw_rejects(frame, rejects, app, s);
    draw_checkpoints(frame, checkpoints, app, s);
    draw_traffic(frame, traffic, app, s);
    frame.render_widget(footer_line(app, s), footer);
}

fn draw_header(frame: &mut Frame, area: Rect, app: &App, s: &Status) {
    let title = if s.run.is_empty() {
        format!(" herd · {} ", app.url)
    } else {
        format!(
            " herd · run {} · {} · {} ",
            s.run,
            short(&s.peer_id),
            app.url
        )
    };
    let block = Block::bordered().title(title.bold());
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [rounds, shards] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    let done = if s.finished { " (finished)" } else { "" };
    let gauge = |color: Color, ratio: f64, label: String| {
        Gauge::default()
            .gauge_style(color)
            .ratio(ratio)
            .label(label)
    };
    frame.render_widget(
        gauge(
            Color::Green,
            fraction(s.rounds_completed, s.rounds_total),
            format!("rounds {}/{}{done}", s.rounds_completed, s.rounds_total),
        ),
        rounds,
    );
    frame.render_widget(
        gauge(
            Color::Cyan,
            fraction(s.accepted_this_round, s.quorum),
            format!(
                "round {}: {}/{} shards accepted (of {}), {} leases out",
                s.round, s.accepted_this_round, s.quorum, s.shards, s.active_leases
            ),
        ),
        shards,
    );
}

/// The selected reject in full (the list cuts long reasons), else what the keys do.
fn footer_line(app: &App, s: &Status) -> Line<'static> {
    // The list shows the newest first.
    let selected = s
        .totals
        .recent_rejects
        .iter()
        .rev()
        .nth(app.rows[Pane::Rejects as usize]);
    match selected {
        Some(r) if app.focus == Pane::Rejects => Line::from(vec![
            Span::raw(format!(" round {}, peer {}: ", r.round, r.peer)),
            Span::styled(r.reason.clone(), Style::new().red()),
        ]),
        _ => {
            Line::from(" q quit · Tab/Shift-Tab pane · ↑↓ j k select · g/G first/last").dark_gray()
        }
    }
}

/// Whether the figures are live, or the last ones seen while the coordinator is away.
fn banner_line(app: &App) -> Line<'static> {
    match (&app.error, app.updated_ms) {
        (Some((error, since)), _) => Line::from(vec![
            Span::styled(" ○ coordinator unreachable", Style::new().red().bold()),
            Span::raw(format!(
                " for {} ({error}); showing the last status, retrying every second",
                ago(app.now_ms, *since)
            )),
        ]),
        (None, Some(at)) => Line::from(vec![
            Span::styled(" ● live", Style::new().green().bold()),
            Span::raw(format!(", updated {} ago", ago(app.now_ms, at))),
        ]),
        (None, None) => Line::from(" … waiting for the first status").yellow(),
    }
}

fn draw_peers(frame: &mut Frame, area: Rect, app: &App, s: &Status) {
    let header = Row::new([
        "peer", "device", "shards", "acc/rej", "tokens/s", "standing", "seen",
    ])
    .bold();
    let rows = s.peers.iter().map(|p| {
        let standing = match p.standing.as_str() {
            "banned" => Cell::from(p.standing.clone()).red(),
            "suspect" => Cell::from(p.standing.clone()).yellow(),
            "trusted" => Cell::from(p.standing.clone()).green(),
            _ => Cell::from(p.standing.clone()),
        };
        let seen = if p.connected {
            "now".to_string()
        } else if p.last_seen_ms == 0 {
            "-".to_string()
        } else {
            ago(app.now_ms, p.last_seen_ms)
        };
        Row::new([
            Cell::from(short(&p.peer)),
            Cell::from(p.device.clone()),
            Cell::from((p.credit.accepted + p.credit.rejected).to_string()),
            Cell::from(format!("{}/{}", p.credit.accepted, p.credit.rejected)),
            Cell::from(format!("{:.0}", p.tokens_per_second)),
            standing,
            Cell::from(seen),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(14),
            Constraint::Min(10),
            Constraint::Length(6),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(6),
        ],
    )
    .header(header)
    .row_highlight_style(Modifier::REVERSED)
    .highlight_symbol("▶ ")
    .block(pane_block(
        format!(
            "peers ({} connected)",
            s.peers.iter().filter(|p| p.connected).count()
        ),
        app.focus == Pane::Peers,
    ));
    // The selection shows only where the keys go.
    let mut state = TableState::default();
    if app.focus == Pane::Peers && !s.peers.is_empty() {
        state.select(Some(app.rows[Pane::Peers as usize]));
    }
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_loss(frame: &mut Frame, area: Rect, s: &Status) {
    let points: Vec<(f64, f64)> = s
        .heldout_loss
        .iter()
        .enumerate()
        .map(|(round, &loss)| (round as f64, loss))
        .collect();
    let title = match s.heldout_loss.last() {
        Some(last) => format!("held-out loss: {last:.4}"),
        None => "held-out loss".to_string(),
    };
    let block = Block::bordered().title(title);
    if points.is_empty() {
        frame.render_widget(Paragraph::new(" no evaluation yet").block(block), area);
        return;
    }
    let top = points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let bottom = points.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let right = (points.len() - 1).max(1) as f64;
    let dataset = Dataset::default()
        .marker(Marker::Braille)
        .graph_type(GraphType::Line)
        .style(Color::Yellow)
        .data(&points);
    let chart = Chart::new(vec![dataset])
        .block(block)
        .x_axis(
            Axis::default()
                .bounds([0.0, right])
                .labels(["round 0".to_string(), format!("{right}")]),
        )
        .y_axis(
            Axis::default()
                .bounds([bottom, top.max(bottom + 1e-9)])
                .labels([format!("{bottom:.2}"), format!("{top:.2}")]),
        );
    frame.render_widget(chart, area);
}

fn draw_rejects(frame: &mut Frame, area: Rect, app: &App, s: &Status) {
    let total: u64 = s.totals.rejects_by_reason.values().sum();
    let items = s.totals.recent_rejects.iter().rev().map(|r| {
        ListItem::new(Line::from(vec![
            Span::raw(format!("r{} {} ", r.round, short(&r.peer))),
            Span::styled(r.reason.clone(), Style::new().red()),
        ]))
    });
    let title = format!("recent rejects ({total} in all)");
    draw_list(
        frame,
        area,
        app,
        Pane::Rejects,
        title,
        " none",
        items.collect(),
    );
}

fn draw_checkpoints(frame: &mut Frame, area: Rect, app: &App, s: &Status) {
    let items = s.checkpoints.iter().rev().map(|c| {
        let bytes: u64 = c.files.iter().map(|f| f.size).sum();
        ListItem::new(format!(
            "{}  loss {:.4}  {}",
            c.id,
            c.heldout_loss,
            human_bytes(bytes as f64)
        ))
    });
    let title = format!("checkpoints ({})", s.checkpoints.len());
    draw_list(
        frame,
        area,
        app,
        Pane::Checkpoints,
        title,
        " none yet",
        items.collect(),
    );
}

/// A pane's list, with `empty` when it has no items and the selection when it has the keys.
fn draw_list(
    frame: &mut Frame,
    area: Rect,
    app: &App,
    pane: Pane,
    title: String,
    empty: &'static str,
    items: Vec<ListItem<'static>>,
) {
    let mut state = ListState::default();
    if app.focus == pane && !items.is_empty() {
        state.select(Some(app.rows[pane as usize]));
    }
    let list = if items.is_empty() {
        List::new([ListItem::new(empty)])
    } else {
        List::new(items)
            .highlight_style(Modifier::REVERSED)
            .highlight_symbol("▶ ")
    }
    .block(pane_block(title, app.focus == pane));
    frame.render_stateful_widget(list, area, &mut state);
}

fn draw_traffic(frame: &mut Frame, area: Rect, app: &App, s: &Status) {
    let ratio = if s.totals.bytes_uploaded > 0 {
        format!(
            "{:.1}×",
            s.totals.bytes_dense_fp32 as f64 / s.totals.bytes_uploaded as f64
        )
    } else {
        "-".to_string()
    };
    let lines = vec![
        Line::from(format!(
            "in  {}/s  ({} in all)",
            human_bytes(app.rate_in),
            human_bytes(s.bytes_received as f64)
        )),
        Line::from(format!(
            "out {}/s  ({} in all)",
            human_bytes(app.rate_out),
            human_bytes(s.blob_bytes_served as f64)
        )),
        Line::from(format!(
            "{} deltas accepted, {ratio} smaller",
            s.totals.accepted_deltas
        )),
        Line::from(format!(
            "{} leases granted, {} replays",
            s.leases_granted, s.totals.replays
        )),
        Line::from(format!(
            "verify {:.1} s, replay {:.1} s",
            s.totals.verify_seconds, s.totals.replay_seconds
        )),
    ];
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("traffic")),
        area,
    );
}

fn pane_block(title: String, focused: bool) -> Block<'static> {
    let block = Block::bordered().title(title);
    if focused {
        block.border_style(Color::Cyan).title_style(Modifier::BOLD)
    } else {
        block
    }
}

/// The first and last characters of a peer id: enough to tell peers apart on screen.
fn short(peer: &str) -> String {
    let chars: Vec<char> = peer.chars().collect();
    if chars.len() <= 13 {
        return peer.to_string();
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 6..].iter().collect();
    format!("{head}…{tail}")
}

fn fraction(done: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        (done as f64 / of as f64).clamp(0.0, 1.0)
    }
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[0])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
