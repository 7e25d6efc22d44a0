//! gRPC status codes: names as users type them, and the codes gRPC gives to HTTP/2
//! resets and to HTTP responses without a `grpc-status` (gRPC's PROTOCOL-HTTP2 and
//! http-grpc-status-mapping documents). Pure.

/// A gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

const ALL: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl Code {
    /// The code numbered `n`, if there is one.
    pub fn from_i32(n: i32) -> Option<Code> {
        usize::try_from(n).ok().and_then(|i| ALL.get(i)).copied()
    }

    /// The canonical upper-case name, as grpcurl prints it.
    pub fn name(self) -> &'static str {
        NAMES[self as usize]
    }

    /// Parses `UNAVAILABLE`, `unavailable` or `14`.
    pub fn parse(s: &str) -> Result<Code, String> {
        if let Ok(n) = s.parse::<i32>() {
            return Code::from_i32(n).ok_or_else(|| format!("{n} is not a gRPC status code (0..=16)"));
        }
        let upper = s.to_ascii_uppercase();
        NAMES.iter().position(|name| *name == upper).map(|i| ALL[i]).ok_or_else(|| {
            format!("unknown gRPC status code {s:?} (expected a name like UNAVAILABLE or a number 0..=16)")
        })
    }

    /// A `grpc-status` value; anything malformed is UNKNOWN, as gRPC clients read it.
    pub fn from_header(v: &[u8]) -> Code {
        let digits = v.len() <= 2 && !v.is_empty() && v.iter().all(u8::is_ascii_digit);
        let n = if digits { v.iter().fold(0, |n, d| n * 10 + i32::from(d - b'0')) } else { -1 };
        Code::from_i32(n).unwrap_or(Code::Unknown)
    }

    /// The status of a response that has no `grpc-status`, from its HTTP status.
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }

    /// The status of a stream the server reset with HTTP/2 error code `reason`.
    pub fn from_h2_reason(reason: u32) -> Code {
        match reason {
            0x7 => Code::Unavailable,       // REFUSED_STREAM
            0x8 => Code::Cancelled,         // CANCEL
            0xb => Code::ResourceExhausted, // ENHANCE_YOUR_CALM
            0xc => Code::PermissionDenied,  // INADEQUATE_SECURITY
            // NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR,
            // SETTINGS_TIMEOUT, FRAME_SIZE_ERROR, COMPRESSION_ERROR, CONNECT_ERROR, and
            // codes HTTP/2 does not define.
            _ => Code::Internal,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_name_and_number() {
        for code in ALL {
            assert_eq!(Code::parse(code.name()), Ok(code));
            assert_eq!(Code::parse(&code.name().to_lowercase()), Ok(code));
            assert_eq!(Code::parse(&(code as i32).to_string()), Ok(code));
            assert_eq!(Code::from_header((code as u8).to_string().as_bytes()), code);
        }
        assert!(Code::parse("17").is_err());
        assert!(Code::parse("-1").is_err());
        assert!(Code::parse("BOGUS").is_err());
    }

    #[test]
    fn malformed_statuses_are_unknown() {
        for bad in ["", "x", "17", "-1", "1.0", "014", "99999999999999999999", "1 "] {
            assert_eq!(Code::from_header(bad.as_bytes()), Code::Unknown, "{bad:?}");
        }
    }

    #[test]
    fn http_statuses_map_as_grpc_says() {
        let map = |s| Code::from_http_status(s);
        assert_eq!(
            [400, 401, 403, 404, 429, 502, 503, 504, 200, 500].map(map),
            [
                Code::Internal,
                Code::Unauthenticated,
                Code::PermissionDenied,
                Code::Unimplemented,
                Code::Unavailable,
                Code::Unavailable,
                Code::Unavailable,
                Code::Unavailable,
                Code::Unknown,
                Code::Unknown
            ]
        );
    }

    #[test]
    fn http2_resets_map_as_grpc_says() {
        let internal = [0x0, 0x1, 0x2, 0x3, 0x4, 0x6, 0x9, 0xa, 0xd, 0xfff];
        for r in internal {
            assert_eq!(Code::from_h2_reason(r), Code::Internal, "{r:#x}");
        }
        assert_eq!(Code::from_h2_reason(0x7), Code::Unavailable);
        assert_eq!(Code::from_h2_reason(0x8), Code::Cancelled);
        assert_eq!(Code::from_h2_reason(0xb), Code::ResourceExhausted);
        assert_eq!(Code::from_h2_reason(0xc), Code::PermissionDenied);
    }
}
