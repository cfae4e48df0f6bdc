//! The IDX format of MNIST (`images-idx3-ubyte`, `labels-idx1-ubyte`), raw or gzipped.

use std::io::{BufRead, Read};
use std::path::Path;

use crate::{Error, Result};

/// The contents of one IDX file of unsigned bytes: its dimensions and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    /// Sizes of each dimension, outermost first (e.g. `[N, 28, 28]`).
    pub dims: Vec<usize>,
    /// The values in row-major order.
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes (type code 0x08), gzipped or not.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("corrupt gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|msg| Error::format(path, msg))
}

/// The dimensions of the IDX file at `path`, read from its header alone.
pub fn peek_dims(path: &Path) -> Result<Vec<usize>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut file = std::io::BufReader::new(file);
    let gzipped = file
        .fill_buf()
        .map_err(|e| Error::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzipped {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut head = Vec::new();
    reader
        .take(4 + 4 * 255)
        .read_to_end(&mut head)
        .map_err(|e| Error::format(path, format!("unreadable IDX header: {e}")))?;
    header(&head)
        .map(|(dims, _)| dims)
        .map_err(|msg| Error::format(path, msg))
}

/// The dimensions an IDX header declares, and the header's length in bytes.
fn header(bytes: &[u8]) -> std::result::Result<(Vec<usize>, usize), String> {
    if bytes.len() < 4 {
        return Err("not an IDX file: shorter than its 4-byte magic number".into());
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "not an IDX file: magic number starts with {:#04x} {:#04x}, expected 0x00 0x00",
            bytes[0], bytes[1]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "unsupported IDX element type {:#04x}: only unsigned bytes (0x08) are supported",
            bytes[2]
        ));
    }
    let rank = bytes[3] as usize;
    if rank == 0 {
        return Err("IDX file declares zero dimensions".into());
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(format!(
            "truncated IDX header: {} dimensions need {header} bytes, file has {}",
            rank,
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    Ok((dims, header))
}

/// Parses IDX bytes; the error says what is wrong with them.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    let (dims, header) = header(bytes)?;
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("IDX dimensions overflow")?;
    let have = bytes.len() - header;
    if have != expected {
        return Err(format!(
            "IDX header declares dimensions {dims:?} ({expected} values) but the file holds {have}: truncated or wrong counts"
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_a_good_file() {
        let a = parse_idx(&idx(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_bad_files_with_reasons() {
        let mut bad_magic = idx(&[1], &[0]);
        bad_magic[0] = 7;
        assert!(parse_idx(&bad_magic).unwrap_err().contains("magic"));
        let mut bad_type = idx(&[1], &[0]);
        bad_type[2] = 0x0d;
        assert!(parse_idx(&bad_type).unwrap_err().contains("element type"));
        assert!(parse_idx(&idx(&[2, 3], &[1, 2, 3]))
            .unwrap_err()
            .contains("truncated"));
        assert!(parse_idx(&idx(&[2, 3], &[0; 7]))
            .unwrap_err()
            .contains("wrong counts"));
        assert!(parse_idx(&[0, 0, 8, 3, 0, 0])
            .unwrap_err()
            .contains("truncated IDX header"));
        assert!(parse_idx(&[0, 0]).is_err());
    }

    #[test]
    fn reads_gzipped_and_raw_files() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let bytes = idx(&[1, 2, 2], &[0, 64, 128, 255]);
        let raw = dir.path().join("raw-idx");
        std::fs::write(&raw, &bytes).unwrap();
        let gz = dir.path().join("x.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&raw).unwrap(), read_idx(&gz).unwrap());
        let err = read_idx(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
    }
}
