//! `im2col` (image patches → rows) and its adjoint `col2im` (rows → summed image), as candle
//! custom ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// The geometry of a 2-D convolution over square kernels: input planes `c × h × w`,
/// kernel `k × k`, `stride`, zero `pad` on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

impl Geometry {
    /// Checks that the kernel fits the padded input and the stride is positive.
    pub fn validate(&self) -> Result<()> {
        if self.stride == 0
            || self.k == 0
            || self.h + 2 * self.pad < self.k
            || self.w + 2 * self.pad < self.k
        {
            return Err(Error::Mismatch(format!(
                "invalid convolution geometry {self:?}"
            )));
        }
        Ok(())
    }

    /// Output height.
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }

    /// Output width.
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }

    /// Output positions per image (rows of the column matrix).
    pub fn positions(&self) -> usize {
        self.oh() * self.ow()
    }

    /// Values per input image: `c · h · w`.
    pub fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Values per image of the column matrix: `positions · patch`.
    pub fn rows(&self) -> usize {
        self.positions() * self.patch()
    }

    /// Patch length (columns of the column matrix): `c · k · k`.
    pub fn patch(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Calls `f(row, column, pixel)` for every in-bounds (patch element, input pixel) pair
    /// of one image; `row` and `pixel` index the column matrix and the image plane stack.
    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let (k, s, p) = (self.k, self.stride as isize, self.pad as isize);
        let (oh, ow, patch) = (self.oh(), self.ow(), self.patch());
        for oy in 0..oh {
            for ox in 0..ow {
                let base = (oy * ow + ox) * patch;
                for ci in 0..self.c {
                    for ky in 0..k {
                        let iy = oy as isize * s - p + ky as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let plane = (ci * self.h + iy as usize) * self.w;
                        let col = base + (ci * k + ky) * k;
                        for kx in 0..k {
                            let ix = ox as isize * s - p + kx as isize;
                            if ix >= 0 && ix < self.w as isize {
                                f(col + kx, plane + ix as usize);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Runs `f(input, output)` on each image of a contiguous f32 batch, in parallel: every image
/// has `in_len` input and `out_len` output values; the output starts zeroed.
fn per_image(
    storage: &CpuStorage,
    layout: &Layout,
    in_len: usize,
    out_len: usize,
    shape: impl Fn(usize) -> Shape,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("im2col/col2im support f32 only"),
    };
    let input = match layout.contiguous_offsets() {
        Some((a, b)) => &data[a..b],
        None => candle_core::bail!("im2col/col2im need a contiguous input"),
    };
    let n = layout.dims()[0];
    let mut out = vec![0f32; n * out_len];
    out.par_chunks_mut(out_len.max(1))
        .zip(input.par_chunks(in_len.max(1)))
        .for_each(|(o, i)| f(i, o));
    Ok((CpuStorage::F32(out), shape(n)))
}

struct Im2Col(Geometry);
struct Col2Im(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "genbackdoor-im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = |n| Shape::from((n, g.positions(), g.patch()));
        per_image(storage, layout, g.image(), g.rows(), shape, |xi, cols| {
            g.for_each(|c, p| cols[c] = xi[p])
        })
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "genbackdoor-col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let shape = |n| Shape::from((n, g.c, g.h, g.w));
        per_image(storage, layout, g.rows(), g.image(), shape, |cols, xi| {
            g.for_each(|c, p| xi[p] += cols[c])
        })
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// Patches of `x` `[n, c, h, w]` as rows: `[n, positions, c·k·k]`. Differentiable.
pub fn im2col(x: &Tensor, g: Geometry) -> Result<Tensor> {
    g.validate()?;
    let (_, c, h, w) = x.dims4()?;
    if (c, h, w) != (g.c, g.h, g.w) {
        return Err(Error::Mismatch(format!(
            "im2col input {:?} does not match {g:?}",
            x.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op1(Im2Col(g))?)
}

/// The adjoint of [`im2col`]: rows `[n, positions, c·k·k]` summed back into `[n, c, h, w]`.
/// Differentiable.
pub fn col2im(cols: &Tensor, g: Geometry) -> Result<Tensor> {
    g.validate()?;
    let (_, l, p) = cols.dims3()?;
    if (l, p) != (g.positions(), g.patch()) {
        return Err(Error::Mismatch(format!(
            "col2im input {:?} does not match {g:?}",
            cols.dims()
        )));
    }
    Ok(cols.contiguous()?.apply_op1(Col2Im(g))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;
    use proptest::prelude::*;

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// <im2col(x), c> = <x, col2im(c)>: col2im is im2col's adjoint, which is exactly what
        /// makes each the other's backward pass.
        #[test]
        fn col2im_is_the_adjoint_of_im2col(
            n in 1usize..3, c in 1usize..4, h in 1usize..9, w in 1usize..9,
            k in 1usize..6, stride in 1usize..4, pad in 0usize..3, seed in 0u64..1000,
        ) {
            let g = Geometry { c, h, w, k, stride, pad };
            prop_assume!(g.validate().is_ok());
            let dev = Device::Cpu;
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, c, h, w], &dev).unwrap();
            let cols = rng.normal(&[n, g.positions(), g.patch()], &dev).unwrap();
            let lhs = dot(&im2col(&x, g).unwrap(), &cols);
            let rhs = dot(&x, &col2im(&cols, g).unwrap());
            prop_assert!((lhs - rhs).abs() <= 1e-3 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
        }
    }

    #[test]
    fn im2col_on_a_known_image() {
        let x = Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu).unwrap();
        let g = Geometry {
            c: 1,
            h: 2,
            w: 2,
            k: 2,
            stride: 1,
            pad: 1,
        };
        let cols = im2col(&x, g).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(cols[0].len(), 9);
        assert_eq!(cols[0][0], vec![0.0, 0.0, 0.0, 1.0]);
        assert_eq!(cols[0][4], vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(cols[0][8], vec![4.0, 0.0, 0.0, 0.0]);
        let back = col2im(&im2col(&x, g).unwrap(), g).unwrap();
        // Every pixel appears in 4 of the 9 padded patches.
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, 8.0, 12.0, 16.0]
        );
        assert!(im2col(&x, Geometry { k: 5, ..g }).is_err());
    }
}
