//! gRPC on the wire, as the call path reads and writes it: `grpc-timeout`,
//! `grpc-status`, `grpc-retry-pushback-ms`, absolute URIs, and which HTTP/2 failures
//! mean the endpoint never processed a call. Pure.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Uri};
use lb_core::Code;

use crate::retry::Pushback;

/// A malformed `grpc-status` is UNKNOWN, as gRPC clients treat it.
pub(crate) fn status_code(v: &HeaderValue) -> Code {
    Code::from_header(v.as_bytes())
}

pub(crate) fn pushback(h: &HeaderMap) -> Pushback {
    Pushback::parse(h.get("grpc-retry-pushback-ms").map(HeaderValue::as_bytes))
}

/// HTTP/2 needs a scheme and an authority; tonic clients built on a bare service send
/// only the path.
pub(crate) fn absolute(uri: Uri, authority: &http::uri::Authority) -> Uri {
    if uri.scheme().is_some() && uri.authority().is_some() {
        return uri;
    }
    let mut parts = uri.into_parts();
    parts.scheme.get_or_insert(http::uri::Scheme::HTTP);
    parts.authority.get_or_insert_with(|| authority.clone());
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// Whether the endpoint certainly did not process the call: the stream was refused,
/// was above a GOAWAY's last stream id, or the connection died before any response.
pub(crate) fn unprocessed(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || h2.is_go_away() || h2.is_io();
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = e.source();
    }
    err.is_closed() || err.is_canceled()
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d`, in milliseconds (at most 8 digits).
pub(crate) fn encode_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_millis().clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).unwrap_or(HeaderValue::from_static("1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(t("1S"), Some(Duration::from_secs(1)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "1", "1x", "123456789S", "-1S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
        assert_eq!(encode_timeout(Duration::from_millis(1500)), "1500m");
    }

    #[test]
    fn malformed_statuses_are_unknown() {
        assert_eq!(status_code(&HeaderValue::from_static("14")), Code::Unavailable);
        for bad in ["", "x", "17", "-1", "1.0"] {
            assert_eq!(status_code(&HeaderValue::from_str(bad).unwrap()), Code::Unknown, "{bad:?}");
        }
    }
}
