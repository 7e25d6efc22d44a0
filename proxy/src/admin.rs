//! The admin API on `--admin-listen`: plain HTTP/1.1, read-only.
//! - `GET /admin/endpoints`: JSON, each endpoint's state, since when, why, and counts.
//! - `GET /metrics`: Prometheus text, each endpoint's state, connections, in-flight
//!   attempts, outcomes and ejections, attempts per method.
//! - `GET /admin/events`: Server-Sent Events as they happen: endpoints added and
//!   removed, state changes with why, GOAWAY, ejections, failover and failback.
//!
//! Everything is read from the balancer's published state and its atomic counters: a
//! scrape takes no lock the calls take, and a slow client holds only its own
//! connection.

use std::{
    convert::Infallible,
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use balancer::{EndpointState, Endpoints, PoolEvent, counters::Counters, histogram::Reading, pick::Tier};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, sync::broadcast};
use tracing::{debug, warn};

/// What the admin API shows: the balancer's endpoints and its per-method counters.
pub struct Snapshot {
    /// The node the proxy runs on, when told (`--node`).
    pub node: Option<String>,
    pub endpoints: Endpoints,
    /// Read at a scrape (`Balancer::counters`).
    pub counters: Counters,
    /// The retry throttle's tokens and capacity (`Balancer::throttle`).
    pub throttle: Option<(f64, f64)>,
    /// With `--coalesce`: the sleeps the worker took between polls for I/O.
    pub coalesce_sleeps: Option<u64>,
}

type AdminBody = BoxBody<Bytes, Infallible>;

/// Serves the admin API on `listener` until the task is dropped; `read` takes a
/// [`Snapshot`] of the balancer (`Balancer::endpoints`, `Balancer::counters`), and
/// `subscribe` its events (`Balancer::events`).
pub async fn serve(
    listener: TcpListener,
    read: impl Fn() -> Snapshot + Clone + Send + Sync + 'static,
    subscribe: impl Fn() -> broadcast::Receiver<PoolEvent> + Clone + Send + 'static,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "Admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (read, subscribe) = (read.clone(), subscribe.clone());
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let resp = if req.method() == Method::GET && req.uri().path() == "/admin/events" {
                let snapshots = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "snapshots=1"));
                events(subscribe(), snapshots.then(|| read.clone()))
            } else {
                answer(&req, &read()).map(|b| b.boxed())
            };
            async move { Ok::<_, Infallible>(resp) }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "Admin connection ended with an error");
            }
        });
    }
}

/// `/admin/events`: each event as it happens, as Server-Sent Events. A reader too slow
/// for the stream is told how many it missed; it never holds up the balancer. With
/// `?snapshots=1`, also an `endpoints` event each second carrying `/admin/endpoints`.
fn events(
    rx: broadcast::Receiver<PoolEvent>,
    snapshots: Option<impl Fn() -> Snapshot + Send + Sync + 'static>,
) -> Response<AdminBody> {
    let hello = futures_util::stream::once(async { Bytes::from_static(b": events as they happen\n\n") });
    let ticks = snapshots.map(|read| {
        let every = tokio::time::interval(std::time::Duration::from_secs(1));
        futures_util::stream::unfold((every, read), |(mut every, read)| async move {
            every.tick().await;
            let snap = read();
            let data = endpoints_json(&snap, SystemTime::now());
            Some((Bytes::from(format!("event: endpoints\ndata: {data}\n\n")), (every, read)))
        })
    });
    let ticks = futures_util::stream::iter(ticks).flatten();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = match rx.recv().await {
            Ok(e) => {
                let data = json!({
                    "at": rfc3339(e.at),
                    "kind": e.kind,
                    "endpoint": e.endpoint.map(|a| a.to_string()),
                    "detail": e.detail,
                });
                format!("event: {}\ndata: {data}\n\n", e.kind)
            }
            Err(broadcast::error::RecvError::Lagged(n)) => format!(": missed {n} events\n\n"),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Bytes::from(chunk), rx))
    });
    let stream = futures_util::stream::select(stream, ticks);
    let body = StreamBody::new(hello.chain(stream).map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut resp = Response::new(BodyExt::boxed(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    resp
}

/// The response to one admin request.
fn answer<T>(req: &Request<T>, snap: &Snapshot) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "the admin API is read-only: GET only\n".into());
    }
    match req.uri().path() {
        "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_owned()),
        "/admin/endpoints" => {
            let body = serde_json::to_string_pretty(&endpoints_json(snap, SystemTime::now()))
                .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
            respond(StatusCode::OK, "application/json", body + "\n")
        }
        "/metrics" => respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics(snap)),
        path => text(
            StatusCode::NOT_FOUND,
            format!("no admin path {path}: try /, /admin/endpoints, /admin/events or /metrics\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

/// The live page on `/`: one file with its script and style, nothing fetched elsewhere.
const PAGE: &str = include_str!("page.html");

/// `/admin/endpoints`: the node, the target, the last resolution, one object per endpoint.
fn endpoints_json(snap: &Snapshot, now: SystemTime) -> serde_json::Value {
    let e = &snap.endpoints;
    let endpoints: Vec<_> = e
        .endpoints
        .iter()
        .map(|ep| {
            json!({
                "address": ep.address.to_string(),
                "locality": ep.tier.as_str(),
                "state": ep.state.as_str(),
                "protocol": ep.protocol,
                "since": rfc3339(ep.since),
                "for_seconds": now.duration_since(ep.since).map_or(0.0, |d| d.as_secs_f64()),
                "last_error": ep.last_error,
                "in_flight": ep.in_flight,
                "rps": ep.rps,
                "p50_ms": ep.p50_ms,
                "p99_ms": ep.p99_ms,
                "calls": ep.calls,
                "failures": ep.failures,
                "ejections": ep.ejections,
            })
        })
        .collect();
    json!({
        "node": snap.node,
        "target": e.target,
        "resolved_at": e.resolved_at.map(rfc3339),
        "dns_error": e.dns_error,
        "endpoints": endpoints,
    })
}

/// `/metrics`: Prometheus text exposition. gRFC A66 (calls and attempts), A96
/// (retries) and A94 (connections) by their OpenTelemetry Prometheus names, then each
/// endpoint's state and counts (`lb_*`).
fn metrics(snap: &Snapshot) -> String {
    let e = &snap.endpoints;
    let mut out = String::with_capacity(16 << 10);
    let target = escape(&e.target);
    let t = format!("grpc_target=\"{target}\"");
    // Methods are bounded: those that have succeeded once (at most 256) and `other`.
    let methods = snap.counters.snapshot();
    let mut methods: Vec<_> = methods.iter().collect();
    methods.sort_by(|a, b| a.0.cmp(b.0));
    let method_label = |m: &str| format!("grpc_method=\"{}\"", escape(m.trim_start_matches('/')));

    head(&mut out, "grpc_client_attempt_started_total", "counter", "Attempts started, counted when their call ends.");
    for (method, m) in &methods {
        let _ = writeln!(out, "grpc_client_attempt_started_total{{{},{t}}} {}", method_label(method), m.attempts);
    }
    head(
        &mut out,
        "grpc_client_attempt_duration_seconds",
        "histogram",
        "Attempts from being placed on an endpoint to their status, by endpoint.",
    );
    for ep in &e.endpoints {
        let mut attempts: Vec<_> =
            ep.attempts.iter().map(|(row, code, r)| (snap.counters.name(*row), code.name(), r)).collect();
        attempts.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for (method, code, reading) in attempts {
            let labels = format!(
                "{},{t},grpc_status=\"{code}\",endpoint=\"{}\",grpc_lb_locality=\"{}\"",
                method_label(method),
                ep.address,
                ep.tier.as_str()
            );
            histogram(&mut out, "grpc_client_attempt_duration_seconds", &labels, reading, SECONDS);
        }
    }
    head(
        &mut out,
        "grpc_client_call_duration_seconds",
        "histogram",
        "Calls from arrival to their status, retries and waits included.",
    );
    for (method, m) in &methods {
        for (code, reading) in &m.durations {
            let labels = format!("{},{t},grpc_status=\"{code}\"", method_label(method));
            histogram(&mut out, "grpc_client_call_duration_seconds", &labels, reading, SECONDS);
        }
    }
    for (name, help, pick) in [
        ("grpc_client_call_retries", "Retries per call, for calls with any.", 0),
        (
            "grpc_client_call_transparent_retries",
            "Transparent retries per call (never sent or refused unprocessed), for calls with any.",
            1,
        ),
        ("grpc_client_call_hedges", "Hedges per call, for calls with any.", 2),
    ] {
        head(&mut out, name, "histogram", help);
        for (method, m) in &methods {
            let reading = [&m.retries_per_call, &m.transparent_retries_per_call, &m.hedges_per_call][pick];
            if reading.count() > 0 {
                histogram(&mut out, name, &format!("{},{t}", method_label(method)), reading, 1.0);
            }
        }
    }

    let mut open = [0u32; 3];
    for ep in &e.endpoints {
        if ep.protocol.is_some() {
            open[ep.tier as usize] += 1;
        }
    }
    head(&mut out, "grpc_subchannel_open_connections", "gauge", "Connections open to endpoints, by locality.");
    for tier in Tier::ALL {
        let (place, n) = (tier.as_str(), open[tier as usize]);
        let _ = writeln!(out, "grpc_subchannel_open_connections{{{t},grpc_lb_locality=\"{place}\"}} {n}");
    }
    let links = &e.links;
    head(&mut out, "grpc_subchannel_connection_attempts_succeeded_total", "counter", "Connections made to endpoints.");
    let _ = writeln!(out, "grpc_subchannel_connection_attempts_succeeded_total{{{t}}} {}", links.attempts_succeeded);
    head(
        &mut out,
        "grpc_subchannel_connection_attempts_failed_total",
        "counter",
        "Connection attempts to endpoints that failed.",
    );
    let _ = writeln!(out, "grpc_subchannel_connection_attempts_failed_total{{{t}}} {}", links.attempts_failed);
    head(
        &mut out,
        "grpc_subchannel_disconnections_total",
        "counter",
        "Connections to endpoints that ended, by locality and why.",
    );
    for ((tier, why), n) in &links.disconnections {
        let _ = writeln!(
            out,
            "grpc_subchannel_disconnections_total{{{t},grpc_lb_locality=\"{}\",grpc_disconnect_error=\"{why}\"}} {n}",
            tier.as_str()
        );
    }

    if let Some((tokens, max)) = snap.throttle {
        head(
            &mut out,
            "lb_retry_throttle_tokens",
            "gauge",
            "Tokens in the retry throttle's bucket; retries and hedges stop at half its capacity or less.",
        );
        let _ = writeln!(out, "lb_retry_throttle_tokens{{{t}}} {tokens}");
        head(
            &mut out,
            "lb_retry_throttle_max_tokens",
            "gauge",
            "The retry throttle's capacity (retryThrottling.maxTokens).",
        );
        let _ = writeln!(out, "lb_retry_throttle_max_tokens{{{t}}} {max}");
    }
    let labels = |ep: &balancer::EndpointView| {
        format!("{t},endpoint=\"{}\",grpc_lb_locality=\"{}\"", ep.address, ep.tier.as_str())
    };
    head(&mut out, "lb_endpoint_state", "gauge", "1 for the state each endpoint is in, 0 for the others.");
    for ep in &e.endpoints {
        for state in EndpointState::ALL {
            let on = u8::from(ep.state == state);
            let _ = writeln!(out, "lb_endpoint_state{{{},state=\"{}\"}} {on}", labels(ep), state.as_str());
        }
    }
    head(&mut out, "lb_endpoint_in_flight", "gauge", "Attempts placed on each endpoint and not yet ended.");
    for ep in &e.endpoints {
        let _ = writeln!(out, "lb_endpoint_in_flight{{{}}} {}", labels(ep), ep.in_flight);
    }
    head(
        &mut out,
        "lb_endpoint_attempts_total",
        "counter",
        "Attempts ended on each endpoint, by outcome as outlier detection counts it.",
    );
    for ep in &e.endpoints {
        let l = labels(ep);
        let _ = writeln!(out, "lb_endpoint_attempts_total{{{l},outcome=\"ok\"}} {}", ep.calls - ep.failures);
        let _ = writeln!(out, "lb_endpoint_attempts_total{{{l},outcome=\"failed\"}} {}", ep.failures);
    }
    head(&mut out, "lb_endpoint_ejections_total", "counter", "Times outlier detection ejected each endpoint.");
    for ep in &e.endpoints {
        let _ = writeln!(out, "lb_endpoint_ejections_total{{{}}} {}", labels(ep), ep.ejections);
    }
    if let Some(sleeps) = snap.coalesce_sleeps {
        let help =
            "Sleeps between polls for I/O with --coalesce, taken while they pay: calls many, long and ending often.";
        head(&mut out, "proxy_coalesce_sleeps_total", "counter", help);
        let _ = writeln!(out, "proxy_coalesce_sleeps_total {sleeps}");
    }
    out
}

/// Microseconds per second: durations are kept in µs and exported in seconds.
const SECONDS: f64 = 1_000_000.0;

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One histogram series: cumulative `le` buckets, `_sum` and `_count`; values are
/// divided by `scale` (µs to seconds, or 1 for counts).
fn histogram(out: &mut String, name: &str, labels: &str, r: &Reading, scale: f64) {
    for (bound, n) in r.cumulative() {
        match bound {
            Some(b) => {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {n}", b as f64 / scale);
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {n}");
            }
        }
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", r.sum as f64 / scale);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", r.count());
}

/// A label value as Prometheus' text format quotes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `2026-11-23T07:25:00.123Z`, in UTC.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_dates_are_civil_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_418_700_123);
        assert_eq!(rfc3339(t), "2026-11-23T07:25:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn unknown_paths_are_404_and_writes_are_refused() {
        let endpoints = Endpoints {
            target: "t:1".into(),
            links: Default::default(),
            resolved_at: None,
            dns_error: None,
            endpoints: vec![],
        };
        let none =
            Snapshot { node: None, endpoints, counters: Counters::default(), throttle: None, coalesce_sleeps: None };
        let get = |path: &str| Request::get(path).body(()).unwrap();
        assert_eq!(answer(&get("/nope"), &none).status(), StatusCode::NOT_FOUND);
        assert_eq!(answer(&get("/metrics"), &none).status(), StatusCode::OK);
        let post = Request::post("/admin/endpoints").body(()).unwrap();
        assert_eq!(answer(&post, &none).status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
