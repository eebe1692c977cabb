//! Property-based fuzzing on stable Rust (proptest), run by plain `cargo test`:
//!
//! - [`relay`]: the STUN/TURN core on arbitrary and mutated bytes, unauthenticated and
//!   authenticated (the harness signs mutated requests with valid MESSAGE-INTEGRITY so
//!   they reach past authentication), ChannelData, and the TCP/TLS stream framer;
//! - [`signaling`]: the client message parser and the per-frame path it feeds (rate
//!   limiter, heartbeat);
//! - [`rooms`]: random operation sequences on the rooms core, checked against its
//!   invariants after every step.
//!
//! Seeds come from `tests/fuzz/corpus/` (committed) and from the client-side request
//! builder. Each property runs [`cases`] cases: 256 by default (the whole crate stays
//! well under a minute); set `MESHMEET_FUZZ_CASES=100000` to run longer locally.
//! A failing case is shrunk and printed, and its seed is saved under
//! `tests/proptest-regressions/` (commit it: it is replayed first from then on).

mod relay;
mod rooms;
mod signaling;

use proptest::test_runner::Config;

/// Cases per property: `MESHMEET_FUZZ_CASES`, else 256.
pub fn cases() -> u32 {
    std::env::var("MESHMEET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

pub fn config() -> Config {
    Config::with_cases(cases())
}

/// Every file of `tests/fuzz/corpus/<dir>`, as bytes (`.hex` files decoded).
pub fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let out: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).expect("corpus file");
            if f.extension().is_some_and(|e| e == "hex") {
                let text: String = String::from_utf8(bytes)
                    .expect("hex text")
                    .split_whitespace()
                    .collect();
                hex::decode(text).expect("hex")
            } else {
                bytes
            }
        })
        .collect();
    assert!(!out.is_empty(), "empty corpus {}", path.display());
    out
}

/// Byte-level mutations of a seed: flips, overwrites, inserts, deletes, truncation.
pub fn mutate(seed: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(kind, pos, val) in edits {
        let at = if b.is_empty() { 0 } else { pos % (b.len() + 1) };
        match kind % 5 {
            0 if at < b.len() => b[at] ^= val.max(1),
            1 if at < b.len() => b[at] = val,
            2 => b.insert(at, val),
            3 if at < b.len() => {
                b.remove(at);
            }
            4 => b.truncate(at),
            _ => {}
        }
    }
    b
}
