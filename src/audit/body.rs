//! A batch's body as sent (raw or gzip) into the JSON to decode, within a
//! size limit that holds after decompression too: a small gzip body may
//! inflate a thousandfold. Read piece by piece as it arrives ([`Collector`]):
//! a gzip body is inflated as it comes, never held compressed and whole.
//! Self-contained (flate2 and thiserror only) so
//! the fuzzer reaches it beside the decoder.

use std::borrow::Cow;

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
    let mut body = Collector::new(true, max, 0);
    body.push(raw)?;
    body.finish().map(Cow::Owned)
}

/// Reads a body as it arrives, piece by piece: kept as it is, or inflated
/// as it comes when gzip (so the compressed bytes are never held whole).
/// What it keeps never exceeds the limit; a piece that would take it past
/// the limit is refused at once, mid-inflation for a bomb.
pub struct Collector {
    gzip: Option<flate2::write::GzDecoder<Limited>>,
    plain: Limited,
    /// The gzip stream ended (later bytes are ignored, as a reader stops
    /// after the first member).
    ended: bool,
}

/// A buffer that refuses to grow past `max`.
struct Limited {
    buf: Vec<u8>,
    max: usize,
    over: bool,
}

impl std::io::Write for Limited {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.over = true;
            return Err(std::io::Error::other("over the limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Collector {
    /// A body of at most `max` bytes (inflated, when `gzip`); `expected`
    /// bytes (its `Content-Length`, when it is not compressed) are set
    /// aside at once, so the buffer never grows by copying.
    pub fn new(gzip: bool, max: usize, expected: usize) -> Collector {
        let limited =
            |capacity: usize| Limited { buf: Vec::with_capacity(capacity.min(max)), max, over: false };
        if gzip {
            // Room for the whole limit at once (address space only: pages
            // are touched as the body inflates). Grown by doubling instead,
            // each batch would leave freed buffers of every size in the
            // allocator's per-thread arenas, which keep them; one
            // allocation of the limit's size is mapped and unmapped whole.
            Collector {
                gzip: Some(flate2::write::GzDecoder::new(limited(max))),
                plain: limited(0),
                ended: false,
            }
        } else {
            Collector { gzip: None, plain: limited(expected), ended: false }
        }
    }

    /// Takes the next piece of the body.
    pub fn push(&mut self, mut piece: &[u8]) -> Result<(), BodyError> {
        use std::io::Write as _;
        let Some(decoder) = self.gzip.as_mut() else {
            return self
                .plain
                .write(piece)
                .map(drop)
                .map_err(|_| BodyError::TooLarge { max: self.plain.max });
        };
        while !piece.is_empty() && !self.ended {
            match decoder.write(piece) {
                Ok(0) => self.ended = true,
                Ok(n) => piece = &piece[n..],
                Err(_) if decoder.get_ref().over => {
                    return Err(BodyError::TooLarge { max: decoder.get_ref().max });
                }
                Err(_) => return Err(BodyError::CorruptGzip),
            }
        }
        Ok(())
    }

    /// The whole body, once its last piece was pushed.
    pub fn finish(self) -> Result<Vec<u8>, BodyError> {
        let Some(mut decoder) = self.gzip else { return Ok(self.plain.buf) };
        if decoder.try_finish().is_err() {
            let limited = decoder.get_ref();
            return Err(if limited.over {
                BodyError::TooLarge { max: limited.max }
            } else {
                BodyError::CorruptGzip
            });
        }
        decoder.finish().map(|limited| limited.buf).map_err(|_| BodyError::CorruptGzip)
    }
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

    #[test]
    fn a_body_read_piece_by_piece_is_the_same_and_a_bomb_stops_at_the_limit() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let packed = gzip(&data);
        for size in [1, 7, 4096, packed.len()] {
            let mut body = Collector::new(true, data.len(), 0);
            for piece in packed.chunks(size) {
                body.push(piece).unwrap();
            }
            assert_eq!(body.finish().unwrap(), data, "pieces of {size}");
        }
        // A bomb is refused while it inflates, not after.
        let bomb = gzip(&vec![b' '; 4 << 20]);
        let mut body = Collector::new(true, 1 << 20, 0);
        let refused = bomb.chunks(64).map(|p| body.push(p)).find(Result::is_err);
        assert_eq!(refused, Some(Err(BodyError::TooLarge { max: 1 << 20 })));
        // Plain: within the limit, as sent; past it, refused.
        let mut body = Collector::new(false, 10, 10);
        body.push(b"{}").unwrap();
        body.push(b"   ").unwrap();
        assert_eq!(body.finish().unwrap(), b"{}   ");
        let mut body = Collector::new(false, 4, 0);
        assert_eq!(body.push(b"{ }  "), Err(BodyError::TooLarge { max: 4 }));
        // A truncated gzip body is corrupt, found when it ends.
        let mut body = Collector::new(true, data.len(), 0);
        body.push(&packed[..packed.len() - 3]).unwrap();
        assert_eq!(body.finish(), Err(BodyError::CorruptGzip));
    }
}
