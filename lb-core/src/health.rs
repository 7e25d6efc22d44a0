//! gRFC A17 client-side health checking, the pure part: the `grpc.health.v1.Health/Watch`
//! request, reading its answers off the wire, and what each answer or end of the
//! stream means for the endpoint.
//!
//! An endpoint is picked only while its last answer was SERVING. NOT_SERVING,
//! SERVICE_UNKNOWN and UNKNOWN take it out; a replica without the health service
//! (UNIMPLEMENTED) counts as healthy; any other end of the stream takes it out until a
//! new stream, opened after a backoff, says SERVING again.

use std::time::Duration;

use crate::Code;

/// The method every endpoint's connection watches.
pub const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";

/// A `HealthCheckResponse` larger than this is not one: the stream is broken.
pub const MAX_MESSAGE: usize = 1024;

/// `HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    Unknown,
    Serving,
    NotServing,
    ServiceUnknown,
    /// A value this version of the protocol does not define.
    Other(u64),
}

impl Serving {
    fn from_number(n: u64) -> Self {
        match n {
            0 => Serving::Unknown,
            1 => Serving::Serving,
            2 => Serving::NotServing,
            3 => Serving::ServiceUnknown,
            n => Serving::Other(n),
        }
    }
}

impl std::fmt::Display for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Serving::Unknown => f.write_str("UNKNOWN"),
            Serving::Serving => f.write_str("SERVING"),
            Serving::NotServing => f.write_str("NOT_SERVING"),
            Serving::ServiceUnknown => f.write_str("SERVICE_UNKNOWN"),
            Serving::Other(n) => write!(f, "status {n}"),
        }
    }
}

/// The framed `HealthCheckRequest { service }`: a gRPC message prefix and the protobuf.
pub fn watch_request(service: &str) -> Vec<u8> {
    let mut proto = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        proto.push(0x0a); // field 1, length-delimited
        put_varint(&mut proto, service.len() as u64);
        proto.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(proto.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&(proto.len() as u32).to_be_bytes());
    framed.extend_from_slice(&proto);
    framed
}

/// Why a Watch stream's bytes are not health answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAnswer {
    #[error("a compressed message (none was asked for)")]
    Compressed,
    #[error("a message of {0} bytes, more than a HealthCheckResponse's {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("not a HealthCheckResponse: {0}")]
    Malformed(&'static str),
}

/// Splits a Watch response body into messages and decodes each, keeping at most one
/// message's bytes.
#[derive(Debug, Default)]
pub struct Answers {
    buf: Vec<u8>,
}

impl Answers {
    /// Feeds the next body chunk; returns the last complete answer in it, if any (the
    /// earlier ones are already out of date).
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<Option<Serving>, BadAnswer> {
        let mut last = None;
        while !chunk.is_empty() {
            let want = self.message_end()?.unwrap_or(5);
            let n = (want - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            if self.message_end()? == Some(self.buf.len()) {
                last = Some(decode(&self.buf[5..])?);
                self.buf.clear();
            }
        }
        Ok(last)
    }

    /// Where the current message ends, once its prefix is in.
    fn message_end(&self) -> Result<Option<usize>, BadAnswer> {
        let Some(p) = self.buf.get(..5) else { return Ok(None) };
        if p[0] != 0 {
            return Err(BadAnswer::Compressed);
        }
        let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(BadAnswer::TooLarge(len));
        }
        Ok(Some(5 + len))
    }
}

/// Decodes a `HealthCheckResponse`: field 1 is the status; other fields are skipped.
pub fn decode(mut msg: &[u8]) -> Result<Serving, BadAnswer> {
    let mut status = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match key & 7 {
            0 => {
                let v = varint(&mut msg)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => msg = msg.get(8..).ok_or(BadAnswer::Malformed("truncated fixed64"))?,
            2 => {
                let len = varint(&mut msg)?;
                let len = usize::try_from(len).map_err(|_| BadAnswer::Malformed("length out of range"))?;
                msg = msg.get(len..).ok_or(BadAnswer::Malformed("truncated field"))?;
            }
            5 => msg = msg.get(4..).ok_or(BadAnswer::Malformed("truncated fixed32"))?,
            _ => return Err(BadAnswer::Malformed("unknown wire type")),
        }
    }
    Ok(Serving::from_number(status))
}

fn varint(msg: &mut &[u8]) -> Result<u64, BadAnswer> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = msg.split_first().ok_or(BadAnswer::Malformed("truncated varint"))?;
        *msg = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(BadAnswer::Malformed("varint longer than 10 bytes"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// What the endpoint's health is, as far as picking goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Picked.
    Healthy,
    /// Not picked, and why.
    Unhealthy(String),
}

/// A stream that answered and lived this long was a working one: the backoff before
/// the next starts over. (One that answers and closes at once, in a loop, backs off.)
pub const STEADY: Duration = Duration::from_secs(1);

/// What to do when a Watch stream ended with `code` (`None`: it broke without a
/// status), after `answers` messages and `lived` long: UNIMPLEMENTED means the replica
/// has no health service and counts as healthy for the rest of the connection
/// (`reopen` false); anything else makes it unhealthy until a new stream says SERVING.
/// The backoff before that new stream starts over when the broken one had answered
/// and lived [`STEADY`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEnd {
    pub health: Health,
    pub reopen: bool,
    pub reset_backoff: bool,
}

pub fn on_stream_end(code: Option<Code>, why: &str, answers: u32, lived: Duration) -> StreamEnd {
    match code {
        Some(Code::Unimplemented) => StreamEnd { health: Health::Healthy, reopen: false, reset_backoff: true },
        _ => StreamEnd {
            health: Health::Unhealthy(format!("health watch ended: {why}")),
            reopen: true,
            reset_backoff: answers > 0 && lived >= STEADY,
        },
    }
}

/// What an answer means: only SERVING is healthy.
pub fn on_answer(serving: Serving) -> Health {
    match serving {
        Serving::Serving => Health::Healthy,
        other => Health::Unhealthy(format!("health says {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A framed response with status `n`, as tonic-health encodes it.
    fn answer(n: u8) -> Vec<u8> {
        let proto: &[u8] = if n == 0 { &[] } else { &[0x08, n] };
        let mut v = vec![0, 0, 0, 0, proto.len() as u8];
        v.extend_from_slice(proto);
        v
    }

    #[test]
    fn the_request_names_the_service_in_field_one() {
        assert_eq!(watch_request(""), [0, 0, 0, 0, 0]);
        assert_eq!(watch_request("a.B"), [0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']);
        let long = "x".repeat(200);
        let framed = watch_request(&long);
        assert_eq!(&framed[5..8], [0x0a, 0xc8, 0x01], "200 as a two-byte varint");
        assert_eq!(framed.len(), 5 + 3 + 200);
    }

    #[test]
    fn answers_split_across_chunks_and_several_per_chunk() {
        let mut a = Answers::default();
        let one = answer(1);
        assert_eq!(a.feed(&one[..3]), Ok(None));
        assert_eq!(a.feed(&one[3..]), Ok(Some(Serving::Serving)));
        let both = [answer(1), answer(2)].concat();
        assert_eq!(a.feed(&both), Ok(Some(Serving::NotServing)), "the last one counts");
        assert_eq!(a.feed(&answer(0)), Ok(Some(Serving::Unknown)), "an empty message is UNKNOWN");
        assert_eq!(a.feed(&answer(3)), Ok(Some(Serving::ServiceUnknown)));
        assert_eq!(a.feed(&answer(9)), Ok(Some(Serving::Other(9))));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // field 2 string "hi", field 3 fixed32, then status NOT_SERVING.
        let msg = [0x12, 2, b'h', b'i', 0x1d, 1, 2, 3, 4, 0x08, 2];
        assert_eq!(decode(&msg), Ok(Serving::NotServing));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic_or_unbounded_buffering() {
        let mut a = Answers::default();
        assert_eq!(a.feed(&[1, 0, 0, 0, 1, 0]), Err(BadAnswer::Compressed));
        let mut a = Answers::default();
        assert_eq!(a.feed(&[0, 0xff, 0xff, 0xff, 0xff]), Err(BadAnswer::TooLarge(u32::MAX as usize)));
        for bad in [&[0x08][..], &[0x0a, 5, 1], &[0x0f], &[0x09, 1, 2], &[0x80; 11]] {
            assert!(matches!(decode(bad), Err(BadAnswer::Malformed(_))), "{bad:?}");
        }
        // Random bytes: errors or answers, and nothing kept beyond one message.
        let mut rng = crate::rng::SplitMix64::seeded(7);
        for _ in 0..2000 {
            let mut a = Answers::default();
            let junk: Vec<u8> = (0..64).map(|_| crate::rng::Rng::below(&mut rng, 256) as u8).collect();
            let _ = a.feed(&junk);
            assert!(a.buf.len() <= 5 + MAX_MESSAGE);
        }
    }

    #[test]
    fn only_serving_is_healthy_and_unimplemented_ends_the_watch_healthy() {
        assert_eq!(on_answer(Serving::Serving), Health::Healthy);
        for s in [Serving::NotServing, Serving::ServiceUnknown, Serving::Unknown, Serving::Other(7)] {
            assert!(matches!(on_answer(s), Health::Unhealthy(_)), "{s}");
        }
        let end = on_stream_end(Some(Code::Unimplemented), "", 0, Duration::ZERO);
        assert_eq!(end, StreamEnd { health: Health::Healthy, reopen: false, reset_backoff: true });
        let end = on_stream_end(Some(Code::Unavailable), "UNAVAILABLE: going away", 3, STEADY);
        assert!(end.reopen && end.reset_backoff);
        assert_eq!(end.health, Health::Unhealthy("health watch ended: UNAVAILABLE: going away".into()));
        let end = on_stream_end(None, "reset", 0, STEADY * 10);
        assert!(end.reopen && !end.reset_backoff, "a stream that never answered backs off further");
        let end = on_stream_end(None, "closed", 1, STEADY / 2);
        assert!(!end.reset_backoff, "one that answers and closes at once, in a loop, backs off further");
    }
}
