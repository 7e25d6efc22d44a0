//! HPACK (RFC 7541) for a relay: [`Transcoder`] reads a peer's header blocks, keeping
//! its dynamic table, and writes each block again with no reference to any dynamic
//! table, so it means the same to any decoder. Strings are copied as they came
//! (Huffman-coded or not); only the `:path` and `grpc-status` values are decoded. The
//! relay's own headers are written by [`encode`]. Pure.

use std::collections::VecDeque;

use crate::huffman;

/// RFC 7541, appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Static indexes of `:path`.
const PATH: [usize; 2] = [4, 5];

/// Why a header block could not be read (a COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

impl From<huffman::Invalid> for Invalid {
    fn from(_: huffman::Invalid) -> Self {
        Invalid
    }
}

/// What the relay wants to know of a block.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The `:path` value.
    pub path: Option<String>,
    /// The `grpc-status` value, when it is a number up to 255.
    pub status: Option<u8>,
    /// `grpc-timeout`, when it parses.
    pub timeout: Option<std::time::Duration>,
    /// `grpc-retry-pushback-ms`: `Some(Some(ms))` for a number of milliseconds up to
    /// `i32::MAX`, `Some(None)` for anything else (negative: do not retry).
    pub pushback: Option<Option<u64>>,
    /// The header list's size as RFC 7541 counts it (each field's name and value
    /// lengths plus 32).
    pub list_size: usize,
}

/// A string literal as it came: its length prefix (with the Huffman bit) and bytes.
#[derive(Debug, Clone)]
struct Str(Box<[u8]>);

/// What a field's name makes it, for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Path,
    Status,
    Pushback,
    Timeout,
    Other,
}

#[derive(Debug)]
struct Entry {
    name: Str,
    value: Str,
    kind: Kind,
    /// Decoded name and value lengths plus 32.
    size: usize,
}

/// One peer's header blocks in, blocks without dynamic-table references out.
#[derive(Debug)]
pub struct Transcoder {
    /// The peer's dynamic table, newest first.
    table: VecDeque<Entry>,
    size: usize,
    max: usize,
    /// The largest table size the peer may ask for.
    allowed: usize,
    /// `grpc-timeout` fields are read into [`Seen::timeout`] and not written (the relay
    /// writes the time left itself).
    drop_timeout: bool,
}

/// A field's name: a static index, a literal (as it came), or a table entry.
enum Name<'a> {
    Static(usize),
    Literal(&'a [u8], Kind, usize),
    Dynamic(&'a Entry),
}

impl Transcoder {
    /// A peer that may use a dynamic table of up to `allowed` bytes (4,096 by default).
    pub fn new(allowed: usize) -> Transcoder {
        Transcoder { table: VecDeque::new(), size: 0, max: allowed, allowed, drop_timeout: false }
    }

    /// Reads `grpc-timeout` into [`Seen::timeout`] without writing it out.
    pub fn dropping_timeout(mut self) -> Transcoder {
        self.drop_timeout = true;
        self
    }

    /// Writes `block` to `out` as fields that refer to no dynamic table (static
    /// indexes and literals not indexed; never-indexed ones stay so), and says what
    /// `seen` asks. Once the header list passes `budget` bytes, the rest of the block
    /// is read (the table stays in step) but not written: a field of a few bytes can
    /// name a table entry of thousands, and the caller refuses such a list anyway.
    pub fn transcode(
        &mut self,
        block: &[u8],
        out: &mut Vec<u8>,
        seen: &mut Seen,
        budget: usize,
    ) -> Result<(), Invalid> {
        let mut at = 0;
        let mut sink = Vec::new();
        while at < block.len() {
            let out = match seen.list_size > budget {
                false => &mut *out,
                true => {
                    sink.clear();
                    &mut sink
                }
            };
            let first = block[at];
            if first & 0x80 != 0 {
                // Indexed field.
                let index = integer(block, &mut at, 7)?;
                match index {
                    0 => return Err(Invalid),
                    1..=61 => {
                        let (name, value) = STATIC[index - 1];
                        seen.list_size += name.len() + value.len() + 32;
                        if PATH.contains(&index) {
                            seen.path = Some(value.to_owned());
                        }
                        put_integer(index, 7, 0x80, out);
                    }
                    _ => {
                        let e = self.entry(index)?;
                        seen.list_size += e.size;
                        note(seen, e.kind, &e.value.0)?;
                        if !(self.drop_timeout && e.kind == Kind::Timeout) {
                            out.push(0x00);
                            out.extend_from_slice(&e.name.0);
                            out.extend_from_slice(&e.value.0);
                        }
                    }
                }
                continue;
            }
            if first & 0xe0 == 0x20 {
                // Dynamic table size update.
                let size = integer(block, &mut at, 5)?;
                if size > self.allowed {
                    return Err(Invalid);
                }
                self.max = size;
                self.evict(0);
                continue;
            }
            let (prefix, indexing) = if first & 0xc0 == 0x40 { (6, true) } else { (4, false) };
            // Literal never indexed (0001xxxx) must stay so for any intermediary after us.
            let mask = if first & 0xf0 == 0x10 { 0x10 } else { 0x00 };
            let index = integer(block, &mut at, prefix)?;
            let name = match index {
                0 => {
                    let s = string(block, &mut at)?;
                    let (kind, len) = kind_of(s)?;
                    Name::Literal(s, kind, len)
                }
                1..=61 => Name::Static(index),
                _ => Name::Dynamic(self.entry(index)?),
            };
            let value = string(block, &mut at)?;
            let (kind, name_len) = match &name {
                Name::Static(i) => (if PATH.contains(i) { Kind::Path } else { Kind::Other }, STATIC[i - 1].0.len()),
                Name::Literal(_, kind, len) => (*kind, *len),
                Name::Dynamic(e) => (e.kind, e.size - 32 - decoded_len(&e.value.0)?),
            };
            let value_len = decoded_len(value)?;
            seen.list_size += name_len + value_len + 32;
            note(seen, kind, value)?;
            // Written as a literal without indexing: the name by static index or as a
            // literal string, then the value as it came (into the sink when dropped).
            let mut dropped = Vec::new();
            let out = if self.drop_timeout && kind == Kind::Timeout { &mut dropped } else { out };
            let name = match name {
                Name::Static(i) => {
                    put_integer(i, 4, mask, out);
                    None
                }
                Name::Literal(s, ..) => {
                    out.push(mask);
                    out.extend_from_slice(s);
                    Some(Str(s.into()))
                }
                Name::Dynamic(e) => {
                    out.push(mask);
                    out.extend_from_slice(&e.name.0);
                    Some(e.name.clone())
                }
            };
            out.extend_from_slice(value);
            if indexing {
                let size = name_len + value_len + 32;
                let name = match name {
                    Some(s) => s,
                    None => literal(STATIC[index - 1].0.as_bytes()),
                };
                self.insert(Entry { name, value: Str(value.into()), kind, size });
            }
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<&Entry, Invalid> {
        self.table.get(index - 62).ok_or(Invalid)
    }

    fn insert(&mut self, e: Entry) {
        if e.size > self.max {
            // Larger than the whole table: it empties it and is not kept.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(e.size);
        self.size += e.size;
        self.table.push_front(e);
    }

    /// Drops the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some(e) = self.table.pop_back() else { break };
            self.size -= e.size;
        }
    }
}

/// Records the value of a field the relay wants.
fn note(seen: &mut Seen, kind: Kind, value: &[u8]) -> Result<(), Invalid> {
    match kind {
        Kind::Path => {
            let mut path = Vec::with_capacity(value.len() * 8 / 5);
            decode(value, |b| path.push(b))?;
            seen.path = Some(String::from_utf8(path).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()));
        }
        Kind::Status => {
            // Digits only, at most three, up to 255; anything else is no status.
            let mut n: Option<u32> = Some(0);
            let mut digits = 0;
            decode(value, |b| {
                digits += 1;
                n = n.filter(|_| b.is_ascii_digit() && digits <= 3).map(|n| n * 10 + u32::from(b - b'0'));
            })?;
            seen.status = n.filter(|_| digits > 0).and_then(|n| u8::try_from(n).ok());
        }
        Kind::Pushback => {
            let mut n: Option<u64> = Some(0);
            let mut digits = 0;
            decode(value, |b| {
                digits += 1;
                n = n.filter(|_| b.is_ascii_digit()).map(|n| n.saturating_mul(10).saturating_add(u64::from(b - b'0')));
            })?;
            seen.pushback = Some(n.filter(|&ms| digits > 0 && ms <= i32::MAX as u64));
        }
        Kind::Timeout => {
            let mut buf = [0u8; 9];
            let mut n = 0;
            decode(value, |b| {
                if n < buf.len() {
                    buf[n] = b;
                }
                n += 1;
            })?;
            seen.timeout = buf.get(..n).and_then(lb_core::duration::parse_grpc_timeout);
        }
        Kind::Other => {}
    }
    Ok(())
}

/// A literal name's kind and decoded length.
fn kind_of(name: &[u8]) -> Result<(Kind, usize), Invalid> {
    const PUSHBACK: &[u8] = b"grpc-retry-pushback-ms";
    let len = decoded_len(name)?;
    if ![":path".len(), "grpc-status".len(), PUSHBACK.len(), "grpc-timeout".len()].contains(&len) {
        return Ok((Kind::Other, len));
    }
    let mut buf = [0u8; PUSHBACK.len()];
    let mut n = 0;
    decode(name, |b| {
        buf[n] = b;
        n += 1;
    })?;
    Ok(match &buf[..n] {
        b":path" => (Kind::Path, len),
        b"grpc-status" => (Kind::Status, len),
        PUSHBACK => (Kind::Pushback, len),
        b"grpc-timeout" => (Kind::Timeout, len),
        _ => (Kind::Other, len),
    })
}

/// A string literal's bytes after its length prefix, and whether they are Huffman-coded.
fn payload(s: &[u8]) -> (bool, &[u8]) {
    let mut at = 0;
    let _ = integer(s, &mut at, 7);
    (s[0] & 0x80 != 0, &s[at..])
}

/// Decodes a string literal (length prefix included), handing each byte to `out`;
/// returns the decoded length.
fn decode(s: &[u8], mut out: impl FnMut(u8)) -> Result<usize, Invalid> {
    match payload(s) {
        (false, bytes) => {
            bytes.iter().for_each(|&b| out(b));
            Ok(bytes.len())
        }
        (true, bytes) => Ok(huffman::decode(bytes, out)?),
    }
}

fn decoded_len(s: &[u8]) -> Result<usize, Invalid> {
    match payload(s) {
        (false, bytes) => Ok(bytes.len()),
        (true, bytes) => Ok(huffman::decode(bytes, |_| {})?),
    }
}

/// A plain (not Huffman-coded) string literal.
fn literal(bytes: &[u8]) -> Str {
    let mut s = Vec::with_capacity(bytes.len() + 2);
    put_integer(bytes.len(), 7, 0x00, &mut s);
    s.extend_from_slice(bytes);
    Str(s.into())
}

/// The string literal at `at` (length prefix included), moving past it.
fn string<'a>(block: &'a [u8], at: &mut usize) -> Result<&'a [u8], Invalid> {
    let start = *at;
    let len = integer(block, at, 7)?;
    let end = at.checked_add(len).filter(|&end| end <= block.len()).ok_or(Invalid)?;
    *at = end;
    Ok(&block[start..end])
}

/// Reads an HPACK integer with an N-bit prefix at `at`, moving past it.
fn integer(block: &[u8], at: &mut usize, prefix_bits: u32) -> Result<usize, Invalid> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = (*block.get(*at).ok_or(Invalid)? as usize) & max;
    *at += 1;
    if value < max {
        return Ok(value);
    }
    for shift in (0..28).step_by(7) {
        let b = *block.get(*at).ok_or(Invalid)?;
        *at += 1;
        value += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Invalid)
}

/// One header as HPACK with no dynamic table: an indexed field when the static table
/// holds name and value, else a literal without indexing, its name indexed when the
/// static table holds the name.
pub fn encode(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    if let Some(i) = STATIC.iter().position(|(n, v)| n.as_bytes() == name && v.as_bytes() == value && !v.is_empty()) {
        return put_integer(i + 1, 7, 0x80, out);
    }
    match STATIC.iter().position(|(n, _)| n.as_bytes() == name) {
        Some(i) => put_integer(i + 1, 4, 0x00, out),
        None => {
            out.push(0x00);
            put_integer(name.len(), 7, 0x00, out);
            out.extend_from_slice(name);
        }
    }
    put_integer(value.len(), 7, 0x00, out);
    out.extend_from_slice(value);
}

/// An HPACK integer with an N-bit prefix, the byte's other bits set to `mask`.
fn put_integer(value: usize, prefix_bits: u32, mask: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(mask | value as u8);
        return;
    }
    out.push(mask | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

#[cfg(test)]
mod tests {
    use loona_hpack::{Decoder, Encoder};

    use super::*;

    fn owned(headers: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
    }

    /// Whether a block names any dynamic-table entry or changes the table.
    fn refers_to_a_table(block: &[u8]) -> bool {
        let mut at = 0;
        while at < block.len() {
            let first = block[at];
            let (prefix, strings) = match first {
                b if b & 0x80 != 0 => (7, false),
                b if b & 0xe0 == 0x20 => return true,
                b if b & 0xc0 == 0x40 => return true,
                _ => (4, true),
            };
            let index = integer(block, &mut at, prefix).unwrap();
            if index > 61 {
                return true;
            }
            if strings {
                if index == 0 {
                    string(block, &mut at).unwrap();
                }
                string(block, &mut at).unwrap();
            }
        }
        false
    }

    #[test]
    fn the_static_table_matches_a_standard_decoder() {
        let mut d = Decoder::new();
        for (i, (name, value)) in STATIC.iter().enumerate() {
            let got = d.decode(&[0x80 | (i as u8 + 1)]).unwrap();
            assert_eq!(got, vec![(name.as_bytes().to_vec(), value.as_bytes().to_vec())], "index {}", i + 1);
        }
    }

    #[test]
    fn blocks_using_the_dynamic_table_come_out_standalone_and_the_same() {
        let headers: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/hello.HelloService/SayHello"),
            (b":authority", b"server.test:50051"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"999999m"),
            (b"x-long", &[b'v'; 300]),
        ];
        let mut enc = Encoder::new();
        let mut t = Transcoder::new(4096);
        for round in 0..3 {
            let block = enc.encode(headers.iter().copied());
            if round > 0 {
                assert!(refers_to_a_table(&block), "the encoder used its table");
            }
            let (mut out, mut seen) = (Vec::new(), Seen::default());
            t.transcode(&block, &mut out, &mut seen, usize::MAX).unwrap();
            assert!(!refers_to_a_table(&out));
            assert_eq!(Decoder::new().decode(&out).unwrap(), owned(headers), "round {round}");
            assert_eq!(seen.path.as_deref(), Some("/hello.HelloService/SayHello"));
            let size: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
            assert_eq!(seen.list_size, size);
        }
    }

    /// `text` as a Huffman-coded string literal.
    fn huffman(text: &[u8]) -> Vec<u8> {
        let codes = huffman::codes();
        let (mut acc, mut bits, mut bytes) = (0u64, 0u32, Vec::new());
        for &b in text {
            let (code, len) = codes[b as usize];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                bytes.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            bytes.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
        }
        let mut s = Vec::new();
        put_integer(bytes.len(), 7, 0x80, &mut s);
        s.extend(bytes);
        s
    }

    #[test]
    fn huffman_coded_names_and_values_are_read() {
        // grpc-status: 14, both Huffman-coded, added to the table; then indexed.
        let mut block = vec![0x40];
        block.extend(huffman(b"grpc-status"));
        block.extend(huffman(b"14"));
        let mut t = Transcoder::new(4096);
        let mut seen = Seen::default();
        let mut out = Vec::new();
        t.transcode(&block, &mut out, &mut seen, usize::MAX).unwrap();
        assert_eq!(Decoder::new().decode(&block).unwrap(), owned(&[(b"grpc-status", b"14")]), "the test block");
        assert_eq!(seen.status, Some(14));
        let mut again = Seen::default();
        out.clear();
        t.transcode(&[0x80 | 62], &mut out, &mut again, usize::MAX).unwrap();
        assert_eq!(again.status, Some(14));
        assert_eq!(Decoder::new().decode(&out).unwrap(), owned(&[(b"grpc-status", b"14")]));
    }

    #[test]
    fn a_table_size_update_evicts_and_one_past_the_limit_is_refused() {
        let mut t = Transcoder::new(4096);
        let mut enc = Encoder::new();
        let block = enc.encode([(&b"x-a"[..], &b"1"[..])]);
        t.transcode(&block, &mut Vec::new(), &mut Seen::default(), usize::MAX).unwrap();
        assert_eq!(t.table.len(), 1);
        t.transcode(&[0x20], &mut Vec::new(), &mut Seen::default(), usize::MAX).unwrap();
        assert_eq!(t.table.len(), 0);
        assert_eq!(t.transcode(&[0x80 | 62], &mut Vec::new(), &mut Seen::default(), usize::MAX), Err(Invalid));
        assert_eq!(
            t.transcode(&[0x3f, 0xe2, 0x1f], &mut Vec::new(), &mut Seen::default(), usize::MAX),
            Err(Invalid),
            "4,097"
        );
    }

    #[test]
    fn truncated_and_malformed_blocks_are_refused() {
        let mut t = Transcoder::new(4096);
        for block in
            [&[0x80][..], &[0x00, 0x05, b'a'], &[0x0f], &[0x04, 0x85, 0xff], &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]]
        {
            assert_eq!(
                t.transcode(block, &mut Vec::new(), &mut Seen::default(), usize::MAX),
                Err(Invalid),
                "{block:x?}"
            );
        }
    }

    #[test]
    fn encoded_headers_decode_back_with_a_standard_decoder() {
        let headers: &[(&[u8], &[u8])] = &[
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"0"),
            (b":authority", b""),
        ];
        let mut out = Vec::new();
        for (n, v) in headers {
            encode(n, v, &mut out);
        }
        assert_eq!(Decoder::new().decode(&out).unwrap(), owned(headers));
        assert!(!refers_to_a_table(&out));
    }

    #[test]
    fn a_list_past_the_budget_is_read_but_not_written() {
        let mut t = Transcoder::new(4096);
        let mut block = vec![0x40];
        block.extend(huffman(b"x-big"));
        block.extend(huffman(&[b'v'; 4000]));
        // Then 10,000 one-byte references to that 4 KB entry: 40 MB if written out.
        block.extend(std::iter::repeat_n(0x80 | 62, 10_000));
        let (mut out, mut seen) = (Vec::new(), Seen::default());
        t.transcode(&block, &mut out, &mut seen, 16 << 10).unwrap();
        assert!(seen.list_size > 40_000_000, "counted in full: {}", seen.list_size);
        assert!(out.len() < 32 << 10, "written only up to the budget: {} bytes", out.len());
        assert_eq!(t.table.len(), 1, "the table is still in step");
    }

    #[test]
    fn a_never_indexed_field_stays_never_indexed() {
        let mut block = vec![0x10 | 0x0f, 23 - 15]; // authorization (static 23), never indexed
        block.extend([0x06]);
        block.extend(b"secret");
        let (mut out, mut seen) = (Vec::new(), Seen::default());
        Transcoder::new(4096).transcode(&block, &mut out, &mut seen, usize::MAX).unwrap();
        assert_eq!(out, block);
    }

    #[test]
    fn grpc_timeout_is_read_and_left_out_when_asked() {
        let headers: &[(&[u8], &[u8])] = &[(b":path", b"/a/b"), (b"grpc-timeout", b"250m"), (b"te", b"trailers")];
        let mut enc = Encoder::new();
        let mut t = Transcoder::new(4096).dropping_timeout();
        for _ in 0..2 {
            let block = enc.encode(headers.iter().copied());
            let (mut out, mut seen) = (Vec::new(), Seen::default());
            t.transcode(&block, &mut out, &mut seen, usize::MAX).unwrap();
            assert_eq!(seen.timeout, Some(std::time::Duration::from_millis(250)));
            assert_eq!(Decoder::new().decode(&out).unwrap(), owned(&[headers[0], headers[2]]));
        }
    }
}
