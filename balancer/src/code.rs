//! gRPC status codes by name, as users type them on the command line and in configs.

use tonic::Code;

const NAMES: [(&str, Code); 17] = [
    ("OK", Code::Ok),
    ("CANCELLED", Code::Cancelled),
    ("UNKNOWN", Code::Unknown),
    ("INVALID_ARGUMENT", Code::InvalidArgument),
    ("DEADLINE_EXCEEDED", Code::DeadlineExceeded),
    ("NOT_FOUND", Code::NotFound),
    ("ALREADY_EXISTS", Code::AlreadyExists),
    ("PERMISSION_DENIED", Code::PermissionDenied),
    ("RESOURCE_EXHAUSTED", Code::ResourceExhausted),
    ("FAILED_PRECONDITION", Code::FailedPrecondition),
    ("ABORTED", Code::Aborted),
    ("OUT_OF_RANGE", Code::OutOfRange),
    ("UNIMPLEMENTED", Code::Unimplemented),
    ("INTERNAL", Code::Internal),
    ("UNAVAILABLE", Code::Unavailable),
    ("DATA_LOSS", Code::DataLoss),
    ("UNAUTHENTICATED", Code::Unauthenticated),
];

/// Parses `UNAVAILABLE`, `unavailable` or `14` into a code.
pub fn parse_code(s: &str) -> Result<Code, String> {
    if let Ok(n) = s.parse::<i32>() {
        return match Code::from_i32(n) {
            Code::Unknown if n != 2 => Err(format!("{n} is not a gRPC status code (0..=16)")),
            code => Ok(code),
        };
    }
    let upper = s.to_ascii_uppercase();
    NAMES
        .iter()
        .find(|(name, _)| *name == upper)
        .map(|(_, code)| *code)
        .ok_or_else(|| format!("unknown gRPC status code {s:?} (expected a name like UNAVAILABLE or a number 0..=16)"))
}

/// The canonical upper-case name of a code, as grpcurl prints it.
pub fn code_name(code: Code) -> &'static str {
    NAMES.iter().find(|(_, c)| *c == code).map_or("UNKNOWN", |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_name() {
        for (name, code) in NAMES {
            assert_eq!(parse_code(name), Ok(code));
            assert_eq!(parse_code(&name.to_lowercase()), Ok(code));
            assert_eq!(parse_code(&(code as i32).to_string()), Ok(code));
            assert_eq!(code_name(code), name);
        }
        assert!(parse_code("17").is_err());
        assert!(parse_code("BOGUS").is_err());
    }
}
