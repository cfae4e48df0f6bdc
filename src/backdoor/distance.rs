//! The distance d between a model's triggered output and the target.

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How far an output is from its target, averaged over all elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// Mean squared error.
    #[default]
    Mse,
    /// Mean absolute error.
    L1,
}

impl Distance {
    /// d(output, target) as a differentiable scalar; `target` broadcasts over the batch.
    pub fn loss(&self, output: &Tensor, target: &Tensor) -> Result<Tensor> {
        let diff = output.broadcast_sub(target)?;
        let per = match self {
            Distance::Mse => diff.sqr()?,
            Distance::L1 => diff.abs()?,
        };
        Ok(per.mean_all()?)
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distance::Mse => "mse",
            Distance::L1 => "l1",
        })
    }
}

impl FromStr for Distance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mse" => Ok(Distance::Mse),
            "l1" => Ok(Distance::L1),
            _ => Err(Error::Config(format!(
                "unknown distance '{s}' (use mse or l1)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn known_values() {
        let o = Tensor::new(&[[1f32, -1.0], [3.0, 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
        let mse = Distance::Mse
            .loss(&o, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let l1 = Distance::L1
            .loss(&o, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(mse, (1.0 + 4.0 + 9.0 + 1.0) / 4.0);
        assert_eq!(l1, (1.0 + 2.0 + 3.0 + 1.0) / 4.0);
        assert_eq!("l1".parse::<Distance>().unwrap(), Distance::L1);
        assert!("cosine".parse::<Distance>().is_err());
    }
}
