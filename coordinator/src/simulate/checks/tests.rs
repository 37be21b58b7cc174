//! The simulation's adversaries are caught as the check rules say they should be.

use super::*;
use crate::config::{ChecksSection, VerifySection};

fn config(peers: u32, replay_trusted: f64) -> CheckSimConfig {
    let verify = VerifySection {
        replay_trusted,
        ..Default::default()
    };
    CheckSimConfig {
        peers,
        rounds: 12,
        forgers: 0.0,
        lying_checkers: 0.1,
        colluding: 0.1,
        policy: ChecksSection::default().policy(300.0, verify.tolerance()),
        reputation: verify.reputation(),
        effect_cost: 0.23,
        seed: 7,
    }
}

#[test]
fn an_honest_network_bans_nobody_and_pays_its_spot_checks_and_effect_draws() {
    let cfg = CheckSimConfig {
        lying_checkers: 0.0,
        colluding: 0.0,
        ..config(200, 0.1)
    };
    let r = simulate_checks(&cfg);
    assert_eq!(r.deltas, 200 * 12);
    assert_eq!((r.forged, r.honest_banned, r.honest_rejected), (0, 0, 0));
    // 10% checked by one peer each, and canaries besides; the coordinator replays ~5% of the
    // checked ones and effect-checks ~10% of all.
    let real_checks = (r.checks - r.canaries) as f64 / r.deltas as f64;
    assert!((0.07..0.13).contains(&real_checks), "{r:?}");
    assert!(r.canaries > 0, "{r:?}");
    let expected = 0.1 * 0.05 + 0.1 * 0.23;
    assert!(
        (r.coordinator_share - expected).abs() < 0.01,
        "{} vs {expected}",
        r.coordinator_share
    );
}

#[test]
fn liars_are_banned_and_checking_every_delta_keeps_forgeries_out() {
    let r = simulate_checks(&config(300, 1.0));
    assert_eq!((r.honest_banned, r.honest_rejected), (0, 0), "{r:?}");
    // Every liar is banned on its first check (and every identity it comes back as).
    assert!(r.lying_checkers_banned >= 30, "{r:?}");
    assert_eq!(r.liar_checks_before_ban_max, 1, "{r:?}");
    // A forger meets a checker that is not its accomplice almost always.
    assert!(r.forged > 0 && r.forged_kept_out_share > 0.97, "{r:?}");
    assert!(r.forgers_banned >= 15, "{r:?}");
}

#[test]
fn a_lower_check_draw_lets_forgeries_through_in_proportion() {
    let r = simulate_checks(&config(300, 0.25));
    assert_eq!(r.honest_banned, 0, "{r:?}");
    // Kept out: the checked quarter, and the open round's share of a forger's deltas when it
    // is caught.
    assert!(
        (0.2..0.6).contains(&r.forged_kept_out_share),
        "{}",
        r.forged_kept_out_share
    );
    assert!(
        r.forged_averaged > 0 && r.forged_averaged_found_later > 0,
        "{r:?}"
    );
}
