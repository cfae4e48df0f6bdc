//! The diffusers `UNet2DModel` of the google/ddpm family, under diffusers' own tensor names so
//! that the weights of a diffusers folder load one to one: DownBlock2D, AttnDownBlock2D,
//! UNetMidBlock2D, UpBlock2D and AttnUpBlock2D; positional (sinusoidal) time embedding;
//! ResnetBlock2D with GroupNorm + SiLU and the default time-embedding shift; multi-head
//! attention. Its timesteps are diffusers' τ = 0 … T − 1. It knows nothing of backdoors.

use candle_core::{Module, Tensor, D};
use candle_nn::{linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::models::check_channels;
use crate::ops::{group_norm, ConvKind, ConvLayer, Dense, GroupNorm};
use crate::{Error, Result};

/// A `UNet2DModel` config (diffusers' `config.json`), with diffusers' defaults for the fields a
/// file leaves out. Fields that select something genbackdoor does not build must keep the one
/// value it supports ([`DiffusersConfig::validate`] names the field and the value otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusersConfig {
    /// Side of the square images (an integer or a `[side, side]` pair).
    pub sample_size: SampleSize,
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out (the predicted noise: as many as in).
    pub out_channels: usize,
    /// Whether inputs are mapped by `2x − 1` first.
    pub center_input_sample: bool,
    /// Only `"positional"`.
    pub time_embedding_type: String,
    /// Width of the time embedding (default 4 × the first block's channels).
    pub time_embedding_dim: Option<usize>,
    /// The sinusoidal embedding's frequency shift.
    pub freq_shift: f64,
    /// Whether the embedding is `[cos, sin]` instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// `DownBlock2D` or `AttnDownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// Only `"UNetMidBlock2D"`.
    pub mid_block_type: Option<String>,
    /// `UpBlock2D` or `AttnUpBlock2D` per level, from the lowest resolution up.
    pub up_block_types: Vec<String>,
    /// Channels of each level.
    pub block_out_channels: Vec<usize>,
    /// Residual blocks per down level (the up levels have one more).
    pub layers_per_block: usize,
    /// The middle block's output divisor.
    pub mid_block_scale_factor: f64,
    /// 1: the stride-2 convolution pads by 1; 0: it pads the right and bottom edges by 1.
    pub downsample_padding: usize,
    /// Only `"conv"`.
    pub downsample_type: String,
    /// Only `"conv"`.
    pub upsample_type: String,
    /// Dropout of the residual blocks during diffusers' training; genbackdoor computes and
    /// trains these networks without dropout.
    pub dropout: f64,
    /// Only `"silu"`.
    pub act_fn: String,
    /// Channels per attention head (`None`: one head).
    pub attention_head_dim: Option<usize>,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// GroupNorm groups of the middle block's attention (default `norm_num_groups`).
    pub attn_norm_num_groups: Option<usize>,
    /// GroupNorm epsilon.
    pub norm_eps: f64,
    /// Only `"default"`.
    pub resnet_time_scale_shift: String,
    /// Whether the middle block has its attention.
    pub add_attention: bool,
    /// Only `None` (no class conditioning).
    pub class_embed_type: Option<String>,
    /// Only `None` (no class conditioning).
    pub num_class_embeds: Option<usize>,
    /// Used by learned time embeddings only; ignored.
    pub num_train_timesteps: Option<usize>,
}

/// diffusers' `sample_size`: one side, or height and width.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// A square side.
    Side(usize),
    /// `[height, width]`.
    Pair([usize; 2]),
}

impl Default for DiffusersConfig {
    /// diffusers' `UNet2DModel.__init__` defaults (0.42), with a 32-pixel sample size.
    fn default() -> Self {
        DiffusersConfig {
            sample_size: SampleSize::Side(32),
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: names(&[DOWN, ATTN_DOWN, ATTN_DOWN, ATTN_DOWN]),
            mid_block_type: Some(MID.into()),
            up_block_types: names(&[ATTN_UP, ATTN_UP, ATTN_UP, UP]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// A diffusers config value genbackdoor does not build, as its error says it.
pub(crate) fn unsupported(field: &str, value: &str, supported: &str) -> String {
    format!("{field} = {value} is not supported (supported: {supported})")
}

/// Block type names as a config holds them.
fn names(types: &[&str]) -> Vec<String> {
    types.iter().map(|s| s.to_string()).collect()
}

const DOWN: &str = "DownBlock2D";
const ATTN_DOWN: &str = "AttnDownBlock2D";
const UP: &str = "UpBlock2D";
const ATTN_UP: &str = "AttnUpBlock2D";
const MID: &str = "UNetMidBlock2D";

impl DiffusersConfig {
    /// A small network of the same family for `side`×`side` images of `channels` channels:
    /// levels of `widths` channels with `groups` GroupNorm groups, one residual block per
    /// level on the way down (two on the way up), plain `DownBlock2D`/`UpBlock2D` levels and
    /// single-head attention in the middle block only. genbackdoor's default diffusion network
    /// is `small(28, 1, &[16, 32, 32], 8)`.
    pub fn small(side: usize, channels: usize, widths: &[usize], groups: usize) -> Self {
        let levels = widths.len();
        DiffusersConfig {
            sample_size: SampleSize::Side(side),
            in_channels: channels,
            out_channels: channels,
            down_block_types: names(&vec![DOWN; levels]),
            up_block_types: names(&vec![UP; levels]),
            block_out_channels: widths.to_vec(),
            layers_per_block: 1,
            attention_head_dim: widths.last().copied(),
            norm_num_groups: groups,
            ..DiffusersConfig::default()
        }
    }

    /// The configuration of google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 model as diffusers
    /// ships it: 35.7 M parameters).
    pub fn ddpm_cifar10() -> Self {
        DiffusersConfig {
            sample_size: SampleSize::Side(32),
            flip_sin_to_cos: false,
            freq_shift: 1.0,
            down_block_types: names(&[DOWN, ATTN_DOWN, DOWN, DOWN]),
            up_block_types: names(&[UP, UP, ATTN_UP, UP]),
            block_out_channels: vec![128, 256, 256, 256],
            downsample_padding: 0,
            attention_head_dim: None,
            norm_eps: 1e-6,
            ..DiffusersConfig::default()
        }
    }

    /// Parses a `config.json`: diffusers' bookkeeping fields (`_class_name`, `_diffusers_version`,
    /// …) are skipped; any other field genbackdoor does not know is an error naming it.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |m: String| Error::Config(format!("diffusers UNet2DModel config: {m}"));
        let mut map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        if let Some(class) = map.get("_class_name").and_then(|v| v.as_str()) {
            if class != "UNet2DModel" {
                return Err(bad(format!(
                    "_class_name is \"{class}\"; only UNet2DModel is supported"
                )));
            }
        }
        map.retain(|k, _| !k.starts_with('_'));
        let cfg: DiffusersConfig = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| bad(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that genbackdoor builds this network: every unsupported value is an error naming
    /// its field and value.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |field: &str, value: String, supported: &str| {
            Err(Error::Config(format!(
                "diffusers UNet2DModel config: {}",
                unsupported(field, &value, supported)
            )))
        };
        let fixed = [
            (
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ),
            ("downsample_type", &self.downsample_type, "conv"),
            ("upsample_type", &self.upsample_type, "conv"),
            ("act_fn", &self.act_fn, "silu"),
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ),
        ];
        for (field, value, only) in fixed {
            if value != only {
                return unsupported(field, format!("\"{value}\""), &format!("\"{only}\""));
            }
        }
        if self.mid_block_type.as_deref() != Some(MID) {
            return unsupported("mid_block_type", format!("{:?}", self.mid_block_type), MID);
        }
        if let Some(c) = &self.class_embed_type {
            return unsupported("class_embed_type", format!("\"{c}\""), "null");
        }
        if let Some(n) = self.num_class_embeds {
            return unsupported("num_class_embeds", n.to_string(), "null");
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if t != DOWN && t != ATTN_DOWN {
                let field = format!("down_block_types[{i}]");
                return unsupported(&field, format!("\"{t}\""), &format!("{DOWN}, {ATTN_DOWN}"));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if t != UP && t != ATTN_UP {
                let field = format!("up_block_types[{i}]");
                return unsupported(&field, format!("\"{t}\""), &format!("{UP}, {ATTN_UP}"));
            }
        }
        if self.downsample_padding > 1 {
            let v = self.downsample_padding.to_string();
            return unsupported("downsample_padding", v, "0, 1");
        }
        let bad = |m: String| Err(Error::Config(format!("diffusers UNet2DModel config: {m}")));
        let levels = self.block_out_channels.len();
        if levels == 0
            || self.down_block_types.len() != levels
            || self.up_block_types.len() != levels
        {
            return bad(format!(
                "block_out_channels ({levels}), down_block_types ({}) and up_block_types ({}) must have the same, non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if self.layers_per_block == 0 || self.norm_num_groups == 0 {
            return bad("layers_per_block and norm_num_groups must be positive".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || !c.is_multiple_of(self.norm_num_groups))
        {
            return bad(format!(
                "norm_num_groups {} must divide every level's channels (block_out_channels), not {c}",
                self.norm_num_groups
            ));
        }
        check_channels(self.in_channels)?;
        if self.out_channels != self.in_channels {
            return bad(format!(
                "out_channels {} must equal in_channels {} (the network predicts the noise of its input)",
                self.out_channels, self.in_channels
            ));
        }
        let side = self.side()?;
        let down = 1 << (levels - 1);
        if side == 0 || !side.is_multiple_of(down) {
            return bad(format!(
                "sample_size {side} must be a positive multiple of {down} for {levels} levels"
            ));
        }
        let attends = |t: &str| t == ATTN_DOWN || t == ATTN_UP;
        let mut with_attention: Vec<usize> = self
            .down_block_types
            .iter()
            .zip(&self.block_out_channels)
            .chain(
                self.up_block_types
                    .iter()
                    .zip(self.block_out_channels.iter().rev()),
            )
            .filter(|(t, _)| attends(t))
            .map(|(_, &c)| c)
            .collect();
        if self.add_attention {
            with_attention.push(self.block_out_channels[levels - 1]);
        }
        if let Some(d) = self.attention_head_dim {
            if let Some(c) = with_attention
                .iter()
                .find(|&&c| d == 0 || !c.is_multiple_of(d))
            {
                return bad(format!(
                    "attention_head_dim {d} must divide the {c} channels of every attention block"
                ));
            }
        }
        Ok(())
    }

    /// The square images' side.
    pub fn side(&self) -> Result<usize> {
        match self.sample_size {
            SampleSize::Side(s) => Ok(s),
            SampleSize::Pair([h, w]) if h == w => Ok(h),
            SampleSize::Pair([h, w]) => Err(Error::Config(format!(
                "diffusers UNet2DModel config: sample_size = [{h}, {w}] is not supported (square images only)"
            ))),
        }
    }

    /// Shape of one image, `[channels, side, side]`.
    pub fn image_shape(&self) -> Result<[usize; 3]> {
        let s = self.side()?;
        Ok([self.in_channels, s, s])
    }

    fn time_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels[0])
    }

    fn heads(&self, channels: usize) -> usize {
        self.attention_head_dim.map_or(1, |d| channels / d)
    }
}

/// A GroupNorm with the config's groups and epsilon.
fn norm(
    cfg: &DiffusersConfig,
    groups: usize,
    c: usize,
    silu: bool,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    Ok(group_norm(groups, c, silu, vb)?.with_eps(cfg.norm_eps as f32))
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    vb: VarBuilder,
) -> Result<ConvLayer> {
    ConvLayer::new(ConvKind::Forward, cin, cout, k, stride, pad, true, vb)
}

/// diffusers' `ResnetBlock2D` (default time-embedding shift), at resolution `res`.
struct Resnet {
    norm1: GroupNorm,
    conv1: ConvLayer,
    time_emb_proj: Dense,
    norm2: GroupNorm,
    conv2: ConvLayer,
    conv_shortcut: Option<ConvLayer>,
    scale: f64,
    res: usize,
}

impl Resnet {
    fn new(
        cfg: &DiffusersConfig,
        cin: usize,
        cout: usize,
        scale: f64,
        res: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Resnet {
            norm1: norm(cfg, g, cin, true, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(cfg.time_dim(), cout, vb.pp("time_emb_proj"))?.into(),
            norm2: norm(cfg, g, cout, true, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if cin == cout {
                None
            } else {
                Some(conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            },
            scale,
            res,
        })
    }

    /// `temb` is the time embedding after its SiLU.
    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // The projected embedding `[n, cout]` is added to every position in conv1's own sweep.
        let t = self.time_emb_proj.forward(temb)?;
        let h = self.conv1.forward_shifted(x, Some(&self.norm1), &t)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        // The skip path is added in conv2's own sweep.
        let y = self.conv2.forward_residual(&h, Some(&self.norm2), &skip)?;
        Ok(if self.scale == 1.0 {
            y
        } else {
            (y / self.scale)?
        })
    }

    fn macs(&self) -> u64 {
        let r = self.res;
        self.conv1.macs(r, r)
            + self.conv2.macs(r, r)
            + self.conv_shortcut.as_ref().map_or(0, |c| c.macs(r, r))
    }
}

/// The pixels of the feature map `x` `[n, c, h, w]` after `norm`, as tokens `[n, hw, c]`.
/// Contiguous: candle 0.11's CPU matmul computes wrong values for a transposed 3-D left
/// operand times a batch-broadcast right one, which is what `Linear` makes of a 3-D input.
fn normed_tokens(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    Ok(norm
        .forward(x)?
        .flatten_from(2)?
        .transpose(1, 2)?
        .contiguous()?)
}

/// diffusers' `Attention` over the pixels of a feature map (GroupNorm, multi-head scaled
/// dot-product attention, residual connection, output divided by `scale`).
struct Attention {
    group_norm: GroupNorm,
    to_q: Dense,
    to_k: Dense,
    to_v: Dense,
    to_out: Dense,
    heads: usize,
    scale: f64,
    res: usize,
}

impl Attention {
    fn new(
        cfg: &DiffusersConfig,
        c: usize,
        groups: usize,
        scale: f64,
        res: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Attention {
            group_norm: norm(cfg, groups, c, false, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp("to_q"))?.into(),
            to_k: linear(c, c, vb.pp("to_k"))?.into(),
            to_v: linear(c, c, vb.pp("to_v"))?.into(),
            to_out: linear(c, c, vb.pp("to_out.0"))?.into(),
            heads: cfg.heads(c),
            scale,
            res,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (heads, l) = (self.heads, h * w);
        let d = c / heads;
        // Contiguous throughout (see `normed_tokens`).
        let tokens = normed_tokens(&self.group_norm, x)?; // [n, l, c]
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, l, heads, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n * heads, l, d))?)
        };
        let q = split(self.to_q.forward(&tokens)?)?;
        let k = split(self.to_k.forward(&tokens)?)?;
        let v = split(self.to_v.forward(&tokens)?)?;
        let scores = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? / (d as f64).sqrt())?;
        // Not `softmax_last_dim`: candle-nn gives that fused kernel no backward pass.
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let mixed = attn
            .matmul(&v)?
            .reshape((n, heads, l, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, l, c))?;
        let y = self
            .to_out
            .forward(&mixed)?
            .transpose(1, 2)?
            .reshape((n, c, h, w))?;
        let y = (y + x)?;
        Ok(if self.scale == 1.0 {
            y
        } else {
            (y / self.scale)?
        })
    }

    fn macs(&self) -> u64 {
        let l = (self.res * self.res) as u64;
        let c = self.to_q.weight().dim(0).unwrap_or(0) as u64;
        4 * c * c * l + 2 * l * l * c
    }
}

/// A down or up level: residual blocks (each followed by attention in the `Attn…` types) and
/// the resampling convolution.
struct Level {
    resnets: Vec<Resnet>,
    attentions: Vec<Attention>,
    resample: Option<ConvLayer>,
    /// Down levels: whether the stride-2 convolution pads only the right and bottom edges.
    pad_corner: bool,
    res: usize,
}

impl Level {
    fn resample_macs(&self, down: bool) -> u64 {
        self.resample.as_ref().map_or(0, |c| {
            if down && self.pad_corner {
                c.macs(self.res + 1, self.res + 1)
            } else if down {
                c.macs(self.res, self.res)
            } else {
                c.macs(2 * self.res, 2 * self.res)
            }
        })
    }

    fn macs(&self, down: bool) -> u64 {
        self.resnets.iter().map(Resnet::macs).sum::<u64>()
            + self.attentions.iter().map(Attention::macs).sum::<u64>()
            + self.resample_macs(down)
    }
}

/// The network.
pub struct DiffusersUnet {
    cfg: DiffusersConfig,
    linear_1: Dense,
    linear_2: Dense,
    conv_in: ConvLayer,
    down: Vec<Level>,
    mid: (Resnet, Option<Attention>, Resnet),
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: ConvLayer,
}

impl DiffusersUnet {
    /// Creates the network's tensors through `vb` under diffusers' names
    /// (`down_blocks.0.resnets.0.conv1.weight`, `mid_block.attentions.0.to_q.bias`, …): new
    /// variables from [`crate::models::Params::builder`], or a frozen view from
    /// [`crate::models::Params::frozen_builder`].
    pub fn new(cfg: &DiffusersConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let levels = ch.len();
        let side = cfg.side()?;
        let layers = cfg.layers_per_block;
        let mut down = Vec::new();
        let mut prev = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let (vb, res) = (vb.pp(format!("down_blocks.{i}")), side >> i);
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
                resample: None,
                pad_corner: cfg.downsample_padding == 0,
                res,
            };
            for j in 0..layers {
                let cin = if j == 0 { prev } else { ch[i] };
                let p = vb.pp(format!("resnets.{j}"));
                level
                    .resnets
                    .push(Resnet::new(cfg, cin, ch[i], 1.0, res, p)?);
                if kind == ATTN_DOWN {
                    let p = vb.pp(format!("attentions.{j}"));
                    let a = Attention::new(cfg, ch[i], cfg.norm_num_groups, 1.0, res, p)?;
                    level.attentions.push(a);
                }
            }
            if i + 1 < levels {
                let pad = cfg.downsample_padding;
                let p = vb.pp("downsamplers.0.conv");
                level.resample = Some(conv(ch[i], ch[i], 3, 2, pad, p)?);
            }
            down.push(level);
            prev = ch[i];
        }
        let (last, low) = (ch[levels - 1], side >> (levels - 1));
        let mid_vb = vb.pp("mid_block");
        let scale = cfg.mid_block_scale_factor;
        let mid = (
            Resnet::new(cfg, last, last, scale, low, mid_vb.pp("resnets.0"))?,
            if cfg.add_attention {
                let groups = cfg.attn_norm_num_groups.unwrap_or(cfg.norm_num_groups);
                let p = mid_vb.pp("attentions.0");
                Some(Attention::new(cfg, last, groups, scale, low, p)?)
            } else {
                None
            },
            Resnet::new(cfg, last, last, scale, low, mid_vb.pp("resnets.1"))?,
        );
        let mut up = Vec::new();
        let mut prev = last;
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let level_of = levels - 1 - i;
            let (out, res) = (ch[level_of], side >> level_of);
            let skip_in = ch[level_of.saturating_sub(1)];
            let vb = vb.pp(format!("up_blocks.{i}"));
            let mut level = Level {
                resnets: Vec::new(),
                attentions: Vec::new(),
                resample: None,
                pad_corner: false,
                res,
            };
            for j in 0..=layers {
                let skip = if j == layers { skip_in } else { out };
                let cin = if j == 0 { prev } else { out };
                let p = vb.pp(format!("resnets.{j}"));
                level
                    .resnets
                    .push(Resnet::new(cfg, cin + skip, out, 1.0, res, p)?);
                if kind == ATTN_UP {
                    let p = vb.pp(format!("attentions.{j}"));
                    let a = Attention::new(cfg, out, cfg.norm_num_groups, 1.0, res, p)?;
                    level.attentions.push(a);
                }
            }
            if i + 1 < levels {
                level.resample = Some(conv(out, out, 3, 1, 1, vb.pp("upsamplers.0.conv"))?);
            }
            up.push(level);
            prev = out;
        }
        let time_in = ch[0];
        Ok(DiffusersUnet {
            cfg: cfg.clone(),
            linear_1: linear(time_in, cfg.time_dim(), vb.pp("time_embedding.linear_1"))?.into(),
            linear_2: linear(
                cfg.time_dim(),
                cfg.time_dim(),
                vb.pp("time_embedding.linear_2"),
            )?
            .into(),
            conv_in: conv(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            down,
            mid,
            up,
            conv_norm_out: norm(
                cfg,
                cfg.norm_num_groups,
                ch[0],
                true,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv(ch[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &DiffusersConfig {
        &self.cfg
    }

    /// diffusers' `get_timestep_embedding` `[n, dim]` of timesteps `tau` (`[n]`), computed in
    /// f32 in the same order of operations as diffusers.
    fn time_projection(&self, tau: &Tensor) -> Result<Tensor> {
        let half = self.cfg.block_out_channels[0] / 2;
        let shift = self.cfg.freq_shift as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10_000f64.ln() as f32) * i as f32 / (half as f32 - shift)).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), tau.device())?;
        let args = tau.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let parts = if self.cfg.flip_sin_to_cos {
            [cos, sin]
        } else {
            [sin, cos]
        };
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }

    /// ε̂ `[n, c, s, s]` for noisy images `x` at diffusers timesteps `tau` (`[n]`, f32).
    pub fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let [k, s, _] = self.cfg.image_shape()?;
        if (c, h, w) != (k, s, s) || tau.dims() != [n] {
            return Err(Error::Mismatch(format!(
                "the diffusers U-Net takes [n, {k}, {s}, {s}] images with [n] timesteps, not {:?} with {:?}",
                x.dims(),
                tau.dims()
            )));
        }
        let x = if self.cfg.center_input_sample {
            ((x * 2.0)? - 1.0)?
        } else {
            x.clone()
        };
        let temb = self.time_projection(tau)?;
        let temb = self
            .linear_2
            .forward(&self.linear_1.forward(&temb)?.silu()?)?
            .silu()?;
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for (j, resnet) in level.resnets.iter().enumerate() {
                h = resnet.forward(&h, &temb)?;
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h)?;
                }
                skips.push(h.clone());
            }
            if let Some(d) = &level.resample {
                if level.pad_corner {
                    h = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                }
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        let (r1, attn, r2) = &self.mid;
        h = r1.forward(&h, &temb)?;
        if let Some(a) = attn {
            h = a.forward(&h)?;
        }
        h = r2.forward(&h, &temb)?;
        for level in &self.up {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-level residual block");
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, &temb)?;
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(u) = &level.resample {
                h = u.forward(&crate::ops::upsample2x(&h)?)?;
            }
        }
        self.conv_out.forward_normed(&h, &self.conv_norm_out)
    }

    /// Forward multiply-adds per image of the convolutions and the attention (the time
    /// embedding's small dense layers are left out).
    pub fn macs(&self) -> u64 {
        let s = self.cfg.side().unwrap_or(0);
        let (r1, attn, r2) = &self.mid;
        self.conv_in.macs(s, s)
            + self.conv_out.macs(s, s)
            + self.down.iter().map(|l| l.macs(true)).sum::<u64>()
            + self.up.iter().map(|l| l.macs(false)).sum::<u64>()
            + r1.macs()
            + r2.macs()
            + attn.as_ref().map_or(0, Attention::macs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Params;
    use crate::rng::Rng;
    use candle_core::Device;

    #[test]
    fn the_small_network_takes_its_shape_gives_every_weight_a_gradient_and_reads_the_time() {
        let cfg = DiffusersConfig::small(28, 1, &[8, 16, 16], 4);
        let params = Params::new();
        let net = DiffusersUnet::new(&cfg, params.builder(&Device::Cpu)).unwrap();
        params.init_kaiming(&mut Rng::new(1)).unwrap();
        let x = Rng::new(2).normal(&[3, 1, 28, 28], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0f32, 500.0, 999.0], &Device::Cpu).unwrap();
        let y = net.forward(&x, &t).unwrap();
        assert_eq!(y.dims(), &[3, 1, 28, 28]);
        let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (name, v) in params.named() {
            assert!(
                grads.get(v.as_tensor()).is_some(),
                "{name} gets no gradient"
            );
        }
        let t2 = Tensor::new(&[900f32, 10.0, 3.0], &Device::Cpu).unwrap();
        let y2 = net.forward(&x, &t2).unwrap();
        assert!(crate::ops::testing::max_abs_diff(&y, &y2) > 1e-4);
        let msg = net
            .forward(&x.narrow(2, 0, 14).unwrap(), &t)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("[n, 1, 28, 28]"), "{msg}");
        assert!(DiffusersConfig::small(28, 1, &[8, 16, 18], 4)
            .validate()
            .is_err());
        assert!(DiffusersConfig::small(30, 1, &[8, 16, 16], 4)
            .validate()
            .is_err());
    }

    /// The attention block (one head) against a loop-by-loop computation of
    /// `x + out(softmax(q·kᵀ/√c)·v)`, and its input gradient (which flows through the
    /// queries, keys and values) against finite differences.
    #[test]
    fn attention_matches_an_explicit_computation_and_finite_differences() {
        let (n, c, h, w) = (3, 4, 2, 3);
        let cfg = DiffusersConfig::small(8, 1, &[c], 2);
        let params = Params::new();
        let attn = Attention::new(&cfg, c, 2, 1.0, h, params.builder(&Device::Cpu)).unwrap();
        params.init_kaiming(&mut Rng::new(4)).unwrap();
        let x = Rng::new(5).normal(&[n, c, h, w], &Device::Cpu).unwrap();
        let got = attn.forward(&x).unwrap();

        let vec = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let normed = vec(&attn.group_norm.forward(&x).unwrap());
        let layers = [&attn.to_q, &attn.to_k, &attn.to_v];
        let w_in: Vec<Vec<f32>> = layers.iter().map(|d| vec(d.weight())).collect();
        let b_in: Vec<Vec<f32>> = layers.iter().map(|d| vec(d.bias().unwrap())).collect();
        let (wo, bo) = (vec(attn.to_out.weight()), vec(attn.to_out.bias().unwrap()));
        let l = h * w;
        let mut want = vec(&x);
        for s in 0..n {
            let token = |p: usize, ch: usize| normed[(s * c + ch) * l + p];
            // qkv[m][p][j]: query (m = 0), key (1) or value (2) j of pixel p.
            let qkv: Vec<Vec<Vec<f32>>> = (0..3)
                .map(|m| {
                    (0..l)
                        .map(|p| {
                            (0..c)
                                .map(|j| {
                                    b_in[m][j]
                                        + (0..c)
                                            .map(|i| w_in[m][j * c + i] * token(p, i))
                                            .sum::<f32>()
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect();
            for p in 0..l {
                let scores: Vec<f32> = (0..l)
                    .map(|r| {
                        (0..c).map(|i| qkv[0][p][i] * qkv[1][r][i]).sum::<f32>() / (c as f32).sqrt()
                    })
                    .collect();
                let top = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|v| (v - top).exp()).collect();
                let z: f32 = e.iter().sum();
                let mixed: Vec<f32> = (0..c)
                    .map(|i| (0..l).map(|r| e[r] / z * qkv[2][r][i]).sum())
                    .collect();
                for o in 0..c {
                    let y = bo[o] + (0..c).map(|i| wo[o * c + i] * mixed[i]).sum::<f32>();
                    want[(s * c + o) * l + p] += y;
                }
            }
        }
        let want = Tensor::from_vec(want, (n, c, h, w), &Device::Cpu).unwrap();
        crate::ops::testing::assert_close(&got, &want, 1e-5).unwrap();
        crate::ops::testing::check_finite_differences(
            |t| attn.forward(&t[0]).unwrap(),
            &[&x],
            6,
            1,
        );
    }

    /// google/ddpm-cifar10-32 as diffusers builds it: 35,746,307 parameters and, counted by
    /// hooks on diffusers' own modules (bench/torch_reference.py, `cifar_macs`), 6,218,973,184
    /// forward multiply-adds per image.
    #[test]
    fn the_cifar10_configuration_has_diffusers_parameter_and_operation_counts() {
        let params = Params::new();
        let net = DiffusersUnet::new(
            &DiffusersConfig::ddpm_cifar10(),
            params.builder(&Device::Cpu),
        )
        .unwrap();
        assert_eq!(params.count(), 35_746_307);
        assert_eq!(net.macs(), 6_218_973_184);
    }

    #[test]
    fn configs_are_checked_field_by_field() {
        let ok =
            r#"{"_class_name": "UNet2DModel", "_diffusers_version": "0.1", "sample_size": 32}"#;
        assert_eq!(
            DiffusersConfig::from_json(ok).unwrap(),
            DiffusersConfig::default()
        );
        for (json, expect) in [
            (
                r#"{"_class_name": "UNet2DConditionModel"}"#,
                "UNet2DConditionModel",
            ),
            (r#"{"sample_size": [32, 16]}"#, "sample_size = [32, 16]"),
            (r#"{"sample_size": 30}"#, "sample_size 30"),
            (
                r#"{"in_channels": 4, "out_channels": 4}"#,
                "channels must be 1",
            ),
            (r#"{"out_channels": 1}"#, "out_channels 1"),
            (r#"{"attention_head_dim": 5}"#, "attention_head_dim 5"),
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (r#"{"mid_block_type": null}"#, "mid_block_type"),
            (r#"{"downsample_padding": 2}"#, "downsample_padding = 2"),
            (
                r#"{"block_out_channels": [32, 64]}"#,
                "same, non-zero length",
            ),
            (r#"[1, 2]"#, "not a JSON object"),
        ] {
            let msg = DiffusersConfig::from_json(json).err().unwrap().to_string();
            assert!(msg.contains(expect), "{json}: {msg}");
        }
    }
}
