//! Outlier detection as exact sequences: which call ejects, when an endpoint returns,
//! the percentage cap, the multiplier growing and decaying.

use std::{net::SocketAddr, time::Duration};

use super::*;
use std::sync::atomic::Ordering::Relaxed;

use crate::Code;
use crate::rng::tests::Top;

fn ep(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 50051))
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn outliers(config: OutlierConfig, n: u8) -> Outliers {
    let mut o = Outliers::new(config);
    o.sync(&(1..=n).map(ep).collect::<Vec<_>>());
    o
}

fn consecutive(threshold: u32, max_percent: u32) -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: Some(threshold),
        max_ejection_percent: max_percent,
        ..OutlierConfig::default()
    }
}

/// `calls` calls on `addr`, the first `failed` of them failing.
fn calls(o: &mut Outliers, addr: SocketAddr, calls: u32, failed: u32) {
    for i in 0..calls {
        o.record(addr, i < failed, s(0));
    }
}

#[test]
fn the_fifth_failure_in_a_row_ejects_and_a_success_resets_the_count() {
    let mut o = outliers(consecutive(5, 100), 3);
    for _ in 0..4 {
        assert_eq!(o.record(ep(1), true, s(1)), None);
    }
    assert_eq!(o.record(ep(1), false, s(1)), None, "a success resets the count");
    for _ in 0..4 {
        assert_eq!(o.record(ep(1), true, s(2)), None);
    }
    let ejected = Event::Ejected { addr: ep(1), why: Why::ConsecutiveFailures(5), times: 1 };
    assert_eq!(o.record(ep(1), true, s(2)), Some(ejected));
    assert!(o.is_ejected(ep(1)));
    assert_eq!(o.record(ep(1), true, s(2)), None, "already out");
}

#[test]
fn an_ejected_endpoint_returns_after_base_times_multiplier_which_decays() {
    let mut o = outliers(consecutive(1, 100), 2);
    o.record(ep(1), true, s(0));
    assert_eq!(o.on_interval(s(10), &mut Top), []);
    assert_eq!(o.on_interval(s(20), &mut Top), []);
    assert_eq!(o.on_interval(s(30), &mut Top), [Event::Returned { addr: ep(1) }], "30 s × 1");
    // Ejected again at once: twice as long.
    let again = o.record(ep(1), true, s(31));
    assert_eq!(again, Some(Event::Ejected { addr: ep(1), why: Why::ConsecutiveFailures(1), times: 2 }));
    assert_eq!(o.on_interval(s(90), &mut Top), []);
    assert_eq!(o.on_interval(s(91), &mut Top), [Event::Returned { addr: ep(1) }], "30 s × 2");
    // Two intervals not ejected: the multiplier decays back to 0.
    o.on_interval(s(101), &mut Top);
    o.on_interval(s(111), &mut Top);
    let fresh = o.record(ep(1), true, s(112));
    assert_eq!(fresh, Some(Event::Ejected { addr: ep(1), why: Why::ConsecutiveFailures(1), times: 1 }));
}

#[test]
fn the_ejection_time_stops_at_the_maximum() {
    let config = OutlierConfig { max_ejection_time: s(50), ..consecutive(1, 100) };
    let mut o = outliers(config, 1);
    for times in 1..=4 {
        let at = s(1000 * u64::from(times));
        assert!(matches!(o.record(ep(1), true, at), Some(Event::Ejected { times: t, .. }) if t == times));
        let back = if times == 1 { 30 } else { 50 };
        assert_eq!(o.on_interval(at + s(back - 1), &mut Top), [], "times {times}");
        assert_eq!(o.on_interval(at + s(back), &mut Top), [Event::Returned { addr: ep(1) }], "times {times}");
    }
}

#[test]
fn at_most_max_ejection_percent_yet_always_one() {
    let mut o = outliers(consecutive(1, 10), 3);
    assert!(o.record(ep(1), true, s(0)).is_some(), "10 % of 3 rounds to none: one is allowed anyway");
    assert_eq!(o.record(ep(2), true, s(0)), None, "a second would be 66 %");
    // As A50 counts: eject while fewer than the percentage are out (25 % < 50 %).
    let mut o = outliers(consecutive(1, 50), 4);
    assert!(o.record(ep(1), true, s(0)).is_some());
    assert!(o.record(ep(2), true, s(0)).is_some(), "25 % out, under 50 %: one more");
    assert!(o.record(ep(3), true, s(0)).is_none(), "50 % out: no more");
    let mut o = outliers(consecutive(1, 0), 2);
    assert!(o.record(ep(1), true, s(0)).is_some(), "even at 0 %, one may go");
}

#[test]
fn failure_percentage_ejects_only_with_enough_hosts_and_calls() {
    let fp = FailurePercentage { threshold: 85, enforcement_percentage: 100, minimum_hosts: 5, request_volume: 50 };
    let config = OutlierConfig { failure_percentage: Some(fp), max_ejection_percent: 100, ..OutlierConfig::default() };
    let mut o = outliers(config.clone(), 5);
    calls(&mut o, ep(1), 50, 45);
    for n in 2..=5 {
        calls(&mut o, ep(n), 50, 0);
    }
    let out = o.on_interval(s(10), &mut Top);
    assert_eq!(out, [Event::Ejected { addr: ep(1), why: Why::FailurePercentage(90), times: 1 }]);

    let mut o = outliers(config.clone(), 5);
    calls(&mut o, ep(1), 49, 49);
    for n in 2..=5 {
        calls(&mut o, ep(n), 50, 0);
    }
    assert_eq!(o.on_interval(s(10), &mut Top), [], "49 calls are under the request volume");

    let mut o = outliers(config, 4);
    calls(&mut o, ep(1), 50, 50);
    for n in 2..=4 {
        calls(&mut o, ep(n), 50, 0);
    }
    assert_eq!(o.on_interval(s(10), &mut Top), [], "4 hosts are under the minimum of 5");
}

#[test]
fn success_rate_ejects_below_mean_minus_the_stdev_factor() {
    let sr = SuccessRate { stdev_factor: 1900, enforcement_percentage: 100, minimum_hosts: 5, request_volume: 100 };
    let config = OutlierConfig { success_rate: Some(sr), max_ejection_percent: 100, ..OutlierConfig::default() };
    let mut o = outliers(config, 5);
    calls(&mut o, ep(1), 100, 50);
    for n in 2..=5 {
        calls(&mut o, ep(n), 100, 0);
    }
    // Rates 0.5, 1, 1, 1, 1: mean 0.9, σ 0.2, threshold 0.9 − 1.9 × 0.2 = 0.52.
    let out = o.on_interval(s(10), &mut Top);
    assert_eq!(out, [Event::Ejected { addr: ep(1), why: Why::SuccessRate { rate: 500, threshold: 520 }, times: 1 }]);
    // The counts start over each interval: nothing new to judge.
    assert_eq!(o.on_interval(s(20), &mut Top), []);
}

#[test]
fn enforcement_percentage_zero_never_ejects() {
    let fp = FailurePercentage { threshold: 0, enforcement_percentage: 0, minimum_hosts: 1, request_volume: 1 };
    let config = OutlierConfig { failure_percentage: Some(fp), max_ejection_percent: 100, ..OutlierConfig::default() };
    let mut o = outliers(config, 2);
    calls(&mut o, ep(1), 10, 10);
    assert_eq!(o.on_interval(s(10), &mut Top), []);
}

#[test]
fn membership_changes_forget_gone_endpoints_and_keep_the_rest() {
    let mut o = outliers(consecutive(1, 100), 2);
    o.record(ep(1), true, s(0));
    o.sync(&[ep(1), ep(3)]);
    assert!(o.is_ejected(ep(1)), "kept across the update");
    assert!(!o.is_ejected(ep(2)));
    assert_eq!(o.record(ep(2), true, s(1)), None, "unknown endpoints are ignored");
}

#[test]
fn calls_record_into_the_shared_tally_and_the_owner_ejects_on_its_signal() {
    let mut o = outliers(consecutive(3, 100), 2);
    let tally = o.tally(ep(1)).expect("a member has a tally");
    assert!(!tally.record_status(Code::Unavailable));
    assert!(!tally.record_status(Code::NotFound), "not a listed code: a success, the run restarts");
    assert!(!tally.record_status(Code::Internal));
    assert!(!tally.record(true));
    assert!(tally.record_status(Code::DataLoss), "the third in a row signals");
    assert_eq!(o.check(s(5)), [Event::Ejected { addr: ep(1), why: Why::ConsecutiveFailures(3), times: 1 }]);
    assert_eq!(o.check(s(5)), [], "already out");
    assert!(!tally.record(true) && !tally.record(true));
    assert!(tally.record(true), "every further run of the threshold signals again, in case the cap refused");
    o.on_interval(s(10), &mut Top);
    assert_eq!(o.last_counts(ep(1)), (1, 7));
    assert_eq!(o.on_interval(s(35), &mut Top), [Event::Returned { addr: ep(1) }]);
    assert_eq!(tally.consecutive(), 0, "a returning endpoint starts a fresh run");
}

#[test]
fn without_consecutive_failures_a_run_never_signals() {
    let o = outliers(OutlierConfig::default(), 1);
    let tally = o.tally(ep(1)).unwrap();
    assert!((0..100).all(|_| !tally.record(true)));
}

#[test]
fn a_replica_that_reconnects_starts_over_but_keeps_its_multiplier() {
    let mut o = outliers(consecutive(2, 100), 2);
    let tally = o.tally(ep(1)).unwrap();
    tally.record(true);
    assert_eq!(o.reconnected(ep(1)), None, "not ejected: nothing to return");
    assert!(!tally.record(true), "the run started over");
    o.record(ep(1), true, s(0));
    assert!(o.is_ejected(ep(1)));
    assert_eq!(o.reconnected(ep(1)), Some(Event::Returned { addr: ep(1) }));
    assert!(!o.is_ejected(ep(1)));
    o.record(ep(1), true, s(1));
    let again = o.record(ep(1), true, s(1));
    assert_eq!(again, Some(Event::Ejected { addr: ep(1), why: Why::ConsecutiveFailures(2), times: 2 }));
}

#[test]
fn failure_percentage_compares_exactly_and_counts_do_not_overflow() {
    let fp = FailurePercentage { threshold: 85, enforcement_percentage: 100, minimum_hosts: 1, request_volume: 1 };
    let config = OutlierConfig { failure_percentage: Some(fp), max_ejection_percent: 100, ..OutlierConfig::default() };
    let mut o = outliers(config.clone(), 1);
    calls(&mut o, ep(1), 1000, 859); // 85.9 %
    let out = o.on_interval(s(10), &mut Top);
    assert_eq!(out, [Event::Ejected { addr: ep(1), why: Why::FailurePercentage(85), times: 1 }]);
    let mut o = outliers(config, 1);
    calls(&mut o, ep(1), 1000, 850); // exactly 85 %: not over
    assert_eq!(o.on_interval(s(10), &mut Top), []);
    // Counts near u32::MAX: no overflow in the sums.
    let tally = o.tally(ep(1)).unwrap();
    tally.ok.store(u32::MAX, Relaxed);
    tally.failed.store(u32::MAX, Relaxed);
    assert_eq!(o.on_interval(s(20), &mut Top), [], "50 % failed");
}

#[test]
fn a_return_makes_room_for_a_run_the_cap_refused() {
    let mut o = outliers(consecutive(2, 33), 3); // one of three at a time
    o.record(ep(1), true, s(0));
    assert!(o.record(ep(1), true, s(0)).is_some());
    o.record(ep(2), true, s(1));
    assert_eq!(o.record(ep(2), true, s(1)), None, "the cap refuses a second");
    let out = o.on_interval(s(30), &mut Top);
    let again = Event::Ejected { addr: ep(2), why: Why::ConsecutiveFailures(2), times: 1 };
    assert_eq!(out, [Event::Returned { addr: ep(1) }, again]);
}

#[test]
fn totals_and_in_flight_are_kept_for_metrics_across_intervals() {
    let mut o = outliers(consecutive(100, 100), 1);
    let tally = o.tally(ep(1)).unwrap();
    tally.started();
    tally.started();
    tally.record(true);
    tally.finished();
    tally.record(false);
    assert_eq!((tally.totals(), tally.in_flight()), ((1, 1), 1));
    o.on_interval(s(10), &mut Top);
    assert_eq!(tally.totals(), (1, 1), "the interval's counts start over; the totals do not");
}
