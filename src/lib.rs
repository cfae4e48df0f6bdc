//! genbackdoor: inject, measure and verify backdoors in generative models.
//!
//! Every backdoor in this crate is trained with one objective,
//! `L(θ) = L_task(θ) + λ · E_u[d(f_θ(τ(u)), y*(u))]` (see [`backdoor`]).
//! Model families ([`family`]) supply the task loss and the trainable map and implement one
//! interface, [`family::Generative`]; triggers, targets, distances and metrics are
//! independent values, and the tools that measure and prove a backdoor ([`eval`],
//! [`verify`], [`attack`], [`detect`], the report) take any model through that interface.

pub mod attack;
pub mod backdoor;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod detect;
pub mod digits;
pub mod error;
pub mod eval;
pub mod family;
pub mod io;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod optim;
pub mod report;
pub mod rng;
pub mod run;
pub mod training;
pub mod verify;

pub use error::{Error, Result};
