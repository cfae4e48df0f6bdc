//! Files: atomic writes, safetensors files with metadata (checkpoints, keys), NumPy arrays,
//! PNG grids and run directories.

pub mod atomic;
pub mod checkpoint;
pub mod grid;
pub mod npy;
pub mod rundir;
pub mod tensorfile;

pub use atomic::write_atomic;
