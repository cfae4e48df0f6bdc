//! Files: atomic writes, safetensors files with metadata (checkpoints, keys), NumPy arrays,
//! PNG grids, run directories, charts, checkpoints and tensor files.

pub mod atomic;
pub mod checkpoint;
pub mod grid;
pub mod npy;
pub mod plot;
pub mod rundir;
pub mod snapshot;
pub mod tensorfile;

pub use atomic::write_atomic;
