//! gRPC status codes for the binaries, as tonic spells them; the names and mappings are
//! [`lb_core::Code`]'s.

pub use lb_core::Code;

/// Parses `UNAVAILABLE`, `unavailable` or `14`.
pub fn parse_code(s: &str) -> Result<tonic::Code, String> {
    Code::parse(s).map(to_tonic)
}

/// The canonical upper-case name of a code, as grpcurl prints it.
pub fn code_name(code: tonic::Code) -> &'static str {
    from_tonic(code).name()
}

pub fn to_tonic(code: Code) -> tonic::Code {
    tonic::Code::from_i32(code as i32)
}

pub fn from_tonic(code: tonic::Code) -> Code {
    Code::from_i32(code as i32).unwrap_or(Code::Unknown)
}
