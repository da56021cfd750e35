//! Fuzzes what strangers send to the audit webhook, the way the webhook
//! reads it: the body within its size limit, inflated when gzip says so
//! (a bomb stops at the limit), then decoded. Any bytes must end in events
//! or an error, never a panic, and what comes out must hold:
//! - nothing larger than the limit is ever returned, inflated or not;
//! - a plain body within the limit comes back untouched;
//! - every decoded event carries the fields dormant relies on, a counted
//!   event is at one of the two stages that count, and the namespace it is
//!   attributed to is never empty.
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
    }
    let Ok(events) = decode::decode(&batch) else { return };
    for e in &events {
        let counts = e.counts();
        assert!(!counts || matches!(e.stage.as_ref(), "ResponseComplete" | "ResponseStarted"), "{:?}", e.stage);
        let _ = e.long_running();
        let _ = e.unauthenticated();
        if let Some(ns) = e.namespace() {
            assert!(!ns.is_empty(), "an event attributed to the empty namespace");
        }
        let _ = e.effective_user().groups.len();
    }
});
