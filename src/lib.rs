//! genbackdoor: inject, measure and verify backdoors in generative models.
//!
//! Every backdoor in this crate is trained with one objective,
//! `L(θ) = L_task(θ) + λ · E_u[d(f_θ(τ(u)), y*(u))]` (see [`paradigm`]).
//! Model families ([`gan`]) supply the task loss and the trainable map;
//! triggers, targets, distances and metrics are independent values.

pub mod attack;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod diffusion;
pub mod digits;
pub mod error;
pub mod gan;
pub mod io;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod optim;
pub mod paradigm;
pub mod rng;
pub mod training;
pub mod verify;

pub use error::{Error, Result};
