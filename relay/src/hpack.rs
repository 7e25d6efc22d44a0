//! HPACK (RFC 7541) without a dynamic table of our own: whether a header block refers
//! to the sender's dynamic table (if not, any decoder reads it the same, so it passes
//! through), and headers encoded with static-table references and literals only. Pure.

/// `Some` when a header block refers to no dynamic-table entry, so a decoder with any
/// table reads it the same (what a peer that saw our table size of 0 sends), with
/// whether it adds entries to the sender's table. `None` too for a table size update
/// above 0, which the receiver's own limit might refuse. Walks the representations
/// without decoding a string.
pub fn static_only(block: &[u8]) -> Option<bool> {
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

/// One header as HPACK with no dynamic table: an indexed field when the static table
/// holds name and value, else a literal without indexing, its name indexed when the
/// static table holds the name.
pub fn encode(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
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
    use loona_hpack::Decoder;

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
