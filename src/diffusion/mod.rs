//! The diffusion side that knows nothing of networks: noise schedules, the samplers' update
//! rules (DDPM ancestral, DDIM deterministic) and the poisoned forward process with the
//! trigger-correction coefficient each sampler needs.

pub mod poison;
pub mod sampler;
pub mod schedule;

pub use poison::Correction;
pub use sampler::Sampler;
pub use schedule::{NoiseSchedule, ScheduleKind};
