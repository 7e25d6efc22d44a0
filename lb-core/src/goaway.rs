//! Noticing an HTTP/2 GOAWAY the moment it arrives, from the bytes a server sends,
//! without decoding anything else. A client's HTTP/2 stack may learn of a graceful
//! GOAWAY only when it next opens a stream, and closes the connection only once every
//! stream on it has ended; a long-lived stream (a health watch) would keep a draining
//! replica in rotation, and its drain waiting, until it ends. Pure.
//!
//! A server's bytes are HTTP/2 frames from the first byte on (its preface is a SETTINGS
//! frame): a 9-byte header (24-bit length, type, flags, stream id) and the payload.

/// The frame type of GOAWAY (RFC 9113 §6.8).
const GOAWAY: u8 = 0x7;

/// Follows frame headers across reads; [`GoAwayScan::feed`] reports the first GOAWAY.
#[derive(Debug, Default, Clone)]
pub struct GoAwayScan {
    /// The current frame's header, as far as it has arrived.
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    skip: u32,
    /// In a GOAWAY: its last-stream-id and error code, as far as they have arrived.
    goaway: Option<([u8; 8], usize)>,
}

/// A GOAWAY's error code (RFC 9113 §7): 0 is NO_ERROR, a graceful drain; 0xb is
/// ENHANCE_YOUR_CALM, which gRPC servers send with "too_many_pings".
pub type ErrorCode = u32;

pub const NO_ERROR: ErrorCode = 0x0;
pub const ENHANCE_YOUR_CALM: ErrorCode = 0xb;

impl GoAwayScan {
    /// Feeds bytes read from the server; returns a GOAWAY's error code once its first
    /// eight payload bytes are in (the first GOAWAY's, if these bytes end several).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<ErrorCode> {
        let mut found = None;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = (self.skip as usize).min(bytes.len());
                if let Some((code, got)) = &mut self.goaway {
                    let take = n.min(8 - *got);
                    code[*got..*got + take].copy_from_slice(&bytes[..take]);
                    *got += take;
                    if *got == 8 {
                        let code = u32::from_be_bytes([code[4], code[5], code[6], code[7]]);
                        found = found.or(Some(code));
                        self.goaway = None;
                    }
                }
                self.skip -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                let h = self.header;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                if h[3] == GOAWAY {
                    if self.skip < 8 {
                        found = found.or(Some(NO_ERROR)); // malformed: the stack will say so
                    } else {
                        self.goaway = Some(([0; 8], 0));
                    }
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    fn goaway(code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(debug);
        frame(GOAWAY, &p)
    }

    #[test]
    fn finds_the_goaway_after_other_frames_however_the_bytes_are_split() {
        let data = vec![0x07; 300]; // a DATA frame whose payload holds GOAWAY's type byte
        let bytes = [
            frame(0x4, &[0, 3, 0, 0, 0, 100]),
            frame(0x0, &data),
            frame(0x1, &[0x88]),
            goaway(ENHANCE_YOUR_CALM, b"too_many_pings"),
            frame(0x6, &[0; 8]),
        ]
        .concat();
        for chunk in 1..=bytes.len() {
            let mut scan = GoAwayScan::default();
            let found: Vec<_> = bytes.chunks(chunk).filter_map(|c| scan.feed(c)).collect();
            assert_eq!(found, [ENHANCE_YOUR_CALM], "chunks of {chunk}");
            assert_eq!(scan.feed(&goaway(NO_ERROR, b"again")), Some(NO_ERROR), "still aligned after {chunk}");
        }
    }

    #[test]
    fn a_graceful_goaway_is_no_error_and_other_frames_are_nothing() {
        let mut scan = GoAwayScan::default();
        assert_eq!(scan.feed(&frame(0x4, &[])), None);
        assert_eq!(scan.feed(&frame(0x6, &[1; 8])), None);
        assert_eq!(scan.feed(&goaway(NO_ERROR, b"")), Some(NO_ERROR));
        assert_eq!(scan.feed(&frame(GOAWAY, &[0, 0])), Some(NO_ERROR), "too short: draining anyway");
    }
}
