//! Outlier detection: gRFC A50's success-rate and failure-percentage ejection, run
//! every `interval`, plus consecutive-failure ejection at once (as Envoy and linkerd
//! users expect). Pure: attempt outcomes and the time since the balancer started come
//! in, ejections and returns come out; the RNG (for `enforcementPercentage`) is passed in.
//!
//! Call order: [`Outliers::sync`] when membership changes; each attempt's outcome goes
//! to its endpoint's [`Tally`] (handed out by [`Outliers::tally`], shared with calls,
//! lock-free), and when [`Tally::record`] says a run of failures is long enough,
//! [`Outliers::check`] ejects at once; [`Outliers::on_interval`] every `interval`.
//! [`Outliers::record`] does both in one step, for a single owner and for tests. An ejected endpoint keeps its connection
//! and takes no calls until it returns: after `baseEjectionTime × times ejected` (at most
//! `max(baseEjectionTime, maxEjectionTime)`); the multiplier decays by one for every
//! interval the endpoint spends not ejected. Never more than `maxEjectionPercent` of the
//! endpoints are ejected, yet always at least one may be.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use crate::{Code, retry::policy::CodeSet, rng::Rng};

pub mod config;

/// A50's `successRateEjection`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuccessRate {
    /// In thousandths of a standard deviation: 1900 = 1.9 σ below the mean.
    pub stdev_factor: u32,
    pub enforcement_percentage: u32,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

/// A50's `failurePercentageEjection`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailurePercentage {
    pub threshold: u32,
    pub enforcement_percentage: u32,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

/// The detection settings, with A50's defaults in [`OutlierConfig::default`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub success_rate: Option<SuccessRate>,
    pub failure_percentage: Option<FailurePercentage>,
    /// Failures in a row that eject at once.
    pub consecutive_failures: Option<u32>,
    /// The statuses that count as failures, for every rule.
    pub codes: CodeSet,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate: None,
            failure_percentage: None,
            consecutive_failures: None,
            codes: config::default_codes(),
        }
    }
}

/// What detection decided about an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Ejected { addr: SocketAddr, why: Why, times: u32 },
    Returned { addr: SocketAddr },
}

/// Which rule ejected an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    ConsecutiveFailures(u32),
    /// Its success rate, in thousandths, under the threshold, in thousandths.
    SuccessRate {
        rate: u32,
        threshold: u32,
    },
    /// Its failure percentage over the threshold.
    FailurePercentage(u32),
}

/// Attempt-duration histograms an endpoint keeps at most (methods × statuses seen).
pub const ATTEMPT_SERIES: usize = 256;

/// The key of an attempt-duration histogram: the method's row and the status.
pub fn attempt_key(method: u16, code: Code) -> u32 {
    u32::from(method) << 5 | code as u32
}

/// The method row and status of an [`attempt_key`].
pub fn split_attempt_key(key: u32) -> (u16, Option<Code>) {
    ((key >> 5) as u16, Code::from_i32((key & 31) as i32))
}

/// One endpoint's outcomes since the last interval. Calls record into it concurrently
/// without a lock; the owner of the [`Outliers`] reads and resets it.
#[derive(Debug)]
pub struct Tally {
    ok: AtomicU32,
    failed: AtomicU32,
    /// Since the endpoint appeared, never reset: for metrics.
    total_ok: AtomicU64,
    total_failed: AtomicU64,
    /// Attempts placed on the endpoint and not yet ended.
    in_flight: AtomicU32,
    /// Attempts ended per second and their latencies, over the last ten seconds.
    pub window: crate::window::Window,
    /// Attempt durations by [`attempt_key`] (method row and status), for metrics.
    pub attempts: crate::histogram::Table,
    /// Failures since the last success.
    consecutive: AtomicU32,
    /// The run of failures that ejects; 0 = none does.
    threshold: u32,
    codes: CodeSet,
}

impl Tally {
    fn new(config: &OutlierConfig) -> Self {
        Tally {
            ok: AtomicU32::new(0),
            failed: AtomicU32::new(0),
            total_ok: AtomicU64::new(0),
            total_failed: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            window: crate::window::Window::default(),
            attempts: crate::histogram::Table::new(crate::histogram::SECONDS, ATTEMPT_SERIES),
            consecutive: AtomicU32::new(0),
            threshold: config.consecutive_failures.unwrap_or(0),
            codes: config.codes,
        }
    }

    /// An attempt ended with `code`: a failure when the config lists it.
    pub fn record_status(&self, code: Code) -> bool {
        self.record(self.codes.contains(code))
    }

    /// An attempt ended: `failed` when with a failure status or a lost connection (not
    /// the caller's own cancel or deadline). True when this failure makes the run
    /// reach the threshold (or a multiple of it, in case an ejection was refused by
    /// the percentage cap): the owner should call [`Outliers::check`].
    pub fn record(&self, failed: bool) -> bool {
        if !failed {
            self.ok.fetch_add(1, Relaxed);
            self.total_ok.fetch_add(1, Relaxed);
            if self.consecutive.load(Relaxed) != 0 {
                self.consecutive.store(0, Relaxed);
            }
            return false;
        }
        self.failed.fetch_add(1, Relaxed);
        self.total_failed.fetch_add(1, Relaxed);
        let run = self.consecutive.fetch_add(1, Relaxed) + 1;
        self.threshold != 0 && run.is_multiple_of(self.threshold)
    }

    /// An attempt was placed on the endpoint; [`Tally::finished`] when it ends,
    /// recorded or not.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    pub fn finished(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// Attempts in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// (successes, failures) recorded since the endpoint appeared.
    pub fn totals(&self) -> (u64, u64) {
        (self.total_ok.load(Relaxed), self.total_failed.load(Relaxed))
    }

    /// Failures since the last success.
    pub fn consecutive(&self) -> u32 {
        self.consecutive.load(Relaxed)
    }

    /// The (successes, failures) since the last call, starting the count over.
    fn take(&self) -> (u32, u32) {
        (self.ok.swap(0, Relaxed), self.failed.swap(0, Relaxed))
    }
}

#[derive(Debug, Clone)]
struct Endpoint {
    addr: SocketAddr,
    /// This interval's counts, recorded by calls.
    tally: Arc<Tally>,
    /// The last interval's (successes, failures).
    last: (u32, u32),
    /// When it was last ejected, while it is.
    ejected_at: Option<Duration>,
    /// A50's ejection multiplier.
    times: u32,
}

/// Every endpoint's counts and ejection state.
#[derive(Debug, Default)]
pub struct Outliers {
    config: OutlierConfig,
    /// Sorted by address.
    endpoints: Vec<Endpoint>,
}

impl Outliers {
    pub fn new(config: OutlierConfig) -> Self {
        Outliers { config, endpoints: Vec::new() }
    }

    /// Membership is now `addrs`: new endpoints start clean, gone ones are forgotten.
    pub fn sync(&mut self, addrs: &[SocketAddr]) {
        let mut addrs = addrs.to_vec();
        addrs.sort_unstable();
        addrs.dedup();
        let old = std::mem::take(&mut self.endpoints);
        self.endpoints = addrs
            .into_iter()
            .map(|addr| match old.binary_search_by_key(&addr, |e| e.addr) {
                Ok(i) => old[i].clone(),
                Err(_) => Endpoint {
                    addr,
                    tally: Arc::new(Tally::new(&self.config)),
                    last: (0, 0),
                    ejected_at: None,
                    times: 0,
                },
            })
            .collect();
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// The last interval's (successes, failures) on `addr`, for logs.
    pub fn last_counts(&self, addr: SocketAddr) -> (u32, u32) {
        self.find(addr).map_or((0, 0), |i| self.endpoints[i].last)
    }

    pub fn is_ejected(&self, addr: SocketAddr) -> bool {
        self.find(addr).is_some_and(|i| self.endpoints[i].ejected_at.is_some())
    }

    /// The tally calls record `addr`'s outcomes into, while it is a member.
    pub fn tally(&self, addr: SocketAddr) -> Option<Arc<Tally>> {
        self.find(addr).map(|i| self.endpoints[i].tally.clone())
    }

    /// Records an attempt's outcome on `addr` ([`Tally::record`]) and ejects at once
    /// when that makes a long enough run of failures.
    pub fn record(&mut self, addr: SocketAddr, failed: bool, now: Duration) -> Option<Event> {
        let i = self.find(addr)?;
        if self.endpoints[i].tally.record(failed) { self.check_one(i, now) } else { None }
    }

    /// Ejects the endpoints whose run of failures reached the threshold, as far as the
    /// percentage cap allows: what a [`Tally::record`] that returned true asks for.
    pub fn check(&mut self, now: Duration) -> Vec<Event> {
        (0..self.endpoints.len()).filter_map(|i| self.check_one(i, now)).collect()
    }

    fn check_one(&mut self, i: usize, now: Duration) -> Option<Event> {
        let threshold = self.config.consecutive_failures?;
        let e = &self.endpoints[i];
        let run = e.tally.consecutive();
        (run >= threshold && e.ejected_at.is_none() && self.may_eject())
            .then(|| self.eject(i, Why::ConsecutiveFailures(run), now))
    }

    /// `addr` connected again after its connection was lost: a replica that went away
    /// and came back (restarted) starts over, so an ejection ends now. The multiplier
    /// stays: one that keeps failing is ejected for longer next time.
    pub fn reconnected(&mut self, addr: SocketAddr) -> Option<Event> {
        let i = self.find(addr)?;
        let e = &mut self.endpoints[i];
        e.tally.consecutive.store(0, Relaxed);
        e.ejected_at.take().map(|_| Event::Returned { addr })
    }

    /// The interval passed: swap the counts, eject by success rate and failure
    /// percentage, return endpoints whose time is up, decay the multipliers.
    pub fn on_interval(&mut self, now: Duration, rng: &mut impl Rng) -> Vec<Event> {
        let mut events = Vec::new();
        for e in &mut self.endpoints {
            e.last = e.tally.take();
        }
        if let Some(sr) = self.config.success_rate {
            self.eject_by_success_rate(sr, now, rng, &mut events);
        }
        if let Some(fp) = self.config.failure_percentage {
            self.eject_by_failure_percentage(fp, now, rng, &mut events);
        }
        let (base, max) =
            (self.config.base_ejection_time, self.config.max_ejection_time.max(self.config.base_ejection_time));
        for e in &mut self.endpoints {
            match e.ejected_at {
                Some(at) => {
                    let time = base.saturating_mul(e.times).min(max);
                    if now >= at.saturating_add(time) {
                        e.ejected_at = None;
                        e.tally.consecutive.store(0, Relaxed);
                        events.push(Event::Returned { addr: e.addr });
                    }
                }
                None => e.times = e.times.saturating_sub(1),
            }
        }
        // Returns make room under the cap: runs of failures refused before go now.
        if events.iter().any(|e| matches!(e, Event::Returned { .. })) {
            events.extend(self.check(now));
        }
        events
    }

    fn eject_by_success_rate(&mut self, sr: SuccessRate, now: Duration, rng: &mut impl Rng, events: &mut Vec<Event>) {
        let rates: Vec<(usize, f64)> = self
            .candidates(sr.request_volume)
            .map(|i| {
                let (ok, failed) = self.endpoints[i].last;
                (i, f64::from(ok) / (f64::from(ok) + f64::from(failed)))
            })
            .collect();
        if rates.len() < sr.minimum_hosts as usize || rates.is_empty() {
            return;
        }
        let n = rates.len() as f64;
        let mean = rates.iter().map(|r| r.1).sum::<f64>() / n;
        let stdev = (rates.iter().map(|r| (r.1 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let threshold = mean - stdev * f64::from(sr.stdev_factor) / 1000.0;
        for (i, rate) in rates {
            if rate < threshold && self.may_eject() && rng.below(100) < u64::from(sr.enforcement_percentage) {
                let why =
                    Why::SuccessRate { rate: (rate * 1000.0) as u32, threshold: (threshold * 1000.0).max(0.0) as u32 };
                events.push(self.eject(i, why, now));
            }
        }
    }

    fn eject_by_failure_percentage(
        &mut self,
        fp: FailurePercentage,
        now: Duration,
        rng: &mut impl Rng,
        events: &mut Vec<Event>,
    ) {
        let candidates: Vec<usize> = self.candidates(fp.request_volume).collect();
        if candidates.len() < fp.minimum_hosts as usize {
            return;
        }
        for i in candidates {
            let (ok, failed) = (u64::from(self.endpoints[i].last.0), u64::from(self.endpoints[i].last.1));
            // Exactly: 85.9 % is over a threshold of 85.
            let over = failed * 100 > u64::from(fp.threshold) * (ok + failed);
            let percent = (failed * 100 / (ok + failed)) as u32;
            if self.endpoints[i].ejected_at.is_none()
                && over
                && self.may_eject()
                && rng.below(100) < u64::from(fp.enforcement_percentage)
            {
                events.push(self.eject(i, Why::FailurePercentage(percent), now));
            }
        }
    }

    /// Endpoints not ejected with at least `volume` calls in the last interval.
    fn candidates(&self, volume: u32) -> impl Iterator<Item = usize> + '_ {
        self.endpoints.iter().enumerate().filter_map(move |(i, e)| {
            let calls = u64::from(e.last.0) + u64::from(e.last.1);
            (e.ejected_at.is_none() && calls >= u64::from(volume.max(1))).then_some(i)
        })
    }

    /// Fewer than `maxEjectionPercent` of the endpoints are ejected (checked before each
    /// ejection, as A50 does), or none is: one may always go.
    fn may_eject(&self) -> bool {
        let ejected = self.endpoints.iter().filter(|e| e.ejected_at.is_some()).count();
        ejected == 0 || (ejected * 100) < self.config.max_ejection_percent as usize * self.endpoints.len()
    }

    fn eject(&mut self, i: usize, why: Why, now: Duration) -> Event {
        let e = &mut self.endpoints[i];
        e.ejected_at = Some(now);
        e.times = e.times.saturating_add(1);
        Event::Ejected { addr: e.addr, why, times: e.times }
    }

    fn find(&self, addr: SocketAddr) -> Option<usize> {
        self.endpoints.binary_search_by_key(&addr, |e| e.addr).ok()
    }
}

#[cfg(test)]
mod tests;
