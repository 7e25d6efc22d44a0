//! Finds the gRPC length prefixes in a request body as it streams, so an oversized
//! message is refused without decoding anything. Pure.

/// A gRPC message is a 5-byte prefix (compressed flag, big-endian u32 length) and the
/// bytes that follow.
#[derive(Debug, Clone)]
pub struct FrameScan {
    limit: u32,
    /// Prefix bytes seen of the current frame (0..5).
    prefix: [u8; 5],
    prefix_len: usize,
    /// Message bytes still to come in the current frame.
    remaining: u64,
}

/// A message whose declared length is over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request message of {len} bytes exceeds the limit of {limit} bytes")]
pub struct TooLarge {
    pub len: u32,
    pub limit: u32,
}

impl FrameScan {
    pub fn new(limit: u32) -> Self {
        FrameScan { limit, prefix: [0; 5], prefix_len: 0, remaining: 0 }
    }

    /// Feeds the next body chunk.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), TooLarge> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(chunk.len() as u64)) as usize;
                self.remaining -= n as u64;
                chunk = &chunk[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&chunk[..n]);
            self.prefix_len += n;
            chunk = &chunk[n..];
            if self.prefix_len == 5 {
                let len = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                if len > self.limit {
                    return Err(TooLarge { len, limit: self.limit });
                }
                self.prefix_len = 0;
                self.remaining = len.into();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&len.to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len as usize));
        f
    }

    #[test]
    fn accepts_messages_up_to_the_limit_across_any_chunking() {
        let body: Vec<u8> = [frame(10), frame(0), frame(16), frame(3)].concat();
        for chunk in 1..body.len() {
            let mut scan = FrameScan::new(16);
            for c in body.chunks(chunk) {
                assert_eq!(scan.feed(c), Ok(()), "chunk size {chunk}");
            }
        }
    }

    #[test]
    fn refuses_a_message_over_the_limit_from_its_prefix_alone() {
        let mut scan = FrameScan::new(16);
        scan.feed(&frame(4)).unwrap();
        assert_eq!(scan.feed(&[0, 0, 0]), Ok(()));
        assert_eq!(scan.feed(&[0, 17]), Err(TooLarge { len: 17, limit: 16 }));
    }
}
