//! Files: atomic writes, safetensors files with metadata (checkpoints, keys), NumPy arrays,
//! PNG grids, run directories, charts and the HTML report.

pub mod atomic;
pub mod checkpoint;
pub mod grid;
pub mod npy;
pub mod plot;
pub mod report;
pub mod rundir;
pub mod snapshot;
pub mod tensorfile;

pub use atomic::write_atomic;
