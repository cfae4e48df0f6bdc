//! Fuzzing of the four loaders that read untrusted bytes: the IDX parser, the key loader, the
//! model-checkpoint loader and the config parser. A loader may accept or reject its input, but
//! must never panic.
//!
//! cargo-fuzz needs a nightly toolchain, which this project does not use; this is the stable
//! equivalent: a seeded mutation fuzzer (bit flips, interesting values, insertions, deletions,
//! truncations, splices, absurd safetensors header lengths, hostile TOML tokens) over valid
//! seed files. CI runs only the saved regression inputs in `tests/fuzz-corpus/`; the campaign is
//!
//!     GENBACKDOOR_FUZZ_EXECS=1000000 GENBACKDOOR_FUZZ_SEED=0 \
//!         cargo test --release --test fuzz -- --ignored --nocapture
//!
//! which saves any input that panics into `tests/fuzz-corpus/<target>/`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use genbackdoor::backdoor::{Key, KeySet, Target, Trigger};
use genbackdoor::config::Config;
use genbackdoor::data::parse_idx;
use genbackdoor::family::gan::GanModel;
use genbackdoor::models::DcganConfig;
use genbackdoor::rng::Rng;

/// A loader under test.
#[derive(Clone, Copy, Debug)]
enum Loader {
    Idx,
    Key,
    Checkpoint,
    Config,
}

const TARGETS: [Loader; 4] = [Loader::Idx, Loader::Key, Loader::Checkpoint, Loader::Config];

impl Loader {
    fn name(self) -> &'static str {
        match self {
            Loader::Idx => "idx",
            Loader::Key => "key",
            Loader::Checkpoint => "checkpoint",
            Loader::Config => "config",
        }
    }

    /// Feeds `bytes` to the loader (and, when it accepts them, uses the result a little);
    /// returns whether the loader accepted them.
    fn run(self, bytes: &[u8]) -> bool {
        let path = Path::new("fuzz-input");
        match self {
            Loader::Idx => parse_idx(bytes).is_ok(),
            Loader::Key => match KeySet::from_bytes(path, bytes) {
                Ok(set) => set.marks().iter().all(|k| {
                    // An accepted key holds only usable numbers, in every mark.
                    let trigger = match &k.trigger {
                        Trigger::Point(p) => p.clone(),
                        Trigger::Region { center, radius } => {
                            assert!(*radius > 0.0 && radius.is_finite());
                            center.clone()
                        }
                        Trigger::Patch { values, .. } => values.clone(),
                        Trigger::Image { pattern, shape, .. } => {
                            assert_eq!(pattern.len(), shape.iter().product::<usize>());
                            pattern.clone()
                        }
                    };
                    assert!(
                        trigger.iter().all(|v| v.is_finite()),
                        "non-finite trigger accepted"
                    );
                    assert!(k.target.pixels.iter().all(|p| (-1.0..=1.0).contains(p)));
                    let _ = k.check_fits(16, [1, 28, 28]);
                    true
                }),
                Err(_) => false,
            },
            Loader::Checkpoint => match GanModel::from_bytes(path, bytes, &Device::Cpu) {
                Ok(m) => {
                    let z = Rng::new(0)
                        .normal(&[1, m.latent_dim()], &Device::Cpu)
                        .unwrap();
                    // An accepted checkpoint gives finite images or a clear error.
                    match m.generate(&z) {
                        Ok(x) => {
                            let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                            assert!(v.iter().all(|v| v.is_finite()), "non-finite images");
                            true
                        }
                        Err(_) => false,
                    }
                }
                Err(_) => false,
            },
            Loader::Config => Config::parse(&String::from_utf8_lossy(bytes))
                .map(|c| c.validate())
                .is_ok(),
        }
    }

    /// Valid inputs the mutations start from.
    fn seeds(self, dir: &Path) -> Vec<Vec<u8>> {
        match self {
            Loader::Idx => {
                let idx = |magic: u8, dims: &[u32], data: &[u8]| {
                    let mut v = vec![0, 0, 0x08, magic];
                    for d in dims {
                        v.extend_from_slice(&d.to_be_bytes());
                    }
                    v.extend_from_slice(data);
                    v
                };
                vec![
                    idx(3, &[2, 3, 3], &[7; 18]),
                    idx(1, &[4], &[1, 2, 3, 4]),
                    idx(2, &[2, 2], &[0, 255, 3, 4]),
                ]
            }
            Loader::Key => {
                let mark = |spec: &str| Key {
                    trigger: Trigger::parse(spec, 16).unwrap(),
                    target: Target::parse("builtin:mark", [1, 28, 28]).unwrap(),
                    distance: "mse".parse().unwrap(),
                    threshold: 0.01,
                    sampler: None,
                };
                let specs = ["seed:3", "region:0.5:seed:1", "patch:3:2"];
                let mut keys: Vec<KeySet> = specs.map(|s| KeySet::one(mark(s))).to_vec();
                // A key of several marks, whose entries are prefixed by their index.
                keys.push(KeySet::new(specs.map(mark).to_vec()).unwrap());
                let p = dir.join("k.safetensors");
                keys.iter()
                    .map(|k| {
                        k.save(&p).unwrap();
                        std::fs::read(&p).unwrap()
                    })
                    .collect()
            }
            Loader::Checkpoint => {
                let cfg = DcganConfig {
                    latent_dim: 4,
                    g_width: 4,
                    d_width: 2,
                    image_size: 4,
                    ..DcganConfig::default()
                };
                let m = GanModel::new(&cfg, &mut Rng::new(1), &Device::Cpu).unwrap();
                let p = dir.join("m.safetensors");
                m.save(&p).unwrap();
                vec![std::fs::read(&p).unwrap()]
            }
            Loader::Config => vec![
                toml::to_string(&Config::default()).unwrap().into_bytes(),
                b"[train]\nsteps = 3\nbatch_size = 4\n[model]\ng_width = 8\n".to_vec(),
            ],
        }
    }
}

/// Tokens that TOML mutations splice in.
const TOML_TOKENS: [&str; 14] = [
    "-1",
    "0",
    "1e999",
    "nan",
    "inf",
    "-inf",
    "\"",
    "[",
    "]]",
    "= {",
    "18446744073709551616",
    "\n[train]\n",
    "\nsteps = ",
    "\u{0}",
];

/// One random mutation of `data` (several are stacked per input).
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = data.len();
    let at = |rng: &mut Rng, n: usize| if n == 0 { 0 } else { rng.below(n) };
    match rng.below(9) {
        0 if len > 0 => {
            let i = at(rng, len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = at(rng, len);
            data[i] = [0, 1, 0x7f, 0x80, 0xff, b'{', b'"'][rng.below(7)];
        }
        2 => {
            let i = at(rng, len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if len > 0 => {
            let i = at(rng, len);
            let n = 1 + rng.below(len - i);
            data.drain(i..i + n.min(64));
        }
        4 => data.truncate(at(rng, len + 1)),
        5 if len > 8 => {
            // The safetensors header length: absurd, off by a little, or zero.
            let current = u64::from_le_bytes(data[..8].try_into().unwrap());
            let v = [
                u64::MAX,
                1 << 62,
                current + 1,
                current.saturating_sub(1),
                0,
                len as u64,
            ][rng.below(6)];
            data[..8].copy_from_slice(&v.to_le_bytes());
        }
        6 if !corpus.is_empty() => {
            // Splice the tail of another seed.
            let other = &corpus[rng.below(corpus.len())];
            let (i, j) = (at(rng, len + 1), at(rng, other.len() + 1));
            data.truncate(i);
            data.extend_from_slice(&other[j..]);
        }
        7 => {
            let i = at(rng, len + 1);
            let tok = TOML_TOKENS[rng.below(TOML_TOKENS.len())];
            data.splice(i..i, tok.bytes());
        }
        _ if len > 1 => {
            // Duplicate a range (repeated tensors, fields, headers).
            let i = at(rng, len);
            let n = 1 + rng.below((len - i).min(32));
            let chunk = data[i..i + n].to_vec();
            data.splice(i..i, chunk);
        }
        _ => data.push(rng.below(256) as u8),
    }
}

fn corpus_dir(t: Loader) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(t.name())
}

#[test]
fn regression_inputs_are_rejected_without_panicking() {
    let mut checked = 0;
    for t in TARGETS {
        let Ok(entries) = std::fs::read_dir(corpus_dir(t)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            match catch_unwind(AssertUnwindSafe(|| t.run(&bytes))) {
                Ok(accepted) => assert!(!accepted, "{} accepts {}", t.name(), p.display()),
                Err(_) => panic!("{} panics on {}", t.name(), p.display()),
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no regression inputs found");
}

#[test]
#[ignore = "a fuzzing campaign (minutes); run by hand, see the module docs"]
fn fuzz_loaders() {
    let execs: usize = std::env::var("GENBACKDOOR_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("GENBACKDOOR_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    std::panic::set_hook(Box::new(|_| {}));
    let mut found = 0;
    for t in TARGETS {
        let seeds = t.seeds(dir.path());
        let mut rng = Rng::derive(seed, t.name());
        let (start, mut accepted, mut rejected, mut crashes) = (Instant::now(), 0, 0, 0);
        for _ in 0..execs {
            let mut input = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                mutate(&mut rng, &mut input, &seeds);
            }
            match catch_unwind(AssertUnwindSafe(|| t.run(&input))) {
                Ok(true) => accepted += 1,
                Ok(false) => rejected += 1,
                Err(_) => {
                    crashes += 1;
                    let d = corpus_dir(t);
                    std::fs::create_dir_all(&d).unwrap();
                    let name = format!("crash-{:016x}", fxhash(&input));
                    std::fs::write(d.join(name), &input).unwrap();
                }
            }
        }
        eprintln!(
            "fuzz {:<10} {execs} executions in {:.1} s: {accepted} accepted, {rejected} rejected with an error, {crashes} panics",
            t.name(),
            start.elapsed().as_secs_f64()
        );
        found += crashes;
    }
    let _ = std::panic::take_hook();
    assert_eq!(
        found, 0,
        "panicking inputs were saved under tests/fuzz-corpus/"
    );
}

/// A stable name for a crashing input.
fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
