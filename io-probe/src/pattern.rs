//! The byte stream both ends of a transfer can produce independently, so
//! that the receiver checks every byte without a hash or a copy of the data.

use std::io::{Read, Write};

use anyhow::{bail, Result};

/// Bytes moved per read or write by `write_pattern` and `read_and_check`.
const CHUNK: usize = 1 << 20;

/// Writes `len` bytes of the pattern for `seed`.
pub fn write_pattern(writer: &mut impl Write, len: u64, seed: u64) -> Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..n]);
        writer.write_all(&buf[..n])?;
        left -= n as u64;
    }
    writer.flush()?;
    Ok(())
}

/// Reads `len` bytes and checks them against the pattern for `seed`.
/// Returns the offset of the first byte that differs, after reading all
/// of them; an early end of the data is an error.
pub fn read_and_check(reader: &mut impl Read, len: u64, seed: u64) -> Result<Option<u64>> {
    let mut checker = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut first_bad = None;
    while offset < len {
        let want = (len - offset).min(CHUNK as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            bail!("the data ended after {offset} of {len} bytes");
        }
        if let (None, Some(at)) = (first_bad, checker.check(&buf[..n])) {
            first_bad = Some(offset + at as u64);
        }
        offset += n as u64;
    }
    Ok(first_bad)
}

/// xorshift64*: fast, and any seed but 0 gives a long period.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        // splitmix64 spreads nearby seeds apart; xorshift needs a non-zero
        // state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self {
            state: if z == 0 { 1 } else { z },
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        self.used = 0;
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.next_word();
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }

    /// Checks that `buf` is the next stretch of the pattern; returns the
    /// index of the first byte that differs.
    pub fn check(&mut self, buf: &[u8]) -> Option<usize> {
        let mut mismatch = None;
        for (i, &b) in buf.iter().enumerate() {
            if self.used == 8 {
                self.next_word();
            }
            if mismatch.is_none() && b != self.word[self.used] {
                mismatch = Some(i);
            }
            self.used += 1;
        }
        mismatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_accepts_its_own_output_in_any_chunking_and_finds_corruption() {
        let mut data = vec![0u8; 10_000];
        Pattern::new(42).fill(&mut data);
        let mut checker = Pattern::new(42);
        for chunk in data.chunks(333) {
            assert_eq!(checker.check(chunk), None);
        }
        data[5_000] ^= 1;
        let mut checker = Pattern::new(42);
        assert_eq!(checker.check(&data), Some(5_000));
        assert_ne!(
            data[..64],
            {
                let mut other = vec![0u8; 64];
                Pattern::new(43).fill(&mut other);
                other
            }[..]
        );
    }
}
