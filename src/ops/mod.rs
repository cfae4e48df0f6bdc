//! Project-owned CPU kernels plugged into candle as custom ops with their backward passes.
//!
//! candle's CPU `conv_transpose2d` is a direct loop, and the input gradient of its `conv2d`
//! goes through it. Here both convolutions are written as a matrix product (candle's gemm)
//! plus one of two memory-rearranging ops, `im2col` and `col2im`, which are each other's
//! adjoint: the backward pass of one is the other. On other devices (and on the CPU when
//! forced, for tests) every op runs candle's own operations instead ([`portable`]).

mod activation;
mod batchnorm;
mod conv;
pub(crate) mod cpu;
mod dense;
mod direct3x3;
mod dropout;
mod fastexp;
mod groupnorm;
mod im2col;
pub mod portable;
mod saved;
#[cfg(test)]
pub(crate) mod testing;
mod upsample;
mod winograd;
mod winograd_stride2;

pub use activation::leaky_relu;
pub use batchnorm::{batch_norm, BatchNorm};
pub use conv::{conv2d, conv2d_residual, conv_transpose2d, ConvKind, ConvLayer};
pub use cpu::Activation;
pub use dense::Dense;
pub use dropout::masked;
pub use groupnorm::{group_norm, GroupNorm};
pub use im2col::Geometry;
pub use upsample::upsample2x;
