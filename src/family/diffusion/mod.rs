//! The diffusion model family: noise schedules, the samplers' update rules (DDPM ancestral,
//! DDIM deterministic, DPM-Solver++ 2M multistep), the poisoned forward process with the
//! trigger-correction coefficient each sampler needs, the on-policy samples of a deterministic
//! sampler's trigger, rehearsals of a thief's fine-tuning, the model (U-Net + schedule;
//! genbackdoor's own or a diffusers folder's), its training with the unified objective and its
//! run driver.

pub mod detect;
pub mod diffusers;
pub mod memory;
pub mod model;
pub mod poison;
pub mod rehearsal;
pub mod rollout;
pub mod run;
pub mod sampler;
pub mod schedule;
pub mod train;

#[cfg(test)]
pub(crate) use model::tiny_arch;
pub use model::DiffusionModel;
pub use sampler::Sampler;
pub use schedule::NoiseSchedule;

// The settings a diffusion model is configured with (declared with the rest of the config).
pub use crate::config::{Correction, ScheduleKind};
