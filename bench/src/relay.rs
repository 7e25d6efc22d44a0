//! A prototype HTTP/2 frame relay for unary calls, measured beside the proxy's h2 path
//! (`bench` runs it as `bench --relay LISTEN=TARGET`, a process of its own on the
//! proxy's CPU). It forwards DATA frames between a client connection and an upstream
//! connection with their stream ids rewritten. HPACK's dynamic tables are per
//! connection, so a header block can pass through as it is only when it refers to no
//! dynamic-table entry: the relay advertises `SETTINGS_HEADER_TABLE_SIZE = 0` on both
//! sides, so that is every block a peer sends once it has seen the setting. The blocks
//! sent before that are decoded in full and encoded again with static-table literals.
//!
//! It is a bound on what relaying could save, not a proxy: one upstream connection per
//! client connection (no balancing, retries, deadlines or metrics), no send-side flow
//! control (messages are small), and GOAWAY, errors and oversized header blocks end the
//! connection.

use std::{collections::HashMap, net::SocketAddr};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, BytesMut};
use loona_hpack::Decoder;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame either side sends by default (SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;
/// Receive windows are opened this wide and credited back in steps of `CREDIT`.
const WINDOW: u32 = (1 << 31) - 1;
const CREDIT: u32 = 1 << 30;

/// Accepts clients on `listen` and relays each to its own connection to `target`.
pub async fn serve(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    loop {
        let (client, _) = listener.accept().await?;
        client.set_nodelay(true)?;
        tokio::spawn(async move {
            if let Err(e) = relay(client, target).await {
                eprintln!("relay: {e:#}");
            }
        });
    }
}

/// One connection's half of the relay.
struct Side {
    io: TcpStream,
    read: BytesMut,
    write: BytesMut,
    decoder: Decoder<'static>,
    /// A header block waiting for its CONTINUATION frames: stream, flags, fragments.
    partial: Option<(u32, u8, Vec<u8>)>,
    /// DATA bytes received and not yet credited back.
    uncredited: u32,
}

impl Side {
    fn new(io: TcpStream) -> Side {
        Side {
            io,
            read: BytesMut::with_capacity(64 << 10),
            write: BytesMut::with_capacity(64 << 10),
            decoder: Decoder::new(),
            partial: None,
            uncredited: 0,
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        self.write.put_slice(&len.to_be_bytes()[1..]);
        self.write.put_u8(kind);
        self.write.put_u8(flags);
        self.write.put_u32(stream);
        self.write.put_slice(payload);
    }

    /// Our SETTINGS (no dynamic table, no push, wide windows) and a wide connection window.
    fn open(&mut self) {
        let mut settings = Vec::new();
        for (id, value) in [(0x1u16, 0u32), (0x2, 0), (0x4, WINDOW)] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        self.frame(SETTINGS, 0, 0, &settings);
        self.frame(8, 0, 0, &(WINDOW - 65_535).to_be_bytes());
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.write.is_empty() {
            self.io.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(())
    }
}

/// Stream ids across the relay: the client's id for each upstream id, and back.
#[derive(Default)]
struct Streams {
    upstream_of: HashMap<u32, u32>,
    client_of: HashMap<u32, u32>,
    next_upstream: u32,
}

impl Streams {
    /// The other side's id for `id`, arriving from the client or from upstream.
    fn get(&self, id: u32, from_client: bool) -> Option<u32> {
        match from_client {
            true => self.upstream_of.get(&id),
            false => self.client_of.get(&id),
        }
        .copied()
    }

    /// The upstream id for a client's stream, a new one for its first HEADERS.
    fn open(&mut self, id: u32) -> u32 {
        if let Some(&up) = self.upstream_of.get(&id) {
            return up;
        }
        let up = self.next_upstream * 2 + 1;
        self.next_upstream += 1;
        self.upstream_of.insert(id, up);
        self.client_of.insert(up, id);
        up
    }

    /// Forgets a stream once the upstream side ended or either side reset it.
    fn close(&mut self, id: u32, from_client: bool) {
        if let Some(other) = self.get(id, from_client) {
            let (client, up) = if from_client { (id, other) } else { (other, id) };
            self.upstream_of.remove(&client);
            self.client_of.remove(&up);
        }
    }
}

async fn relay(client: TcpStream, target: SocketAddr) -> anyhow::Result<()> {
    let upstream = TcpStream::connect(target).await.with_context(|| format!("connecting to {target}"))?;
    upstream.set_nodelay(true)?;
    let (mut c, mut u) = (Side::new(client), Side::new(upstream));
    while c.read.len() < PREFACE.len() {
        if c.io.read_buf(&mut c.read).await? == 0 {
            return Ok(());
        }
    }
    if &c.read[..PREFACE.len()] != PREFACE {
        bail!("not an HTTP/2 client preface");
    }
    c.read.advance(PREFACE.len());
    u.write.put_slice(PREFACE);
    c.open();
    u.open();
    let mut streams = Streams::default();
    let mut scratch = Vec::with_capacity(1024);
    loop {
        relay_frames(&mut c, &mut u, &mut streams, true, &mut scratch)?;
        relay_frames(&mut u, &mut c, &mut streams, false, &mut scratch)?;
        c.flush().await?;
        u.flush().await?;
        let n = tokio::select! {
            n = c.io.read_buf(&mut c.read) => n?,
            n = u.io.read_buf(&mut u.read) => n?,
        };
        if n == 0 {
            return Ok(());
        }
    }
}

/// Handles every whole frame in `from`'s read buffer, queueing what goes on to `to`.
fn relay_frames(
    from: &mut Side,
    to: &mut Side,
    streams: &mut Streams,
    from_client: bool,
    scratch: &mut Vec<u8>,
) -> anyhow::Result<()> {
    while from.read.len() >= 9 {
        let len = u32::from_be_bytes([0, from.read[0], from.read[1], from.read[2]]) as usize;
        if from.read.len() < 9 + len {
            break;
        }
        let (kind, flags) = (from.read[3], from.read[4]);
        let id = u32::from_be_bytes([from.read[5], from.read[6], from.read[7], from.read[8]]) & 0x7fff_ffff;
        let frame = from.read.split_to(9 + len);
        let payload = &frame[9..];
        match kind {
            DATA => {
                from.uncredited += len as u32;
                if from.uncredited >= CREDIT {
                    let credit = std::mem::take(&mut from.uncredited);
                    from.frame(8, 0, 0, &credit.to_be_bytes());
                }
                let body = unpad(payload, flags)?;
                if let Some(other) = streams.get(id, from_client) {
                    to.frame(DATA, flags & END_STREAM, other, body);
                    if !from_client && flags & END_STREAM != 0 {
                        streams.close(id, false);
                    }
                }
            }
            HEADERS => {
                let mut block = unpad(payload, flags)?;
                if flags & PRIORITY != 0 {
                    block = block.get(5..).context("HEADERS priority fields")?;
                }
                match flags & END_HEADERS {
                    0 => from.partial = Some((id, flags, block.to_vec())),
                    _ => headers(from, to, streams, from_client, id, flags, block, scratch)?,
                }
            }
            CONTINUATION => {
                let (stream, first_flags, mut block) = from.partial.take().context("CONTINUATION without HEADERS")?;
                block.extend_from_slice(payload);
                match flags & END_HEADERS {
                    0 => from.partial = Some((stream, first_flags, block)),
                    _ => headers(from, to, streams, from_client, stream, first_flags, &block, scratch)?,
                }
            }
            RST_STREAM => {
                if let Some(other) = streams.get(id, from_client) {
                    to.frame(RST_STREAM, 0, other, payload);
                }
                streams.close(id, from_client);
            }
            SETTINGS if flags & ACK == 0 => from.frame(SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => from.frame(PING, ACK, 0, payload),
            GOAWAY => bail!("GOAWAY from the {}", if from_client { "client" } else { "replica" }),
            _ => {} // WINDOW_UPDATE, PRIORITY, acks: nothing to relay
        }
    }
    Ok(())
}

/// Decodes a header block from `from` and sends it on to `to`, encoded again.
#[allow(clippy::too_many_arguments)]
fn headers(
    from: &mut Side,
    to: &mut Side,
    streams: &mut Streams,
    from_client: bool,
    id: u32,
    flags: u8,
    block: &[u8],
    scratch: &mut Vec<u8>,
) -> anyhow::Result<()> {
    scratch.clear();
    if let Some(inserts) = static_only(block) {
        // Nothing in it refers to the sender's dynamic table: valid as it is. What it
        // adds to that table, the decoder must still hear, for later blocks.
        scratch.extend_from_slice(block);
        if inserts {
            from.decoder.decode_with_cb(block, |_, _| {}).map_err(|e| anyhow::anyhow!("HPACK: {e:?}"))?;
        }
    } else {
        from.decoder
            .decode_with_cb(block, |name, value| encode(&name, &value, scratch))
            .map_err(|e| anyhow::anyhow!("HPACK: {e:?}"))?;
    }
    if scratch.len() > MAX_FRAME {
        bail!("a header block of {} bytes (the prototype sends no CONTINUATION)", scratch.len());
    }
    let other = match from_client {
        true => streams.open(id),
        false => match streams.get(id, false) {
            Some(client) => client,
            None => return Ok(()),
        },
    };
    to.frame(HEADERS, END_HEADERS | (flags & END_STREAM), other, scratch);
    if !from_client && flags & END_STREAM != 0 {
        streams.close(id, false);
    }
    Ok(())
}

/// `Some` when a header block refers to no dynamic-table entry, so a decoder with any
/// table reads it the same (what a peer that saw our table size of 0 sends), with
/// whether it adds entries to the sender's table. `None` too for a table size update
/// above 0, which the receiver's own limit might refuse. Walks the representations
/// without decoding a string.
fn static_only(block: &[u8]) -> Option<bool> {
    const STATIC: usize = 61;
    let mut at = 0;
    let mut inserts = false;
    while at < block.len() {
        let first = block[at];
        if first & 0xe0 == 0x20 {
            if hpack_integer(block, &mut at, 5)? > 0 {
                return None;
            }
            continue;
        }
        let (prefix, has_strings) = match first {
            b if b & 0x80 != 0 => (7, false),   // indexed field
            b if b & 0xc0 == 0x40 => (6, true), // literal, incremental indexing
            _ => (4, true),                     // literal without or never indexed
        };
        inserts |= first & 0xc0 == 0x40;
        let index = hpack_integer(block, &mut at, prefix)?;
        if index > STATIC || (first & 0x80 != 0 && index == 0) {
            return None;
        }
        if has_strings {
            if index == 0 {
                skip_string(block, &mut at)?; // the name
            }
            skip_string(block, &mut at)?; // the value
        }
    }
    Some(inserts)
}

/// Reads an HPACK integer with an N-bit prefix at `at`, moving past it.
fn hpack_integer(block: &[u8], at: &mut usize, prefix_bits: u32) -> Option<usize> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = (*block.get(*at)? as usize) & max;
    *at += 1;
    if value < max {
        return Some(value);
    }
    for shift in (0..28).step_by(7) {
        let b = *block.get(*at)?;
        *at += 1;
        value += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn skip_string(block: &[u8], at: &mut usize) -> Option<()> {
    let len = hpack_integer(block, at, 7)?;
    *at = at.checked_add(len).filter(|&end| end <= block.len())?;
    Some(())
}

/// A frame's payload without its padding.
fn unpad(payload: &[u8], flags: u8) -> anyhow::Result<&[u8]> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let pad = *payload.first().context("padding length")? as usize;
    payload.get(1..payload.len().saturating_sub(pad)).context("padding longer than the frame")
}

/// One header as HPACK with no dynamic table: an indexed field when the static table
/// holds name and value, else a literal without indexing, its name indexed when the
/// static table holds the name.
fn encode(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let full = match (name, value) {
        (b":method", b"GET") => Some(2),
        (b":method", b"POST") => Some(3),
        (b":path", b"/") => Some(4),
        (b":scheme", b"http") => Some(6),
        (b":scheme", b"https") => Some(7),
        (b":status", b"200") => Some(8),
        _ => None,
    };
    if let Some(index) = full {
        return integer(index, 7, 0x80, out);
    }
    match static_name(name) {
        Some(index) => integer(index, 4, 0x00, out),
        None => {
            out.push(0x00);
            integer(name.len(), 7, 0x00, out);
            out.extend_from_slice(name);
        }
    }
    integer(value.len(), 7, 0x00, out);
    out.extend_from_slice(value);
}

/// The static table's index of `name` (RFC 7541, appendix A) for the names gRPC uses.
fn static_name(name: &[u8]) -> Option<usize> {
    Some(match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-encoding" => 16,
        b"content-length" => 28,
        b"content-type" => 31,
        b"date" => 33,
        b"user-agent" => 58,
        _ => return None,
    })
}

/// An HPACK integer with an N-bit prefix, the byte's other bits set to `mask`.
fn integer(value: usize, prefix_bits: u32, mask: u8, out: &mut Vec<u8>) {
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
    use super::*;

    #[test]
    fn encoded_headers_decode_back_with_a_standard_decoder() {
        let headers: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/hello.HelloService/SayHello"),
            (b":authority", b"127.0.0.1:50151"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"999999m"),
            (b"x-long", &[b'v'; 300]),
        ];
        let mut out = Vec::new();
        for (n, v) in headers {
            encode(n, v, &mut out);
        }
        let decoded = Decoder::new().decode(&out).unwrap();
        let want: Vec<(Vec<u8>, Vec<u8>)> = headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        assert_eq!(decoded, want);
        assert!(static_only(&out).is_some(), "no dynamic-table references");
    }

    #[test]
    fn a_block_naming_a_dynamic_entry_is_not_passed_through() {
        let mut out = Vec::new();
        encode(b":method", b"POST", &mut out);
        assert!(static_only(&out).is_some());
        out.push(0x80 | 62); // the first dynamic entry
        assert!(static_only(&out).is_none());
        assert!(static_only(&[0x0f, 0x30, 0x00]).is_none(), "a literal naming dynamic entry 63");
        assert!(static_only(&[0x00, 0x05, b'a']).is_none(), "a name longer than the block");
        assert_eq!(static_only(&[0x20, 0x88]), Some(false), "a table size update to 0, then index 8");
        assert_eq!(static_only(&[0x3f, 0xe1, 0x1f]), None, "a table size update to 4096");
        assert_eq!(static_only(&[0x40, 0x01, b'a', 0x01, b'b']), Some(true), "a literal added to the table");
    }
}
