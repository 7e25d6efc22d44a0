//! HTTP/2 frame headers (RFC 9113 §4.1): reading one from a buffer, writing one into
//! an output buffer, and the constants the relay uses. Pure.

use bytes::{BufMut, BytesMut};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The smallest, and default, SETTINGS_MAX_FRAME_SIZE.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The initial flow-control window of a connection and of each stream.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// The largest window flow control allows.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// Error codes (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    NoError = 0x0,
    Protocol = 0x1,
    Internal = 0x2,
    FlowControl = 0x3,
    FrameSize = 0x6,
    RefusedStream = 0x7,
    Cancel = 0x8,
    Compression = 0x9,
    EnhanceYourCalm = 0xb,
}

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// The header at the start of `buf`, if all nine bytes are there.
    pub fn parse(buf: &[u8]) -> Option<Head> {
        let b: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize,
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }
}

/// Appends a frame to `out`.
pub fn put(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    put_head(out, payload.len(), kind, flags, stream);
    out.put_slice(payload);
}

/// Appends a frame header announcing `len` payload bytes, for a caller that writes them.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.reserve(HEADER_LEN + len);
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

pub fn put_rst(out: &mut BytesMut, stream: u32, reason: Reason) {
    put(out, RST_STREAM, 0, stream, &(reason as u32).to_be_bytes());
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put(out, WINDOW_UPDATE, 0, stream, &increment.to_be_bytes());
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, reason: Reason) {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&last_stream.to_be_bytes());
    payload[4..].copy_from_slice(&(reason as u32).to_be_bytes());
    put(out, GOAWAY, 0, 0, &payload);
}

/// A SETTINGS frame with these `(id, value)` pairs.
pub fn put_settings(out: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(out, settings.len() * 6, SETTINGS, 0, 0);
    for &(id, value) in settings {
        out.put_u16(id);
        out.put_u32(value);
    }
}

/// Each `(id, value)` pair of a SETTINGS payload, or `None` for a length not a multiple
/// of six.
pub fn settings(payload: &[u8]) -> Option<impl Iterator<Item = (u16, u32)> + '_> {
    payload.len().is_multiple_of(6).then(|| {
        payload
            .chunks_exact(6)
            .map(|s| (u16::from_be_bytes([s[0], s[1]]), u32::from_be_bytes([s[2], s[3], s[4], s[5]])))
    })
}

/// A big-endian u32 at `at`, its top bit cleared (stream ids, window increments).
pub fn u31(payload: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = payload.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b) & 0x7fff_ffff)
}

pub fn u32_at(payload: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(payload.get(at..at + 4)?.try_into().ok()?))
}

/// A DATA or HEADERS payload without its padding (and, for HEADERS, its priority
/// fields): the offset and end of what it carries, or `None` when the padding does not
/// fit.
pub fn content(payload: &[u8], flags: u8, kind: u8) -> Option<(usize, usize)> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = *payload.first()? as usize;
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if kind == HEADERS && flags & PRIORITY != 0 {
        start += 5;
    }
    (start <= end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_frame_reads_back() {
        let mut out = BytesMut::new();
        put(&mut out, HEADERS, END_HEADERS, 0x8000_0003, b"abc");
        let head = Head::parse(&out).unwrap();
        assert_eq!(head, Head { len: 3, kind: HEADERS, flags: END_HEADERS, stream: 3 });
        assert_eq!(&out[HEADER_LEN..], b"abc");
        assert_eq!(Head::parse(&out[..8]), None);
    }

    #[test]
    fn padding_and_priority_are_stripped_and_bad_padding_refused() {
        assert_eq!(content(&[2, b'a', b'b', 0, 0], PADDED, DATA), Some((1, 3)));
        assert_eq!(content(&[9, b'a'], PADDED, DATA), None);
        assert_eq!(content(&[0, 0, 0, 1, 16, b'x'], PRIORITY, HEADERS), Some((5, 6)));
        assert_eq!(content(&[0, 0, 0], PRIORITY, HEADERS), None);
        assert_eq!(content(&[], PADDED, DATA), None);
    }

    #[test]
    fn settings_pairs_are_read_and_a_ragged_payload_refused() {
        let mut out = BytesMut::new();
        put_settings(&mut out, &[(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20), (SETTINGS_ENABLE_PUSH, 0)]);
        let pairs: Vec<_> = settings(&out[HEADER_LEN..]).unwrap().collect();
        assert_eq!(pairs, vec![(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20), (SETTINGS_ENABLE_PUSH, 0)]);
        assert!(settings(&[0; 7]).is_none());
    }
}
