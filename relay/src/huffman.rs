//! HPACK's Huffman code (RFC 7541, appendix B), decoding only. The code is canonical,
//! so each symbol's code length defines it; from the lengths a decoder is built once: a
//! table stepping four bits at a time through the code tree. Pure.

use std::sync::OnceLock;

/// The code length of each symbol, 0 to 255 and EOS (256).
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const EOS: u16 = 256;

/// Where four more bits lead from one node of the code tree.
#[derive(Clone, Copy, Default)]
struct Step {
    /// The internal node reached.
    next: u8,
    /// A symbol completed on the way (at most one: every code has 5 bits or more).
    symbol: Option<u8>,
    /// EOS was decoded: an error.
    eos: bool,
}

struct Table {
    steps: Vec<[Step; 16]>,
    /// Whether ending at a node is valid padding: reached from the root by at most
    /// seven 1 bits (a prefix of EOS), or the root itself.
    may_end: Vec<bool>,
}

/// The code of each symbol, assigned canonically: by length, then by symbol.
pub(crate) fn codes() -> [(u32, u8); 257] {
    let mut order: Vec<u16> = (0..=EOS).collect();
    order.sort_by_key(|&s| (LENGTHS[s as usize], s));
    let mut codes = [(0u32, 0u8); 257];
    let (mut code, mut len) = (0u32, LENGTHS[order[0] as usize]);
    for (i, &s) in order.iter().enumerate() {
        let l = LENGTHS[s as usize];
        if i > 0 {
            code = (code + 1) << (l - len);
        }
        len = l;
        codes[s as usize] = (code, l);
    }
    codes
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The code tree: internal nodes with two children each, a child being another
        // internal node or a symbol.
        #[derive(Clone, Copy)]
        enum Child {
            None,
            Node(u8),
            Leaf(u16),
        }
        let mut tree: Vec<[Child; 2]> = vec![[Child::None; 2]];
        for (symbol, &(code, len)) in codes().iter().enumerate() {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    tree[node][bit] = Child::Leaf(symbol as u16);
                } else {
                    node = match tree[node][bit] {
                        Child::Node(n) => n as usize,
                        _ => {
                            tree.push([Child::None; 2]);
                            let n = tree.len() - 1;
                            tree[node][bit] = Child::Node(n as u8);
                            n
                        }
                    };
                }
            }
        }
        let mut may_end = vec![false; tree.len()];
        let mut node = 0;
        may_end[0] = true;
        for _ in 0..7 {
            match tree[node][1] {
                Child::Node(n) => {
                    node = n as usize;
                    may_end[node] = true;
                }
                _ => break,
            }
        }
        let steps = (0..tree.len())
            .map(|start| {
                let mut row = [Step::default(); 16];
                for (nibble, step) in row.iter_mut().enumerate() {
                    let mut node = start;
                    for i in (0..4).rev() {
                        match tree[node][(nibble >> i) & 1] {
                            Child::Node(n) => node = n as usize,
                            Child::Leaf(EOS) => step.eos = true,
                            Child::Leaf(s) => {
                                step.symbol = Some(s as u8);
                                node = 0;
                            }
                            Child::None => unreachable!("the canonical code is complete"),
                        }
                    }
                    step.next = node as u8;
                }
                row
            })
            .collect();
        Table { steps, may_end }
    })
}

/// A Huffman string that does not decode: EOS inside, or padding that is not a prefix
/// of EOS of at most seven bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// Decodes `coded`, handing each byte to `out`; returns the decoded length.
pub fn decode(coded: &[u8], mut out: impl FnMut(u8)) -> Result<usize, Invalid> {
    let t = table();
    let mut node = 0usize;
    let mut n = 0;
    for &byte in coded {
        for nibble in [byte >> 4, byte & 0xf] {
            let step = t.steps[node][nibble as usize];
            if step.eos {
                return Err(Invalid);
            }
            if let Some(s) = step.symbol {
                out(s);
                n += 1;
            }
            node = step.next as usize;
        }
    }
    if t.may_end[node] { Ok(n) } else { Err(Invalid) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_examples_decode() {
        // RFC 7541, C.4.1 to C.4.3 and C.6.1.
        let cases: [(&[u8], &str); 4] = [
            (&[0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff], "www.example.com"),
            (&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], "no-cache"),
            (&[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf], "custom-value"),
            (&[0x64, 0x02], "302"),
        ];
        for (coded, want) in cases {
            let mut got = Vec::new();
            assert_eq!(decode(coded, |b| got.push(b)), Ok(want.len()));
            assert_eq!(String::from_utf8(got).unwrap(), want);
        }
    }

    #[test]
    fn eos_and_bad_padding_are_refused() {
        // 30 ones: EOS itself.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xfc], |_| {}), Err(Invalid));
        // "0" (00000) padded with zeros instead of ones.
        assert_eq!(decode(&[0x00], |_| {}), Err(Invalid));
        // A whole byte of ones as padding: more than seven bits.
        assert_eq!(decode(&[0x07, 0xff], |_| {}), Err(Invalid));
        assert_eq!(decode(&[0x07], |_| {}), Ok(1), "'0' then three 1 bits of padding");
        assert_eq!(decode(&[], |_| {}), Ok(0));
    }

    #[test]
    fn every_byte_round_trips_through_its_code() {
        let codes = codes();
        for symbol in 0..=255u8 {
            let (code, len) = codes[symbol as usize];
            // The code, padded with ones to a whole number of bytes.
            let bits = len as u32 + (8 - len as u32 % 8) % 8;
            let padded = (u64::from(code) << (bits - len as u32)) | ((1u64 << (bits - len as u32)) - 1);
            let bytes: Vec<u8> = (0..bits / 8).rev().map(|i| (padded >> (8 * i)) as u8).collect();
            let mut got = Vec::new();
            assert_eq!(decode(&bytes, |b| got.push(b)), Ok(1), "symbol {symbol}");
            assert_eq!(got, [symbol]);
        }
    }
}
