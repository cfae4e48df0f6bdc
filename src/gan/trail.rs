//! Training a DCGAN from scratch: clean (λ = 0) or with a backdoor (TrAIL: the generator
//! minimises its adversarial loss plus λ times the backdoor term).

use candle_core::{Device, Tensor};

use crate::config::Config;
use crate::data::{load_dataset, Batcher};
use crate::gan::families::Adversarial;
use crate::gan::{run, softplus, GanModel};
use crate::io::rundir::{CsvLog, RunDir};
use crate::models::{Discriminator, Params};
use crate::optim::Adam;
use crate::paradigm::{Key, Objective};
use crate::rng::Rng;
use crate::training::{run_loop, LoopSettings};
use crate::{Error, Result};

/// Columns of `train.csv` after `step`.
const COLUMNS: [&str; 4] = ["d_loss", "g_loss", "backdoor_loss", "tardis"];

/// Trains a generator per `cfg` (with the backdoor of `key` when given and λ > 0) and writes
/// the run's files into `run`. Returns the run's metrics (also written to `metrics.json`).
pub fn train(
    cfg: &Config,
    key: Option<&Key>,
    run: &RunDir,
    progress: bool,
) -> Result<serde_json::Value> {
    cfg.validate()?;
    let dev = Device::Cpu;
    let t = &cfg.train;
    let mut data = load_dataset(&cfg.data_path())?;
    data.truncate(cfg.data.limit);
    if (data.height, data.width) != (cfg.model.image_size, cfg.model.image_size) {
        return Err(Error::Mismatch(format!(
            "the data's images are {}x{} but model.image_size is {}",
            data.width, data.height, cfg.model.image_size
        )));
    }
    let key = key.filter(|_| t.lambda > 0.0);
    if let Some(k) = key {
        k.check_fits(cfg.model.latent_dim, cfg.model.image_shape())?;
    }
    let model = GanModel::new(&cfg.model, &mut Rng::derive(cfg.seed, "init-g"), &dev)?;
    let dparams = Params::new();
    let disc = Discriminator::new(&cfg.model, &dparams, &dev)?;
    dparams.init(&mut Rng::derive(cfg.seed, "init-d"))?;
    let mut opt_g = Adam::with_betas(model.params.trainable(), t.lr_g, t.beta1, t.beta2);
    let mut opt_d = Adam::with_betas(dparams.trainable(), t.lr_d, t.beta1, t.beta2);
    let mut batches = Batcher::new(data.len, t.batch_size, Rng::derive(cfg.seed, "batches"));
    let mut latents = Rng::derive(cfg.seed, "latents");
    let mut dropout = Rng::derive(cfg.seed, "dropout");
    let mut trig_latents = Rng::derive(cfg.seed, "trigger-latents");
    let objective = Objective {
        lambda: t.lambda,
        backdoor_batch: cfg.backdoor.backdoor_batch,
    };
    let probe = key.map(|k| run::Probe::new(k, &model)).transpose()?;

    run.write_toml("config.toml", cfg)?;
    let mut log = CsvLog::create(&run.file("train.csv"), &run::header(&COLUMNS))?;
    let settings = LoopSettings {
        steps: t.steps,
        log_every: t.log_every,
        columns: &COLUMNS,
        progress,
    };
    let seconds = run_loop(&settings, &mut log, |step| {
        opt_g.set_learning_rate(t.lr_schedule.at(t.lr_g, step, t.steps));
        opt_d.set_learning_rate(t.lr_schedule.at(t.lr_d, step, t.steps));
        let real = data.batch(batches.next_batch(), &dev)?;
        let n = real.dim(0)?;
        let z = latents.normal(&[n, cfg.model.latent_dim], &dev)?;
        let zt = match key {
            Some(k) => Some(k.trigger.sample(
                objective.triggered_count(&k.trigger),
                cfg.model.latent_dim,
                &mut trig_latents,
                &dev,
            )?),
            None => None,
        };
        let mut family = Adversarial::generate(&model, &disc, &z, zt.as_ref(), &mut dropout)?;

        let d_real = disc.forward(&real, Some(family.dropout))?;
        let d_fake = disc.forward(&family.fake.detach(), Some(family.dropout))?;
        let d_loss = (softplus(&d_real.neg()?)?.mean_all()? + softplus(&d_fake)?.mean_all()?)?;
        opt_d.backward_step(&d_loss)?;

        let terms = objective.evaluate(&mut family, key)?;
        opt_g.backward_step(&terms.total)?;
        let tardis = match &probe {
            Some(p) if step % t.log_every == 0 || step == t.steps => Some(p.tardis(&model)?),
            _ => None,
        };
        Ok(vec![
            Some(scalar(&d_loss)?),
            Some(terms.task as f64),
            terms.backdoor.map(f64::from),
            tardis,
        ])
    })?;
    let extra = serde_json::json!({
        "mode": if key.is_some() { "trail" } else { "clean" },
        "steps": t.steps,
        "seconds": seconds,
        "lambda": t.lambda,
    });
    dparams_save(&dparams, run)?;
    run::finish(run, &model, key, None, cfg.seed, extra)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

/// Keeps the discriminator beside the generator, for later clean fine-tuning.
fn dparams_save(params: &Params, run: &RunDir) -> Result<()> {
    crate::io::checkpoint::save_params(
        &run.file("discriminator.safetensors"),
        params,
        "dcgan-discriminator",
        "{}",
    )
}
