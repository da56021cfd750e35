//! A batch's body as sent (raw or gzip) into the JSON to decode, within a
//! size limit that holds after decompression too: a small gzip body may
//! inflate a thousandfold. Self-contained (flate2 and thiserror only) so
//! the fuzzer reaches it beside the decoder.

use std::borrow::Cow;
use std::io::Read;

/// Why a body cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the batch is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("the gzip body is corrupt")]
    CorruptGzip,
}

impl BodyError {
    /// Short, stable category (metric label).
    pub fn outcome(&self) -> &'static str {
        match self {
            BodyError::TooLarge { .. } => "too-large",
            BodyError::CorruptGzip => "malformed",
        }
    }
}

/// `raw` itself, or inflated when `gzip`; never more than `max` bytes.
/// Inflating stops one byte past the limit: a bomb costs at most `max`.
pub fn inflate(raw: &[u8], gzip: bool, max: usize) -> Result<Cow<'_, [u8]>, BodyError> {
    if !gzip {
        return if raw.len() > max { Err(BodyError::TooLarge { max }) } else { Ok(Cow::Borrowed(raw)) };
    }
    let mut out = Vec::new();
    let mut dec = flate2::read::GzDecoder::new(raw).take(max as u64 + 1);
    dec.read_to_end(&mut out).map_err(|_| BodyError::CorruptGzip)?;
    if out.len() > max {
        return Err(BodyError::TooLarge { max });
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_body_is_read_within_its_limit_before_and_after_inflating() {
        assert_eq!(inflate(b"{}", false, 2).unwrap().as_ref(), b"{}");
        assert_eq!(inflate(b"{ }", false, 2), Err(BodyError::TooLarge { max: 2 }));
        let bomb = gzip(&vec![b' '; 1 << 20]);
        assert!(bomb.len() < 2048, "{}", bomb.len());
        assert_eq!(inflate(&bomb, true, 1 << 20).unwrap().len(), 1 << 20);
        assert_eq!(inflate(&bomb, true, (1 << 20) - 1), Err(BodyError::TooLarge { max: (1 << 20) - 1 }));
        assert_eq!(inflate(b"not gzip", true, 100), Err(BodyError::CorruptGzip));
        assert_eq!(inflate(&bomb[..bomb.len() / 2], true, 1 << 20), Err(BodyError::CorruptGzip));
    }
}
