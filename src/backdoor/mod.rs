//! The unified backdoor objective and its independent pieces. No model code lives here.
//!
//! `L(θ) = L_task(θ) + λ · E_u[d(f_θ(τ(u)), y*)]`: a [`Family`] supplies `L_task` and
//! `f_θ(τ(u))`; the [`Key`] holds the trigger τ, the target y* and the distance d.

pub mod distance;
pub mod key;
pub mod objective;
pub mod target;
pub mod trigger;

pub use distance::Distance;
pub use key::{Key, KeyRecipe, KeySet};
pub use objective::{Family, Objective, Terms};
pub use target::Target;
pub use trigger::{Stamp, Trigger};
