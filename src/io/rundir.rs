//! Run directories: where a run's config, metrics, logs, images and checkpoints go.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::io::write_atomic;
use crate::{Error, Result};

/// A run's output folder.
pub struct RunDir {
    /// Its path.
    pub path: PathBuf,
}

impl RunDir {
    /// Creates the folder. An existing non-empty folder is refused unless `force`.
    pub fn create(path: &Path, force: bool) -> Result<RunDir> {
        if path.exists() {
            let non_empty = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .next()
                .is_some();
            if non_empty && !force {
                return Err(Error::Config(format!(
                    "output folder {} already exists and is not empty; choose another --out or pass --force",
                    path.display()
                )));
            }
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// An existing run directory (to resume it).
    pub fn open(path: &Path) -> Result<RunDir> {
        if !path.is_dir() {
            return Err(Error::Config(format!(
                "{} is not a run directory",
                path.display()
            )));
        }
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// The path of a file inside the run.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a value as pretty JSON, atomically.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let s = serde_json::to_string_pretty(value).expect("serialisable value");
        write_atomic(&self.file(name), (s + "\n").as_bytes())
    }

    /// Writes a value as TOML, atomically.
    pub fn write_toml<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let s = toml::to_string_pretty(value)
            .map_err(|e| Error::Config(format!("cannot write {name}: {e}")))?;
        write_atomic(&self.file(name), s.as_bytes())
    }
}

/// A CSV log that is flushed after every row, so that a crash keeps every completed row.
pub struct CsvLog {
    file: std::fs::File,
    path: PathBuf,
}

impl CsvLog {
    /// Creates a training log whose header row is `step` then the loop's `columns`.
    pub fn for_steps(path: &Path, columns: &[&str]) -> Result<CsvLog> {
        let mut header = vec!["step"];
        header.extend_from_slice(columns);
        CsvLog::create(path, &header)
    }

    /// Creates the log with its header row.
    pub fn create(path: &Path, header: &[&str]) -> Result<CsvLog> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut log = CsvLog {
            file,
            path: path.to_path_buf(),
        };
        log.write_line(&header.join(","))?;
        Ok(log)
    }

    /// Reopens a log for a resumed run: keeps the header and the rows up to `step` (rows
    /// written after the checkpoint are dropped, so the log stays continuous), then appends.
    pub fn resume(path: &Path, step: usize) -> Result<CsvLog> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("");
        let cells = header.split(',').count();
        let mut kept = format!("{header}\n");
        // Rows up to the checkpoint; a row cut short by a crash mid-write ends the log.
        for line in lines {
            let first = line.split(',').next().unwrap_or("");
            match first.parse::<usize>() {
                Ok(s) if s <= step && line.split(',').count() == cells => {
                    kept.push_str(line);
                    kept.push('\n');
                }
                _ => break,
            }
        }
        crate::io::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(CsvLog {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one row of numbers (NaN for a missing value is written as empty).
    pub fn row(&mut self, values: &[f64]) -> Result<()> {
        let cells: Vec<String> = values
            .iter()
            .map(|v| {
                if v.is_nan() {
                    String::new()
                } else {
                    format!("{v}")
                }
            })
            .collect();
        self.write_line(&cells.join(","))
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_empty_folder_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("r"), false).unwrap();
        let mut log = CsvLog::create(&run.file("log.csv"), &["step", "loss"]).unwrap();
        log.row(&[1.0, f64::NAN]).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.file("log.csv")).unwrap(),
            "step,loss\n1,\n"
        );
        assert!(RunDir::create(&run.path, false).is_err());
        for v in 2..=5 {
            log.row(&[v as f64 * 10.0, 0.5]).unwrap();
        }
        // Rows after the checkpoint go.
        let mut again = CsvLog::resume(&run.file("log.csv"), 30).unwrap();
        again.row(&[40.0, 0.25]).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.file("log.csv")).unwrap(),
            "step,loss\n1,\n20,0.5\n30,0.5\n40,0.25\n"
        );
        // So does half a row left by a crash in the middle of a write.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(run.file("log.csv"))
            .unwrap();
        write!(f, "50").unwrap();
        drop(f);
        CsvLog::resume(&run.file("log.csv"), 50).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.file("log.csv")).unwrap(),
            "step,loss\n1,\n20,0.5\n30,0.5\n40,0.25\n"
        );
        assert!(RunDir::create(&run.path, true).is_ok());
    }
}
