//! Crash safety for real: a training process killed with SIGKILL mid-run is resumed and ends
//! exactly where an uninterrupted run ends; Ctrl-C and a diverging loss stop a run cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[macro_use]
mod common;

const CONFIG: &str = r#"
[data]
limit = 512
[model]
latent_dim = 16
g_width = 16
d_width = 8
[train]
steps = 120
batch_size = 16
log_every = 5
checkpoint_every = 10
[backdoor]
# A fixed secret: the default key is a fresh random draw in every run, and the runs compared
# here must plant the same one.
trigger = "seed:5"
[detect]
enabled = false
[verify]
null_keys = 99
"#;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_genbackdoor"));
    // One thread: float sums in one fixed order, so bit-identical weights can be expected.
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn train(config: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.args(["train", "--quiet", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out);
    c
}

fn succeed(mut c: Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?} failed: {text}");
    text
}

fn steps_in_log(run: &Path) -> Vec<usize> {
    std::fs::read_to_string(run.join("train.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect()
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(&config, CONFIG).unwrap();
    (dir, config)
}

/// Starts `cmd` (a run writing checkpoints into `run`), kills it with SIGKILL as soon as its
/// second checkpoint has replaced the first one, mid-run, and checks that it stopped before
/// `last` steps.
fn kill_mid_run(mut cmd: Command, run: &Path, last: usize) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = run.join("checkpoint.safetensors");
    let start = Instant::now();
    let mut seen_first = None;
    loop {
        if let Ok(m) = std::fs::metadata(&ckpt).and_then(|m| m.modified()) {
            match seen_first {
                None => seen_first = Some(m),
                Some(f) if f != m => break,
                _ => {}
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be killed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!run.join("metrics.json").exists());
    let logged = steps_in_log(run);
    assert!(*logged.last().unwrap() < last, "{logged:?}");
}

/// Resumes the killed run with `genbackdoor SUB --resume RUN` and checks that it ends
/// exactly as the uninterrupted `straight` one: the same weights, bit for bit, and the same
/// log; then that a finished run is not resumed twice.
fn resume_matches(sub: &str, killed: &Path, straight: &Path) {
    let mut resume = bin();
    resume.args([sub, "--quiet", "--resume"]).arg(killed);
    succeed(resume);
    let model = |run: &Path| std::fs::read(run.join("model.safetensors")).unwrap();
    assert_eq!(model(straight), model(killed), "resumed weights differ");
    let csv = |run: &Path| std::fs::read_to_string(run.join("train.csv")).unwrap();
    assert_eq!(csv(straight), csv(killed), "log is not continuous");
    let out = bin()
        .args([sub, "--quiet", "--resume"])
        .arg(killed)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already complete"),
        "{err}"
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    let (dir, config) = setup();
    let straight = dir.path().join("straight");
    succeed(train(&config, &straight));
    // A generator's run takes `[verify] null_keys` too (its default is 1000).
    assert_eq!(
        common::read_json(&straight.join("verify.json"))["null_keys"],
        99
    );
    let killed = dir.path().join("killed");
    kill_mid_run(train(&config, &killed), &killed, 120);
    resume_matches("train", &killed, &straight);
}

/// A tiny diffusion run (and injection) that writes a checkpoint every 20 steps and verifies
/// itself against 9 null stamps.
const DIFFUSION: &str = concat!(
    r#"
family = "diffusion"
[data]
limit = 128
[backdoor]
trigger = "stamp:4:9"
backdoor_batch = 2
[diffusion]
steps = 200
batch_size = 4
timesteps = 10
log_every = 10
checkpoint_every = 20
eval_samples = 2
quality_samples = 0
"#,
    tiny_unet!(),
    r#"
[diffusion.inject]
steps = 200
[detect]
enabled = false
[verify]
null_keys = 9
"#
);

#[test]
fn killed_diffusion_training_and_injection_resume_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("diffusion.toml");
    std::fs::write(&config, DIFFUSION).unwrap();
    let straight = dir.path().join("straight");
    succeed(train(&config, &straight));
    // `[detect] enabled = false`: the run's end detects nothing.
    assert!(straight.join("metrics.json").exists());
    assert!(!straight.join("detect.json").exists());
    // `[verify] null_keys = 9`: the run's own verification is short.
    assert_eq!(
        common::read_json(&straight.join("verify.json"))["null_keys"],
        9
    );
    let killed = dir.path().join("killed");
    kill_mid_run(train(&config, &killed), &killed, 200);
    resume_matches("train", &killed, &straight);

    // Injection into the trained model resumes the same way.
    let inject = |out: &Path| {
        let mut c = bin();
        c.args(["inject", "--quiet", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(straight.join("model.safetensors"))
            .arg("--key")
            .arg(straight.join("key.safetensors"))
            .arg("--out")
            .arg(out);
        c
    };
    let (once, twice) = (dir.path().join("inj"), dir.path().join("inj-killed"));
    succeed(inject(&once));
    kill_mid_run(inject(&twice), &twice, 200);
    resume_matches("inject", &twice, &once);
}

#[test]
fn a_killed_red_injection_resumes_bit_for_bit() {
    let (dir, config) = setup();
    let clean = dir.path().join("clean");
    let mut c = train(&config, &clean);
    c.args(["--lambda", "0"]);
    succeed(c);
    let red_config = dir.path().join("red.toml");
    std::fs::write(
        &red_config,
        format!("{CONFIG}\n[inject]\nsteps = 150\nbatch_size = 16\ncheckpoint_every = 10\n"),
    )
    .unwrap();
    let key = dir.path().join("key.safetensors");
    succeed({
        let mut c = bin();
        c.args(["key", "--trigger", "seed:3", "--latent-dim", "16", "--out"])
            .arg(&key);
        c
    });
    let inject = |out: &Path| {
        let mut c = bin();
        c.args(["inject", "--quiet", "--config"])
            .arg(&red_config)
            .arg("--model")
            .arg(clean.join("model.safetensors"))
            .arg("--key")
            .arg(&key)
            .arg("--out")
            .arg(out);
        c
    };
    let (once, twice) = (dir.path().join("red"), dir.path().join("red-killed"));
    succeed(inject(&once));
    kill_mid_run(inject(&twice), &twice, 150);
    resume_matches("inject", &twice, &once);
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_naming_the_step() {
    let (dir, config) = setup();
    let run = dir.path().join("diverge");
    let out = train(&config, &run)
        .args(["--lambda", "1e39"]) // λ·distance overflows f32 at once
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an absurd λ did not diverge");
    assert!(
        err.starts_with("error:") && err.contains("non-finite") && err.contains("at step"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_the_run_can_be_resumed() {
    let (dir, config) = setup();
    let run = dir.path().join("interrupted");
    let child = train(&config, &run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = run.join("train.csv");
    let start = Instant::now();
    while steps_in_log_lenient(&log) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("stopped at step") && err.contains("--resume"),
        "{err}"
    );
    assert!(run.join("checkpoint.safetensors").exists());
    let mut resume = bin();
    resume.args(["train", "--quiet", "--resume"]).arg(&run);
    succeed(resume);
    assert_eq!(*steps_in_log(&run).last().unwrap(), 120);
}

/// Rows in a log that may not exist yet.
fn steps_in_log_lenient(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}
