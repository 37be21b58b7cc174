//! `/metrics`: the run as Prometheus sees it, rendered from the status snapshot on each scrape,
//! so the numbers are the ones `/v1/status` shows: OpenMetrics (prometheus-client) for a
//! scraper that asks for it, else the classic text format, which `promtool check metrics`
//! lints.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::status::Status;

/// A labelled counter family with one label.
type Labelled = Family<Vec<(&'static str, String)>, Counter>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn gauge_f64(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: f64) {
    let g: Gauge<f64, AtomicU64> = Gauge::default();
    g.set(value);
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, g),
        None => registry.register(name, help, g),
    }
}

fn seconds(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let c: Counter<f64, AtomicU64> = Counter::default();
    c.inc_by(value);
    registry.register_with_unit(name, help, Unit::Seconds, c);
}

/// Content type of [`render_openmetrics`].
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`render_text`].
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The classic Prometheus text of `s`: the OpenMetrics text with counters' HELP and TYPE
/// naming the `_total` series, and no `# UNIT` or `# EOF` lines.
pub fn render_text(s: &Status) -> String {
    let open = render_openmetrics(s);
    let counters: HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut text = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta.and_then(|(p, rest)| rest.split_once(' ').map(|(n, tail)| (p, n, tail))) {
            Some((p, name, tail)) if counters.contains(name) => {
                text.push_str(&format!("{p}{name}_total {tail}\n"));
            }
            _ => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

/// The OpenMetrics text of `s`.
pub fn render_openmetrics(s: &Status) -> String {
    let mut r = Registry::with_prefix("herd");
    gauge(&mut r, "round", "The round in progress", s.round as i64);
    gauge(
        &mut r,
        "rounds_planned",
        "Rounds the run is to have",
        s.rounds_total as i64,
    );
    counter(
        &mut r,
        "rounds_completed",
        "Rounds aggregated so far",
        s.rounds_completed,
    );
    gauge(
        &mut r,
        "finished",
        "1 once the last round is aggregated",
        s.finished as i64,
    );
    gauge(
        &mut r,
        "active_leases",
        "Leases granted and not yet settled",
        s.active_leases as i64,
    );
    counter(&mut r, "leases_granted", "Leases granted", s.leases_granted);
    counter(
        &mut r,
        "checks_granted",
        "Check leases granted (replays by peers, canaries included)",
        s.checks_granted,
    );
    counter(
        &mut r,
        "peer_checked",
        "Submissions whose replay peers did",
        s.totals.peer_checked,
    );
    counter(
        &mut r,
        "checks_credited",
        "Check reports that agreed with the truth",
        s.totals.checks,
    );
    gauge(
        &mut r,
        "accepted_this_round",
        "Deltas accepted in the round in progress",
        s.accepted_this_round as i64,
    );
    let verdicts = Labelled::default();
    verdicts
        .get_or_create(&vec![("verdict", "accepted".to_string())])
        .inc_by(s.totals.accepted_deltas);
    for (reason, n) in &s.totals.rejects_by_reason {
        verdicts
            .get_or_create(&vec![("verdict", reason.clone())])
            .inc_by(*n);
    }
    r.register(
        "verdicts",
        "Verdicts on submissions, by outcome or rejection reason",
        verdicts,
    );
    let bytes = Labelled::default();
    bytes
        .get_or_create(&vec![("direction", "in".to_string())])
        .inc_by(s.bytes_received);
    bytes
        .get_or_create(&vec![("direction", "out".to_string())])
        .inc_by(s.blob_bytes_served);
    r.register_with_unit(
        "payload",
        "Submission payloads received (in) and blob bytes served to peers (out)",
        Unit::Bytes,
        bytes,
    );
    counter(
        &mut r,
        "accepted_payload_bytes",
        "Payload bytes of accepted deltas",
        s.totals.bytes_uploaded,
    );
    counter(
        &mut r,
        "accepted_dense_fp32_bytes",
        "What the accepted deltas would weigh as dense fp32",
        s.totals.bytes_dense_fp32,
    );
    if let Some(loss) = s.heldout_loss.last() {
        gauge_f64(
            &mut r,
            "heldout_loss",
            "Held-out loss after the last aggregated round",
            None,
            *loss,
        );
    }
    let connected = s.peers.iter().filter(|p| p.connected).count();
    gauge(
        &mut r,
        "peers",
        "Peers that ever asked for work",
        s.peers.len() as i64,
    );
    gauge(
        &mut r,
        "peers_connected",
        "Peers connected now",
        connected as i64,
    );
    seconds(
        &mut r,
        "verify",
        "Time spent on effect checks",
        s.totals.verify_seconds,
    );
    seconds(
        &mut r,
        "replay",
        "Time spent replaying shards",
        s.totals.replay_seconds,
    );
    counter(&mut r, "replays", "Shards replayed", s.totals.replays);
    gauge(
        &mut r,
        "checkpoints",
        "Checkpoints published",
        s.checkpoints.len() as i64,
    );
    let mut text = String::new();
    encode(&mut text, &r).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        let mut s = Status {
            run: "demo".into(),
            round: 3,
            rounds_total: 20,
            rounds_completed: 3,
            heldout_loss: vec![5.5, 2.1, 1.3, 1.1],
            totals: crate::ledger::Totals {
                accepted_deltas: 9,
                bytes_uploaded: 6_300,
                bytes_dense_fp32: 222_417,
                verify_seconds: 1.5,
                replay_seconds: 4.25,
                replays: 3,
                ..Default::default()
            },
            bytes_received: 7_700,
            blob_bytes_served: 3_000_000,
            leases_granted: 12,
            ..Status::default()
        };
        s.totals
            .rejects_by_reason
            .insert("replay_mismatch".into(), 2);
        s
    }

    #[test]
    fn the_figures_are_the_status_figures() {
        let open = render_openmetrics(&sample());
        assert!(open.ends_with("# EOF\n"));
        let text = render_text(&sample());
        for line in [
            "herd_round 3",
            "herd_rounds_completed_total 3",
            "herd_verdicts_total{verdict=\"accepted\"} 9",
            "herd_verdicts_total{verdict=\"replay_mismatch\"} 2",
            "herd_payload_bytes_total{direction=\"in\"} 7700",
            "herd_payload_bytes_total{direction=\"out\"} 3000000",
            "herd_heldout_loss 1.1",
            "herd_replay_seconds_total 4.25",
            "herd_leases_granted_total 12",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
            assert!(
                open.lines().any(|l| l == line),
                "{line} missing from\n{open}"
            );
        }
        assert!(
            text.contains("# TYPE herd_verdicts_total counter"),
            "{text}"
        );
    }

    /// `promtool check metrics` (Debian package `prometheus`; `.ci/run` installs it) lints the
    /// exposition; where it is absent the test says so and checks nothing more.
    #[test]
    fn promtool_finds_nothing_to_complain_about() {
        use std::io::Write;
        let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("skipped: promtool is not installed (apt install prometheus)");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(render_text(&sample()).as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
