//! gRPC on the wire, as the call path reads and writes it: `grpc-timeout`, what a
//! response's headers say (`grpc-status`, `grpc-retry-pushback-ms`, an HTTP error),
//! absolute URIs. Pure.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Uri};
use lb_core::Code;

use lb_core::retry::Pushback;

/// What a response's headers say about the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// Headers of a response whose messages and status follow: the call commits.
    Headers,
    /// Trailers-only: the whole response is this status.
    TrailersOnly { code: Code, pushback: Pushback },
    /// Not a gRPC response (an HTTP error page): the status gRPC maps its HTTP status to.
    NotGrpc { code: Code },
}

impl Head {
    pub(crate) fn read<T>(resp: &http::Response<T>) -> Head {
        let h = resp.headers();
        if let Some(code) = h.get("grpc-status") {
            return Head::TrailersOnly { code: Code::from_header(code.as_bytes()), pushback: pushback(h) };
        }
        if resp.status() != http::StatusCode::OK {
            return Head::NotGrpc { code: Code::from_http_status(resp.status().as_u16()) };
        }
        Head::Headers
    }
}

/// `grpc-retry-pushback-ms`; a repeated header is as malformed as a bad value.
pub(crate) fn pushback(h: &HeaderMap) -> Pushback {
    let mut values = h.get_all("grpc-retry-pushback-ms").iter();
    match (values.next(), values.next()) {
        (first, None) => Pushback::parse(first.map(HeaderValue::as_bytes)),
        (Some(_), Some(_)) => Pushback::Stop,
        (None, Some(_)) => Pushback::None,
    }
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

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    lb_core::duration::parse_grpc_timeout(headers.get("grpc-timeout")?.as_bytes())
}

/// A `grpc-timeout` value for `d` ([`lb_core::duration::format_grpc_timeout`]),
/// formatted on the stack, so the header is the only allocation.
pub(crate) fn encode_timeout(d: Duration) -> HeaderValue {
    let mut buf = [0u8; 9];
    HeaderValue::from_bytes(lb_core::duration::format_grpc_timeout(d, &mut buf))
        .unwrap_or(HeaderValue::from_static("1u"))
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
        assert_eq!(encode_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(encode_timeout(Duration::from_nanos(10)), "1u", "at least 1");
        assert_eq!(encode_timeout(Duration::from_secs(100)), "100000m");
        assert_eq!(encode_timeout(Duration::from_secs(30 * 3600)), "108000S", "past 27.8 h: seconds");
        assert_eq!(encode_timeout(Duration::from_secs(200_000_000)), "3333333M");
        assert_eq!(encode_timeout(Duration::MAX), "99999999H");
        for d in [Duration::from_millis(1), Duration::from_secs(7), Duration::from_secs(1 << 40)] {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", encode_timeout(d));
            assert!(grpc_timeout(&h).is_some_and(|back| back <= d), "{d:?} round-trips down");
        }
    }

    #[test]
    fn response_heads_are_read_as_grpc_reads_them() {
        let resp = |status: u16, headers: &[(&str, &str)]| {
            let mut r = http::Response::builder().status(status);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            Head::read(&r.body(()).unwrap())
        };
        assert_eq!(resp(200, &[("content-type", "application/grpc")]), Head::Headers);
        assert_eq!(
            resp(200, &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "20")]),
            Head::TrailersOnly { code: Code::Unavailable, pushback: Pushback::After(Duration::from_millis(20)) }
        );
        let twice = [("grpc-status", "14"), ("grpc-retry-pushback-ms", "20"), ("grpc-retry-pushback-ms", "20")];
        assert_eq!(resp(200, &twice), Head::TrailersOnly { code: Code::Unavailable, pushback: Pushback::Stop });
        assert_eq!(
            resp(200, &[("grpc-status", "garbage")]),
            Head::TrailersOnly { code: Code::Unknown, pushback: Pushback::None }
        );
        assert_eq!(resp(503, &[("content-type", "text/html")]), Head::NotGrpc { code: Code::Unavailable });
        assert_eq!(resp(404, &[]), Head::NotGrpc { code: Code::Unimplemented });
        assert_eq!(resp(500, &[]), Head::NotGrpc { code: Code::Unknown });
    }
}
