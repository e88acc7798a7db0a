//! The fuzz targets' inputs under plain `cargo test` (issue "Robustness and security").
//!
//! Replays every file in `fuzz/corpus/<target>/` (the seeds) and `fuzz/artifacts/<target>/`
//! (crash reproducers found by `scripts/fuzz`, kept as regression inputs) through the same
//! bodies the fuzz targets run, then a bounded property test: 20,000 pseudo-random inputs per
//! target (a fixed-seed xorshift PRNG: half random bytes, half mutated seeds), none of which
//! may panic.
//!
//! The bodies are not copied here: `fuzz/src/harness.rs` is compiled into this test with
//! `#[path]` (the main crate cannot depend on the fuzz crate, but it can share its source; the
//! harness uses only tidepool, its regular dependencies and std).

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

type Body = fn(&[u8]);

const TARGETS: [(&str, Body); 4] = [
    ("startup_packet", harness::startup_packet),
    ("client_framing", harness::client_framing),
    ("scram_exchange", harness::scram_exchange),
    ("server_messages", harness::server_messages),
];

/// Random inputs per target.
const RANDOM_INPUTS: usize = 20_000;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Files directly in `dir`, sorted (none if it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Run `body` on `input`; on a panic, the panic message.
fn run(body: Body, input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| body(input))).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

fn hex(input: &[u8]) -> String {
    let shown: String = input.iter().take(256).map(|b| format!("{b:02x}")).collect();
    if input.len() > 256 {
        format!("{shown}... ({} bytes)", input.len())
    } else {
        shown
    }
}

#[test]
fn seed_corpora_exist() {
    for (name, _) in TARGETS {
        let seeds = files_in(&fuzz_dir().join("corpus").join(name));
        assert!(
            seeds.len() >= 3,
            "fuzz/corpus/{name}/ should hold seed inputs (fuzz/seeds.py writes them)"
        );
    }
}

#[test]
fn corpus_and_artifacts_replay_without_panic() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, body) in TARGETS {
        for sub in ["corpus", "artifacts"] {
            for file in files_in(&fuzz_dir().join(sub).join(name)) {
                let input = std::fs::read(&file).expect("read corpus file");
                replayed += 1;
                if let Err(msg) = run(body, &input) {
                    failures.push(format!("{}: {msg}", file.display()));
                }
            }
        }
    }
    assert!(replayed > 0, "nothing to replay under fuzz/");
    assert!(
        failures.is_empty(),
        "{} input(s) panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A random mutation of `seed`: byte flips, insertions, deletions, truncation, a length word
/// overwritten, or a splice with random bytes.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(8);
                let extra = rng.bytes(n);
                v.splice(i..i, extra);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(8));
                v.drain(i..i + n);
            }
            4 => v.truncate(rng.below(v.len() + 1)),
            5 if v.len() >= 4 => {
                // A big-endian length word somewhere: small, huge, or off by one.
                let i = rng.below(v.len() - 3);
                let word: u32 = match rng.below(4) {
                    0 => rng.below(8) as u32,
                    1 => u32::MAX - rng.below(4) as u32,
                    2 => 0x8000_0000,
                    _ => u32::from_be_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]).wrapping_add(1),
                };
                v[i..i + 4].copy_from_slice(&word.to_be_bytes());
            }
            _ => {
                let i = rng.below(v.len() + 1);
                v.truncate(i);
                let n = rng.below(64);
                v.extend(rng.bytes(n));
            }
        }
    }
    v
}

#[test]
fn random_inputs_never_panic() {
    let t0 = Instant::now();
    let mut rng = Rng(0x7469_6465_706f_6f6c); // "tidepool"
    for (name, body) in TARGETS {
        let seeds: Vec<Vec<u8>> = files_in(&fuzz_dir().join("corpus").join(name))
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .collect();
        for i in 0..RANDOM_INPUTS {
            let input = if i % 2 == 0 || seeds.is_empty() {
                let n = match rng.below(10) {
                    0 => rng.below(4096),
                    1..=3 => rng.below(8),
                    _ => rng.below(128),
                };
                rng.bytes(n)
            } else {
                let seed = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            };
            if let Err(msg) = run(body, &input) {
                panic!("{name} panicked on input #{i} ({msg}): {}", hex(&input));
            }
        }
    }
    eprintln!(
        "{} random inputs per target in {:?}",
        RANDOM_INPUTS,
        t0.elapsed()
    );
}
