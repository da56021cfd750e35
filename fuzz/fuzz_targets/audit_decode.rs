//! Fuzzes what strangers send to the audit webhook: any bytes must decode to
//! events or to an error, never panic, and decoded events must answer every
//! question dormant asks of them.
#![no_main]

#[path = "../../src/audit/decode.rs"]
mod decode;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(events) = decode::decode(data) {
        for e in &events {
            let _ = e.counts();
            let _ = e.long_running();
            let _ = e.namespace();
            let _ = e.effective_user().groups.len();
        }
    }
});
