//! Fuzzes what strangers send to the audit webhook, the way the webhook
//! reads it: the body within its size limit, inflated when gzip says so
//! (a bomb stops at the limit), then decoded. Any bytes must end in events
//! or an error, never a panic, and what comes out must hold:
//! - nothing larger than the limit is ever returned, inflated or not;
//! - a plain body within the limit comes back untouched, and the same
//!   body gzipped inflates back to it (over the limit, gzipped, it is
//!   refused as too large, as a bomb is);
//! - every decoded event carries the fields dormant relies on, a counted
//!   event is at one of the two stages that count, and the namespace it is
//!   attributed to is never empty;
//! - one request counts once: a long-running one only when its response
//!   starts, any other only when it completes (or, failing authentication,
//!   when it starts: audited only then); a 401 is never taken for an
//!   authenticated request.
#![no_main]

#[path = "../../src/audit/body.rs"]
mod body;
#[path = "../../src/audit/decode.rs"]
mod decode;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A body that starts as JSON is sent plain under the default limit (so
    // the seed corpus of batches reaches the decoder as it is). Otherwise
    // the first byte picks plain or gzip, the next two a limit (64 B to
    // 16 MiB, so both sides of it are reached), the rest is the body.
    let (gzip, max, raw) = match data {
        [b'{' | b' ' | b'\n', ..] => (false, 16 << 20, data),
        [mode, a, b, raw @ ..] => (mode & 1 == 1, 64usize << ((u16::from_le_bytes([*a, *b]) % 19) as usize), raw),
        _ => return,
    };
    let batch = match body::inflate(raw, gzip, max) {
        Ok(batch) => batch,
        Err(body::BodyError::TooLarge { max: m }) => {
            assert_eq!(m, max);
            assert!(gzip || raw.len() > max, "a plain body within the limit was refused");
            return;
        }
        Err(body::BodyError::CorruptGzip) => {
            assert!(gzip, "a plain body was read as gzip");
            return;
        }
    };
    assert!(batch.len() <= max, "{} bytes came out of a {max}-byte limit", batch.len());
    if !gzip {
        assert_eq!(&batch[..], raw, "a plain body was changed");
        // The same bytes, gzipped (as kube-apiserver may send them): back
        // exactly, and refused under any smaller limit.
        let mut zipped = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut zipped, raw).unwrap();
        let zipped = zipped.finish().unwrap();
        let back = body::inflate(&zipped, true, max).unwrap_or_else(|e| panic!("{e}: a good gzip body within the limit"));
        assert_eq!(&back[..], raw, "a gzip body inflated to something else");
        if let Some(less) = raw.len().checked_sub(1) {
            assert_eq!(body::inflate(&zipped, true, less).err(), Some(body::BodyError::TooLarge { max: less }));
        }
    }
    let Ok(events) = decode::decode(&batch) else { return };
    for e in &events {
        let counts = e.counts();
        assert!(!counts || matches!(e.stage.as_ref(), "ResponseComplete" | "ResponseStarted"), "{:?}", e.stage);
        if counts && e.long_running() {
            assert_eq!(e.stage, "ResponseStarted", "a long-running request counted when it ended");
        }
        if counts && e.stage == "ResponseStarted" {
            assert!(e.long_running() || e.unauthenticated(), "a short request counted when it started");
        }
        if e.code() == Some(401) {
            assert!(e.unauthenticated(), "a 401 taken for an authenticated request");
        }
        if let Some(ns) = e.namespace() {
            assert!(!ns.is_empty(), "an event attributed to the empty namespace");
        }
        if let Some(as_user) = &e.impersonated_user {
            assert_eq!(e.effective_user().username, as_user.username, "impersonation ignored");
        }
    }
});
