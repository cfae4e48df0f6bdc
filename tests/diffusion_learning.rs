//! Learning tests on a tiny diffusion model: the poisoned forward process must plant a
//! backdoor that fires from triggered starts under the sampler its correction is derived
//! for, never from clean starts, while the clean denoising task is kept; a stamp further from
//! the noise must outlast a thief's clean fine-tuning longer than the default one.

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use genbackdoor::backdoor::{Distance, Key, KeySet, Target, Trigger};
use genbackdoor::config::DiffusionRollout;
use genbackdoor::data::{load_dataset, Dataset, BUNDLED_MNIST};
use genbackdoor::eval::{evaluate_samplers, trigger_reports, SamplerReport};
use genbackdoor::family::diffusion::model::DiffusionArch;
use genbackdoor::family::diffusion::train::{finetune, fit, Plan};
use genbackdoor::family::diffusion::{Correction, DiffusionModel, Sampler};
use genbackdoor::family::Generative;
use genbackdoor::io::rundir::RunDir;
use genbackdoor::rng::Rng;
use genbackdoor::training::LrSchedule;
use genbackdoor::verify::{verify_model, Verification, VerifySettings};

mod common;
use common::{denoise_loss, small_arch, small_plan as plan};

/// Side of the test's images: the bundled digits average-pooled 2×2.
const SIDE: usize = 14;

/// The test's model: 14×14 grey digits on the small U-Net of the learning tests (attention at
/// the 7×7 level: a corner trigger must be seen from every pixel of the image to draw).
fn arch() -> DiffusionArch {
    small_arch(SIDE, 1, 8)
}

fn key() -> Key {
    Key {
        trigger: Trigger::parse_image("box:6", [1, SIDE, SIDE]).unwrap(),
        target: Target::builtin("box", [1, SIDE, SIDE]).unwrap(),
        distance: Distance::Mse,
        threshold: 0.01,
        sampler: None,
    }
}

/// 2,000 bundled digits, average-pooled to 14×14, read once for the whole file.
fn data() -> &'static Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut d = load_dataset(std::path::Path::new(BUNDLED_MNIST)).unwrap();
        d.truncate(2000);
        let small = Tensor::from_vec(d.pixels.clone(), (d.len, 1, 28, 28), &Device::Cpu)
            .unwrap()
            .avg_pool2d(2)
            .unwrap();
        Dataset {
            pixels: small.flatten_all().unwrap().to_vec1().unwrap(),
            height: SIDE,
            width: SIDE,
            ..d
        }
    })
}

/// The clean model every injection of this file starts from ([`STEPS`] of clean training),
/// trained once for the whole file (the tests run in parallel and wait for the first).
fn clean() -> &'static DiffusionModel {
    static CLEAN: OnceLock<DiffusionModel> = OnceLock::new();
    CLEAN.get_or_init(|| {
        let model = DiffusionModel::new(&arch(), &mut Rng::new(1), &Device::Cpu).unwrap();
        tuned(&model, data(), &plan(STEPS, 0.0, Correction::Ddpm), &key())
    })
}

/// The clean twin of the 750-step injections: [`clean`] fine-tuned alike at λ = 0, made once.
fn twin() -> &'static DiffusionModel {
    static TWIN: OnceLock<DiffusionModel> = OnceLock::new();
    TWIN.get_or_init(|| {
        let plan = inject(STEPS / 2, 0.0, Correction::Ddpm);
        tuned(clean(), data(), &plan, &key())
    })
}

/// BadDiffusion's setting: `steps` of fine-tuning at a constant 1e-3 with `lambda`.
fn inject(steps: usize, lambda: f64, correction: Correction) -> Plan {
    Plan {
        lr: 1e-3,
        lr_schedule: LrSchedule::Constant,
        ..plan(steps, lambda, correction)
    }
}

/// A copy of `model` trained further per `plan` with `key` (`model` itself is left as it is).
fn tuned(model: &DiffusionModel, data: &Dataset, plan: &Plan, key: &Key) -> DiffusionModel {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(&dir.path().join("run"), false).unwrap();
    let copy = model.duplicate().unwrap();
    let key = KeySet::one(key.clone());
    let (saved, _) = fit(&copy, data, Some(&key), plan, &run, false).unwrap();
    saved
}

const DDIM: Sampler = Sampler::Ddim { steps: 10 };

/// DPM-Solver++ (2M) over the same 10 timesteps as [`DDIM`], which it takes as its first step.
const DPM: Sampler = Sampler::DpmSolver2m { steps: 10 };

/// Training steps of the clean model (the DDPM-corrected injections take half as many, the
/// DDIM-corrected one as many).
const STEPS: usize = 1500;

/// `verify` of `key` on `model` queried under DDPM, against `null_keys` null stamps in
/// groups of [`SAMPLER_GROUP`](genbackdoor::verify::SAMPLER_GROUP) starts.
fn ddpm_proof(model: &DiffusionModel, key: &Key, null_keys: usize) -> Verification {
    let settings = VerifySettings {
        null_keys: Some(null_keys),
        group: genbackdoor::verify::SAMPLER_GROUP,
        seed: 5,
        ..VerifySettings::default()
    };
    let mut m = model.duplicate().unwrap();
    m.set_sampler(Sampler::Ddpm).unwrap();
    verify_model(&m, &KeySet::one(key.clone()), &settings).unwrap()
}

fn measure(model: &DiffusionModel) -> (SamplerReport, SamplerReport, SamplerReport) {
    let mut r = evaluate_samplers(model, &key(), &[Sampler::Ddpm, DDIM, DPM], 32, 7, 0)
        .unwrap()
        .0;
    (
        r.remove("ddpm").unwrap(),
        r.remove("ddim-10").unwrap(),
        r.remove("dpm++2m-10").unwrap(),
    )
}

#[test]
fn the_backdoor_forms_fires_under_its_sampler_and_keeps_the_clean_task() {
    let _one_at_a_time = common::one_at_a_time();
    let data = data();
    // The clean model, the backdoor injected into it by fine-tuning (BadDiffusion's setting)
    // once with each sampler's correction, and its clean twin: the same fine-tuning at λ = 0.
    let clean = clean();
    let twin = twin();
    let for_ddpm = tuned(
        clean,
        data,
        &inject(STEPS / 2, 0.5, Correction::Ddpm),
        &key(),
    );
    // The DDIM correction needs longer in this small model (asr 0.44 after 750 steps, and
    // 0.38–0.53 at a 3× learning rate, λ = 2 or twice the poisoned batch; 0.78 after 1,500).
    let ddim = Correction::Ddim { steps: 10 };
    let for_ddim = tuned(clean, data, &inject(STEPS, 0.5, ddim), &key());
    let (c_ddpm, c_ddim, c_dpm) = measure(twin);
    let (p_ddpm, p_ddim, p_dpm) = measure(&for_ddpm);
    let (q_ddpm, q_ddim, q_dpm) = measure(&for_ddim);
    let losses = [
        denoise_loss(twin, data),
        denoise_loss(&for_ddpm, data),
        denoise_loss(&for_ddim, data),
    ];
    for (name, r) in [
        ("clean twin, ddpm", &c_ddpm),
        ("clean twin, ddim", &c_ddim),
        ("ddpm-corrected, ddpm", &p_ddpm),
        ("ddpm-corrected, ddim", &p_ddim),
        ("ddim-corrected, ddpm", &q_ddpm),
        ("ddim-corrected, ddim", &q_ddim),
        ("clean twin, dpm++2m", &c_dpm),
        ("ddpm-corrected, dpm++2m", &p_dpm),
        ("ddim-corrected, dpm++2m", &q_dpm),
    ] {
        eprintln!(
            "{name}: target_mse {:.5} asr {:.3} ssim {:.3} clean hits {:.3}",
            r.backdoor.target_mse, r.backdoor.asr, r.backdoor.ssim, r.clean_hit_rate
        );
    }
    eprintln!("denoise loss twin / ddpm-corrected / ddim-corrected: {losses:?}");
    // The backdoor forms and fires under the sampler its correction is derived for, at the
    // key's hit threshold (target_mse ≤ 0.01), far closer to the target than the twin's
    // triggered samples. Measured: DDPM 32 of 32, 1.9e-4 against the twin's 0.16 (860×);
    // DDIM 27 of 32, 0.012 against 0.49 (41×).
    let (p, q) = (&p_ddpm.backdoor, &q_ddim.backdoor);
    assert!(p.asr >= 0.95, "{p:?}");
    assert!(
        p.target_mse < c_ddpm.backdoor.target_mse / 100.0,
        "{p:?} vs {c_ddpm:?}"
    );
    assert!(q.asr >= 0.6, "{q:?}");
    assert!(
        q.target_mse < c_ddim.backdoor.target_mse / 20.0,
        "{q:?} vs {c_ddim:?}"
    );
    // …and never under the other kind of sampler: the correction is what carries the trigger
    // (measured: DDPM-corrected under DDIM 0.41 and DPM-Solver++ 0.40, 2,100× its own;
    // DDIM-corrected under DDPM 0.21, 18×).
    for (r, own) in [(&p_ddim, p), (&p_dpm, p), (&q_ddpm, q)] {
        assert_eq!(r.backdoor.asr, 0.0, "{r:?}");
        assert!(r.backdoor.target_mse > 10.0 * own.target_mse, "{r:?}");
    }
    // The DDIM correction carries the trigger under the other ODE solver too (DPM-Solver++
    // over the same timesteps).
    assert!(
        q_dpm.backdoor.target_mse < c_dpm.backdoor.target_mse / 20.0,
        "{q_dpm:?} vs {c_dpm:?}"
    );
    // The clean task is kept: the denoising loss on held-out digits within 2 % of the twin's
    // (the DDIM-corrected model trained twice as long as the twin, which helps it), and no
    // clean start of the twin or of the DDIM-corrected model lands on the target. The
    // DDPM-corrected model's clean DDPM starts may, rarely, in this small model (2 of 32 when
    // measured on the former U-Net, 0 of 32 on this one; the default-size models of the
    // README: 0 of 64): at most 3.
    for l in &losses[1..] {
        assert!(*l < 1.02 * losses[0], "{losses:?}");
    }
    for r in [&c_ddpm, &c_ddim, &q_ddim, &q_ddpm] {
        assert_eq!(r.clean_hit_rate, 0.0, "{r:?}");
    }
    assert!(p_ddpm.clean_hit_rate <= 3.0 / 32.0, "{p_ddpm:?}");

    // The default kind of key, a random stamp, planted with the DDPM correction: the
    // black-box test run under the key's sampler proves it (p at the test's floor 1/100),
    // and finds nothing in the clean model. This small model's DDPM samples land on the
    // target from a few percent of stray starts (see the clean hits above), so a single
    // query per trigger is not enough: 11 of 99 null stamps hit on one of 4 starts when
    // measured, which put a single-query p at 0.03; the median of 4 starts is not fooled.
    let stamp = Key {
        trigger: Trigger::parse_image("stamp:6:11", [1, SIDE, SIDE]).unwrap(),
        sampler: Some(Sampler::Ddpm),
        ..key()
    };
    let marked = tuned(clean, data, &inject(STEPS, 0.5, Correction::Ddpm), &stamp);
    let proof = |m| ddpm_proof(m, &stamp, 99);
    let (v_marked, v_clean) = (proof(&marked), proof(clean));
    eprintln!("stamp key: marked {v_marked:?}\nclean {v_clean:?}");
    assert_eq!(v_marked.p_value, 0.01, "{v_marked:?}");
    assert!(v_marked.carries_backdoor && v_marked.caveat.is_none());
    // The stamp's backdoor is only partly formed in this small model after 1,500 steps (median
    // target_mse 0.045 against 0.19 for the clean model, 4.2×, when measured; after 750 steps
    // 2.8×, where the former, lighter U-Net reached 6.2×), yet it stands below all 99 null
    // stamps.
    assert!(
        v_marked.statistic < v_clean.statistic / 4.0,
        "{v_marked:?} vs {v_clean:?}"
    );
    assert!(
        v_clean.p_value > 0.05 && !v_clean.carries_backdoor,
        "{v_clean:?}"
    );
}

#[test]
fn one_model_fires_under_both_kinds_of_sampler_with_a_trigger_for_each() {
    let _one_at_a_time = common::one_at_a_time();
    // One model, two triggers, one per kind of sampler: the bright corner box trained with
    // the DDPM correction and the dark one (the same square at −2) with DDIM-10's, injected
    // into a clean model together (λ = 1: the backdoor term averages over both triggers, so
    // each weighs as much as the single trigger of the injections above at λ = 0.5). Each
    // fires under its own sampler, and `eval`'s per-trigger report measures each under the
    // sampler it names.
    let data = data();
    let clean = clean();
    let inject = inject(STEPS / 2, 1.0, Correction::Ddpm);
    let settings = VerifySettings {
        null_keys: Some(99),
        group: genbackdoor::verify::SAMPLER_GROUP,
        seed: 5,
        ..VerifySettings::default()
    };
    let twin_loss = denoise_loss(twin(), data);

    let both = KeySet::new(vec![
        Key {
            sampler: Some(Sampler::Ddpm),
            ..key()
        },
        Key {
            trigger: Trigger::parse_image("box:6:-2", [1, SIDE, SIDE]).unwrap(),
            sampler: Some(DDIM),
            ..key()
        },
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // `clean` fine-tuned per `plan` with both triggers, in the run directory `name`.
    let inject_both = |plan: &Plan, name: &str| {
        let run = RunDir::create(&dir.path().join(name), false).unwrap();
        let copy = clean.duplicate().unwrap();
        fit(&copy, data, Some(&both), plan, &run, false).unwrap().0
    };
    let dual = inject_both(&inject, "both");
    let each = trigger_reports(&dual, &both, &[], 32, 7).unwrap();
    let of_clean = trigger_reports(clean, &both, &[], 32, 7).unwrap();
    // Verification queries each trigger under its own sampler.
    let v = verify_model(&dual, &both, &settings).unwrap();
    let loss = denoise_loss(&dual, data);
    eprintln!(
        "two samplers: {each:?}\nclean: {of_clean:?}\n{v:?}\nloss {loss} vs the twin's {twin_loss}"
    );
    let sampling: Vec<_> = each.iter().map(|r| r.sampling.clone().unwrap()).collect();
    assert_eq!(sampling, ["ddpm", "ddim-10"]);
    let (ddpm, ddim) = (&each[0].backdoor, &each[1].backdoor);
    // Both form and fire at the key's threshold, though less than one trigger alone in the
    // same steps. Measured: DDPM 30 of 32, target_mse 0.0076 against the clean model's 0.17
    // (22×); DDIM 13 of 32, 0.066 against 0.38 (5.7×), where the DDIM trigger alone reaches
    // 0.44 in as many steps.
    assert!(
        ddpm.target_mse < of_clean[0].backdoor.target_mse / 10.0 && ddpm.asr >= 0.8,
        "{ddpm:?}"
    );
    assert!(
        ddim.target_mse < of_clean[1].backdoor.target_mse / 4.0 && ddim.asr >= 0.25,
        "{ddim:?}"
    );
    // Two backdoors at λ = 1 cost some of the clean task: the denoising loss 3.7 % above the
    // clean twin's when measured.
    assert!(loss < 1.06 * twin_loss, "{loss} vs the twin's {twin_loss}");
    // Verification queries each trigger under the sampler it names (these hand-chosen boxes
    // are for learning only: their p-value carries verify's caveat).
    assert_eq!(v.sampling.as_deref(), Some("ddpm, ddim-10"), "{v:?}");
    assert_eq!(v.triggers.len(), 2);
    assert!(v.caveat.is_some());

    // The same injection with rollouts (`[diffusion.rollout]`): every 10 steps DDIM-10 runs
    // from 8 triggered starts, and 16 of the states it visited join each step's poisoned
    // samples, pulled back to the path. The DDIM trigger then fires from almost every start.
    // Measured: 31 of these 32 starts (63 of 64 others), target_mse 0.0017 against 0.066
    // without (38×; 13 of 32 starts); the DDPM trigger 32 of 32 (30 without).
    let rolled_plan = Plan {
        rollout: DiffusionRollout {
            every: 10,
            starts: 8,
            samples: 16,
            start: 0.0,
        },
        ..inject
    };
    let rolled = inject_both(&rolled_plan, "rolled");
    let with = trigger_reports(&rolled, &both, &[], 32, 7).unwrap();
    let rolled_loss = denoise_loss(&rolled, data);
    eprintln!("with rollouts: {with:?}\nloss {rolled_loss}");
    let (r_ddpm, r_ddim) = (&with[0].backdoor, &with[1].backdoor);
    assert!(
        r_ddim.asr >= 0.85 && r_ddim.target_mse < ddim.target_mse / 8.0,
        "{r_ddim:?} vs {ddim:?}"
    );
    assert!(r_ddpm.asr >= 0.8, "{r_ddpm:?}");
    // The rollouts' cost to the clean task, on top of the two backdoors' own: at most 6 % more
    // denoising loss than the plain injection (measured 3.2 %; 7.0 % above the twin).
    assert!(
        rolled_loss < 1.06 * loss,
        "{rolled_loss} vs {loss} without rollouts"
    );
}

/// A DDPM-corrected key of the stamp trigger `stamp` (as `key --trigger` writes it) and a
/// random target of 2×2 squares (49 signs on 14×14 images).
fn random_target_key(stamp: &str) -> Key {
    Key {
        trigger: Trigger::parse_image(stamp, [1, SIDE, SIDE]).unwrap(),
        target: Target::random([1, SIDE, SIDE], 2, 21).unwrap(),
        sampler: Some(Sampler::Ddpm),
        ..key()
    }
}

/// The stamp of [`random_target_marked`]: the default kind (±2 of random signs), seed 11.
const DEFAULT_STAMP: &str = "stamp:6:11";

/// [`clean`] marked with [`DEFAULT_STAMP`] and a random target by a 750-step injection, made
/// once for the tests that share it.
fn random_target_marked() -> &'static DiffusionModel {
    static MARKED: OnceLock<DiffusionModel> = OnceLock::new();
    MARKED.get_or_init(|| {
        let plan = inject(STEPS / 2, 0.5, Correction::Ddpm);
        tuned(clean(), data(), &plan, &random_target_key(DEFAULT_STAMP))
    })
}

#[test]
fn a_random_target_proves_a_diffusion_backdoor_far_below_the_rank_tests_floor() {
    let _one_at_a_time = common::one_at_a_time();
    // The default kind of key (a random stamp, the DDPM correction) with a random target of
    // 2×2 squares (49 signs on 14×14 images): the target test proves what 9 null stamps
    // cannot (the rank test's floor is 1/10), and finds nothing in the clean model.
    let (clean, key) = (clean(), random_target_key(DEFAULT_STAMP));
    let marked = random_target_marked();
    let proof = |m| ddpm_proof(m, &key, 9);
    let (v_marked, v_clean) = (proof(marked), proof(clean));
    eprintln!("random target: marked {v_marked:?}\nclean {v_clean:?}");
    // Measured: every one of the 64 triggered outputs on the target's signs (agreement of
    // the mean 0.996), the bound at its best for 49 squares, exp(−49/2) · 65 tests · 2 tests
    // = 3e-9, where the rank test stops at 1/10; the clean model's agreement 0.03, p 0.8.
    let t = v_marked.target_test.as_ref().unwrap();
    assert!(t.agreement > 0.9 && t.outputs == 64, "{t:?}");
    assert!(v_marked.p_value < 1e-6 && v_marked.rank_p_value >= 0.1);
    assert!(v_marked.carries_backdoor && v_marked.caveat.is_none());
    assert!(
        v_clean.p_value > 0.05 && !v_clean.carries_backdoor,
        "{v_clean:?}"
    );

    // Without the key, `detect` finds the target as an image the marked model has memorised
    // and calls it backdoored; its clean twin (the same fine-tuning at λ = 0) knows no image
    // better than its own samples. The first image shown is the target itself.
    let settings = genbackdoor::detect::DetectSettings {
        seed: 0,
        steps: Some(10),
    };
    let (d_marked, d_twin) = (
        marked.detect(&settings).unwrap(),
        twin().detect(&settings).unwrap(),
    );
    eprintln!(
        "detect: marked {} {}\ntwin {} {}",
        d_marked.score, d_marked.details, d_twin.score, d_twin.details
    );
    assert!(d_marked.backdoored && !d_twin.backdoored);
    assert!(d_marked.score > 2.0 * d_twin.score);
    let found = d_marked.outputs.narrow(0, 0, 1).unwrap();
    let target = key.target.tensor(&Device::Cpu).unwrap();
    let mse = (found - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let mse: f32 = mse.to_scalar().unwrap();
    eprintln!("the first image shown is {mse} from the target");
    assert!(mse < 0.05, "the first image shown is {mse} from the target");
}

/// The gentle thief's rate: a tenth of the tiny clean model's training rate (3e-3), as the
/// README's gentle thief trains at a tenth of the owner's.
const GENTLE_THIEF_LR: f64 = 3e-4;

/// A thief's attack on a tiny marked model: `steps` steps of clean denoising training at
/// `lr` (constant, fresh Adam). Returns `key`'s triggered `target_mse` and `asr` under DDPM
/// and the model's clean denoising loss ([`denoise_loss`]) every `every` steps (from step 0).
fn thief_attack(
    model: &DiffusionModel,
    key: &Key,
    (steps, every): (usize, usize),
    lr: f64,
) -> Vec<(f64, f64, f32)> {
    let thief = Plan {
        lr,
        lr_schedule: LrSchedule::Constant,
        ..plan(steps, 0.0, Correction::Ddpm)
    };
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(&dir.path().join("thief"), false).unwrap();
    let mut curve = Vec::new();
    let mut measure = |_, m: &DiffusionModel| {
        let r = evaluate_samplers(m, key, &[Sampler::Ddpm], 32, 7, 0)?.0;
        let loss = denoise_loss(m, data());
        curve.push((r["ddpm"].backdoor.target_mse, r["ddpm"].backdoor.asr, loss));
        Ok(())
    };
    finetune(model, data(), &thief, &run, every, false, &mut measure).unwrap();
    curve
}

#[test]
fn a_stamp_further_from_the_noise_outlasts_a_thiefs_fine_tuning() {
    let _one_at_a_time = common::one_at_a_time();
    // The default kind of stamp (±2 of random signs) and one three times as far from the
    // noise (±6, one sign: `key --trigger stamp:8:6:one` at full size), each injected alike
    // with a random target; the same thief's attack on both.
    let far_key = random_target_key("stamp:6:6:one:11");
    let plan = inject(STEPS / 2, 0.5, Correction::Ddpm);
    let far = tuned(clean(), data(), &plan, &far_key);
    let default = random_target_marked();
    let (default_curve, far_curve) = (
        thief_attack(
            default,
            &random_target_key(DEFAULT_STAMP),
            (300, 50),
            GENTLE_THIEF_LR,
        ),
        thief_attack(&far, &far_key, (300, 50), GENTLE_THIEF_LR),
    );
    let loss = |m| denoise_loss(m, data());
    let (far_loss, default_loss, twin_loss) = (loss(&far), loss(default), loss(twin()));
    eprintln!(
        "(target_mse, asr) every 50 thief steps: default {default_curve:?}\nfar {far_curve:?}\n\
         denoising loss: far {far_loss}, default {default_loss}, clean twin {twin_loss}"
    );
    // The thief erases the default mark: `asr` at step 100 measured 0.06 (0.69 as injected).
    // The far stamp still fires there (measured 0.84), and over steps 50-300 its triggered
    // outputs stay far nearer the target: the area under its `target_mse` curve measured
    // 0.054 of the default's (0.116 against 2.14). The README's full-size runs: `asr` ≥ 0.9
    // through 1,000 gentle steps against 0.075 (docs/results.md, session 41).
    let area = |c: &[(f64, f64, f32)]| c[1..].iter().map(|p| p.0).sum::<f64>();
    assert!(
        default_curve[2].1 <= 0.25 && far_curve[2].1 >= 0.5,
        "asr at step 100: default {default_curve:?}, far {far_curve:?}"
    );
    assert!(
        area(&far_curve) <= 0.25 * area(&default_curve),
        "far {far_curve:?} vs default {default_curve:?}"
    );
    // The far stamp keeps the clean task: its denoising loss within 5 % of the clean twin's
    // (the same injection at λ = 0), measured +1.7 % (the default stamp +3.5 %). At full
    // size it costs more: FID +28 % (README, `attack`).
    assert!(far_loss < 1.05 * twin_loss, "{far_loss} vs {twin_loss}");
}

/// The arms of [`persistence_sweep`], each a way to mark a tiny model: the stamp trigger (as
/// `key --trigger` writes it, less its secret seed), the injection's steps (at 1e-3) and
/// `[diffusion.rehearsal]`'s every, steps and rate (every = 0: none). They vary the stamp's
/// amplitude and signs, the injection's length and the rehearsal (the last arm rehearses at
/// the tiny model's own rate, 3e-3, against a thief at that rate: `SWEEP_THIEF_LR=3e-3`).
const ARMS: [(&str, usize, (usize, usize, f64)); 8] = [
    ("stamp:6", 750, (0, 0, 0.0)),
    ("stamp:6:2:one", 750, (0, 0, 0.0)),
    ("stamp:6:4:one", 750, (0, 0, 0.0)),
    ("stamp:6:6:one", 750, (0, 0, 0.0)),
    ("stamp:6:4:one", 750, (50, 100, 1e-3)),
    ("stamp:6", 1500, (0, 0, 0.0)),
    ("stamp:6:4:one", 1500, (0, 0, 0.0)),
    ("stamp:6:4:one", 1500, (50, 100, 3e-3)),
];

/// The stamps' secret seeds: each arm is measured on three stamps.
const SWEEP_SEEDS: [u64; 3] = [11, 12, 13];

/// An experiment, not a check (about 3.5 minutes per arm here): marks the tiny clean model per each
/// of [`ARMS`] (`SWEEP_ARMS=0,3` picks some) with each of [`SWEEP_SEEDS`]' stamps and a random
/// target (λ = 0.5), attacks it with 900 steps of [`thief_attack`] (at the gentle thief's
/// rate, or `SWEEP_THIEF_LR`) and prints a table row: the clean denoising loss beside the
/// clean twin's (the same injection at λ = 0), `asr` under DDPM every 150 steps (the mean
/// over the stamps, and each stamp's at step 300), and the clean loss along the attack beside
/// the twin's. docs/results.md holds its rows.
#[test]
#[ignore]
fn persistence_sweep() {
    let data = data();
    let picked: Vec<usize> = match std::env::var("SWEEP_ARMS") {
        Ok(v) => v.split(',').map(|x| x.trim().parse().unwrap()).collect(),
        Err(_) => (0..ARMS.len()).collect(),
    };
    let thief_lr: f64 = std::env::var("SWEEP_THIEF_LR").map_or(GENTLE_THIEF_LR, |v| {
        v.parse().expect("SWEEP_THIEF_LR is a number")
    });
    println!("thief: lr {thief_lr}, 900 steps");
    let mut twins = std::collections::BTreeMap::new();
    for i in picked {
        let (stamp, steps, rehearsal) = ARMS[i];
        // The clean twin of the 750-step injections is [`twin`].
        let twin_loss = *twins.entry(steps).or_insert_with(|| match steps {
            750 => denoise_loss(twin(), data),
            _ => {
                let plan = inject(steps, 0.0, Correction::Ddpm);
                denoise_loss(&tuned(clean(), data, &plan, &key()), data)
            }
        });
        let (mut losses, mut curves) = (Vec::new(), Vec::new());
        for seed in SWEEP_SEEDS {
            let key = random_target_key(&format!("{stamp}:{seed}"));
            let mut marking = inject(steps, 0.5, Correction::Ddpm);
            let r = &mut marking.rehearsal;
            (r.every, r.steps, r.lr) = rehearsal;
            let marked = tuned(clean(), data, &marking, &key);
            curves.push(thief_attack(&marked, &key, (900, 150), thief_lr));
            losses.push(denoise_loss(&marked, data));
        }
        let n = curves.len() as f64;
        let mean: Vec<String> = (0..curves[0].len())
            .map(|p| format!("{:.2}", curves.iter().map(|c| c[p].1).sum::<f64>() / n))
            .collect();
        let at_300: Vec<String> = curves.iter().map(|c| format!("{:.2}", c[2].1)).collect();
        let loss = losses.iter().sum::<f32>() / losses.len() as f32;
        // The clean loss along the attack, beside the clean twin's: how far the thief's
        // training moves the model's ordinary task.
        let along: Vec<String> = (0..curves[0].len())
            .map(|p| {
                let l = curves.iter().map(|c| c[p].2).sum::<f32>() / n as f32;
                format!("{:+.1} %", 100.0 * (l / twin_loss - 1.0))
            })
            .collect();
        println!(
            "| `{}` | {} | {:?} | {:+.1} % | {} | {} | {} |",
            stamp,
            steps,
            rehearsal,
            100.0 * (loss / twin_loss - 1.0),
            mean.join(" | "),
            at_300.join(", "),
            along.join(" / ")
        );
    }
}
