"""Frozen model configurations and presets.

Every config is a frozen dataclass: hashable (so it can be a static jit argument
or a flax module field) and JSON round-trippable (`to_dict` / `from_dict`).
Per-block widths of the DiT are tuples, so a pruned student is an ordinary
`FluxConfig` rather than a special case.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Optional, Tuple


def _to_tuple(x):
  return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_ranges(config, ints_min: dict[str, int],
                  positive_floats: tuple[str, ...] = ()) -> None:
  """Raises ValueError naming the first field that is not an integer >= its
  minimum (ints_min) or a finite number > 0 (positive_floats)."""
  name = type(config).__name__
  for field, low in ints_min.items():
    v = getattr(config, field)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
      raise ValueError(f'{name}.{field}={v!r} must be an integer >= {low}')
  for field in positive_floats:
    v = getattr(config, field)
    if (isinstance(v, bool) or not isinstance(v, numbers.Real) or
        not math.isfinite(v) or v <= 0):
      raise ValueError(f'{name}.{field}={v!r} must be a finite number > 0')


class _Serializable:
  """JSON helpers shared by the config dataclasses."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'{cls.__name__}: unknown config keys {unknown}')
    return cls(**{k: _to_tuple(v) for k, v in d.items()})

  @classmethod
  def from_json(cls, s: str):
    return cls.from_dict(json.loads(s))

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


# jax.checkpoint_policies that take no arguments (FluxConfig.remat_policy).
REMAT_POLICIES = ('nothing_saveable', 'everything_saveable', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable')


@dataclasses.dataclass(frozen=True)
class FluxConfig(_Serializable):
  """The FLUX.1 rectified-flow DiT (BFL `FluxParams` plus compression fields).

  Per-block widths (`double_heads`, `double_mlp_img`, `double_mlp_txt`,
  `single_heads`, `single_mlp`) default to the uniform values derived from
  `num_heads` / `mlp_ratio` and are filled in by `__post_init__`. A double
  block's attention is joint over text and image tokens, so both streams share
  one head count; their MLPs are pruned independently.
  """
  in_channels: int = 64
  out_channels: Optional[int] = None  # None: same as in_channels.
  vec_in_dim: int = 768
  context_in_dim: int = 4096
  hidden_size: int = 3072
  num_heads: int = 24
  head_dim: int = 128
  mlp_ratio: float = 4.0
  depth: int = 19
  depth_single_blocks: int = 38
  axes_dim: Tuple[int, ...] = (16, 56, 56)
  theta: int = 10_000
  qkv_bias: bool = True
  guidance_embed: bool = False
  # Per-block widths; None means uniform (filled in __post_init__).
  double_heads: Optional[Tuple[int, ...]] = None
  double_mlp_img: Optional[Tuple[int, ...]] = None
  double_mlp_txt: Optional[Tuple[int, ...]] = None
  single_heads: Optional[Tuple[int, ...]] = None
  single_mlp: Optional[Tuple[int, ...]] = None
  # Compression. 'adaln': modulation from (t, y) as in FLUX; 'static': one
  # learned modulation row per timestep of a fixed schedule (Static-LN).
  modulation: str = 'adaln'
  static_timesteps: Tuple[float, ...] = ()
  # Token down-sampler over global blocks [start, end] (double blocks first,
  # then single blocks); None disables it.
  downsample_start: Optional[int] = None
  downsample_end: Optional[int] = None
  downsample_factor: int = 2
  downsample_channels: int = 0  # 0: hidden_size // 4 (ResNet width).
  # Numerics and execution.
  dtype: str = 'float32'        # compute dtype of matmuls.
  param_dtype: str = 'float32'  # storage dtype of params.
  # 'auto' | 'per_head' | 'batched' | 'xla' | 'cudnn' | 'splash'
  # (layers.resolve_impl).
  attention_impl: str = 'auto'
  remat: bool = False           # rematerialise each block in the backward.
  # What a rematerialised block keeps for the backward: a jax.checkpoint_
  # policies name without arguments (REMAT_POLICIES).
  remat_policy: str = 'nothing_saveable'
  # Scan (lax.scan) over each run of identical blocks instead of unrolling
  # them: one block body to compile per run. Params of a run are stacked on a
  # leading 'layers' axis (models.scan_blocks.scan_params / unscan_params convert).
  scan_blocks: bool = False

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    _check_ranges(self, dict(
        in_channels=1, vec_in_dim=1, context_in_dim=1, hidden_size=1,
        num_heads=1, head_dim=2, depth=0, depth_single_blocks=0, theta=1,
        downsample_factor=1, downsample_channels=0))
    if (isinstance(self.mlp_ratio, bool) or
        not isinstance(self.mlp_ratio, numbers.Real) or
        not math.isfinite(self.mlp_ratio) or self.mlp_ratio < 0):
      raise ValueError(f'FluxConfig.mlp_ratio={self.mlp_ratio!r} must be a '
                       'finite number >= 0')
    if self.out_channels is not None:
      _check_ranges(self, dict(out_channels=1))
    if self.depth + self.depth_single_blocks < 1:
      raise ValueError('FluxConfig: depth + depth_single_blocks must be >= 1')
    mlp = int(self.hidden_size * self.mlp_ratio)
    for name, n, default in (
        ('double_heads', self.depth, self.num_heads),
        ('double_mlp_img', self.depth, mlp),
        ('double_mlp_txt', self.depth, mlp),
        ('single_heads', self.depth_single_blocks, self.num_heads),
        ('single_mlp', self.depth_single_blocks, mlp)):
      value = getattr(self, name)
      value = (default,) * n if value is None else tuple(int(v) for v in value)
      if any(v < 0 for v in value):
        raise ValueError(f'FluxConfig.{name}={value} has negative entries')
      if len(value) != n:
        raise ValueError(f'FluxConfig.{name} has {len(value)} entries but the '
                         f'model has {n} such blocks')
      set_(name, value)
    set_('axes_dim', tuple(self.axes_dim))
    set_('static_timesteps', tuple(float(t) for t in self.static_timesteps))
    if sum(self.axes_dim) != self.head_dim:
      raise ValueError(f'FluxConfig: sum(axes_dim)={sum(self.axes_dim)} must '
                       f'equal head_dim={self.head_dim}')
    if any(d % 2 for d in self.axes_dim):
      raise ValueError(f'FluxConfig: axes_dim {self.axes_dim} must be even')
    if self.modulation not in ('adaln', 'static'):
      raise ValueError(f'FluxConfig.modulation={self.modulation!r}; expected '
                       "'adaln' or 'static'")
    if self.modulation == 'static' and not self.static_timesteps:
      raise ValueError("FluxConfig: modulation='static' needs static_timesteps")
    if self.attention_impl not in ('auto', 'per_head', 'batched', 'xla',
                                   'cudnn', 'splash'):
      raise ValueError(f'FluxConfig.attention_impl={self.attention_impl!r}')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'FluxConfig.remat_policy={self.remat_policy!r}; '
                       f'expected one of {REMAT_POLICIES}')
    if (self.downsample_start is None) != (self.downsample_end is None):
      raise ValueError('FluxConfig: set both downsample_start and '
                       'downsample_end, or neither')
    if self.downsample_start is not None:
      n = self.num_blocks
      if not 0 <= self.downsample_start <= self.downsample_end < n:
        raise ValueError(
            f'FluxConfig: downsample blocks [{self.downsample_start}, '
            f'{self.downsample_end}] not within [0, {n - 1}]')

  @property
  def num_blocks(self) -> int:
    return self.depth + self.depth_single_blocks

  @property
  def out_dim(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def is_uniform(self) -> bool:
    """True when every block has the preset's head count and MLP width."""
    mlp = int(self.hidden_size * self.mlp_ratio)
    return (set(self.double_heads + self.single_heads) <= {self.num_heads} and
            set(self.double_mlp_img + self.double_mlp_txt + self.single_mlp)
            <= {mlp})

  @classmethod
  def schnell(cls, **kw) -> 'FluxConfig':
    """FLUX.1-schnell: 19 double + 38 single blocks, no guidance embedder."""
    return cls(**kw)

  @classmethod
  def dev(cls, **kw) -> 'FluxConfig':
    """FLUX.1-dev: schnell's shapes plus the guidance embedder."""
    return cls(guidance_embed=True, **kw)

  @classmethod
  def tiny(cls, **kw) -> 'FluxConfig':
    """A few-thousand-parameter FLUX for tests (2 double + 2 single blocks)."""
    base = dict(in_channels=16, vec_in_dim=32, context_in_dim=24,
                hidden_size=64, num_heads=4, head_dim=16, mlp_ratio=2.0,
                depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
    base.update(kw)
    return cls(**base)

  @classmethod
  def benchmark(cls, **kw) -> 'FluxConfig':
    """The benchmark config: hidden 768 (12 x 64), 4 double + 8 single."""
    base = dict(in_channels=64, vec_in_dim=256, context_in_dim=512,
                hidden_size=768, num_heads=12, head_dim=64, depth=4,
                depth_single_blocks=8, axes_dim=(16, 24, 24))
    base.update(kw)
    return cls(**base)


@dataclasses.dataclass(frozen=True)
class T5Config(_Serializable):
  """T5 v1.1 encoder (gated-GELU FFN, RMS norm, shared relative bias)."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    _check_ranges(self, dict(
        vocab_size=1, d_model=1, d_kv=1, d_ff=1, num_layers=0, num_heads=1,
        relative_attention_num_buckets=1, relative_attention_max_distance=1),
                  ('layer_norm_epsilon',))

  @classmethod
  def xxl(cls, **kw) -> 'T5Config':
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> 'T5Config':
    base = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=20)
    base.update(kw)
    return cls(**base)


@dataclasses.dataclass(frozen=True)
class ClipConfig(_Serializable):
  """CLIP text transformer (causal, quick-GELU, final LayerNorm, EOS pooling)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  # transformers' rule: eos_token_id == 2 (the legacy configs, FLUX's included)
  # pools at argmax(input_ids); otherwise at the first eos_token_id.
  eos_token_id: int = 2
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    _check_ranges(self, dict(
        vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=0,
        num_heads=1, max_position_embeddings=1, eos_token_id=0),
                  ('layer_norm_eps',))
    if self.hidden_size % self.num_heads:
      raise ValueError(f'ClipConfig: hidden_size={self.hidden_size} is not '
                       f'divisible by num_heads={self.num_heads}')

  @classmethod
  def clip_l(cls, **kw) -> 'ClipConfig':
    """CLIP ViT-L/14 text tower, as shipped in FLUX.1's text_encoder/."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> 'ClipConfig':
    base = dict(vocab_size=1000, hidden_size=32, intermediate_size=37,
                num_layers=2, num_heads=4, max_position_embeddings=77)
    base.update(kw)
    return cls(**base)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(_Serializable):
  """CLIP's vision transformer (ViT: patch conv, CLS token, pre-LN, quick-GELU
  layers, post-LN on CLS), as `transformers.CLIPVisionModel`."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    _check_ranges(self, dict(hidden_size=1, intermediate_size=1, num_layers=0,
                             num_heads=1, image_size=1, patch_size=1,
                             num_channels=1), ('layer_norm_eps',))
    if self.hidden_size % self.num_heads:
      raise ValueError(f'ClipVisionConfig: hidden_size={self.hidden_size} is '
                       f'not divisible by num_heads={self.num_heads}')
    if self.image_size % self.patch_size:
      raise ValueError(f'ClipVisionConfig: image_size={self.image_size} is '
                       f'not a multiple of patch_size={self.patch_size}')

  def layer_config(self) -> 'ClipConfig':
    """The ClipConfig whose encoder layers (models.clip.ClipLayer) the vision
    tower shares with the text tower; only the layer fields matter."""
    return ClipConfig(hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size,
                      num_layers=self.num_layers, num_heads=self.num_heads,
                      layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                      param_dtype=self.param_dtype)

  @classmethod
  def vit_l14(cls, **kw) -> 'ClipVisionConfig':
    """ViT-L/14 at 224 px (openai/clip-vit-large-patch14)."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> 'ClipVisionConfig':
    base = dict(hidden_size=24, intermediate_size=40, num_layers=2,
                num_heads=2, image_size=28, patch_size=7)
    base.update(kw)
    return cls(**base)


@dataclasses.dataclass(frozen=True)
class ClipModelConfig(_Serializable):
  """The dual-tower CLIP (`transformers.CLIPModel`): text and vision towers,
  their bias-free projections to `projection_dim`, and a learned logit
  scale. Used to score images against prompts (evaluate/clip_score.py)."""
  text: ClipConfig = dataclasses.field(default_factory=ClipConfig)
  vision: ClipVisionConfig = dataclasses.field(
      default_factory=ClipVisionConfig)
  projection_dim: int = 768

  def __post_init__(self):
    _check_ranges(self, dict(projection_dim=1))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'ClipModelConfig':
    d = dict(d)
    unknown = sorted(set(d) - {'text', 'vision', 'projection_dim'})
    if unknown:
      raise ValueError(f'ClipModelConfig: unknown config keys {unknown}')
    return cls(text=ClipConfig.from_dict(d.get('text', {})),
               vision=ClipVisionConfig.from_dict(d.get('vision', {})),
               projection_dim=d.get('projection_dim', 768))

  @classmethod
  def vit_l14(cls, **kw) -> 'ClipModelConfig':
    """openai/clip-vit-large-patch14: CLIP-L text (FLUX's text_encoder
    tower), ViT-L/14 vision, 768-d projections; 427,616,513 params."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> 'ClipModelConfig':
    base = dict(text=ClipConfig.tiny(), vision=ClipVisionConfig.tiny(),
                projection_dim=16)
    base.update(kw)
    return cls(**base)


@dataclasses.dataclass(frozen=True)
class VAEConfig(_Serializable):
  """FLUX.1's AutoencoderKL (diffusers layout, no quant convs), or a patch
  codec for toy worlds (models.vae.PatchCodec): kind='pixel', the image's
  f x f pixel patches stacked as channels, or kind='linear', a linear
  autoencoder on those patches (see `pixel` and `linear`)."""
  kind: str = 'kl'                 # 'kl', 'pixel' or 'linear'.
  pixel_factor: int = 1            # patch codecs: pixels per latent side.
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.3611
  shift_factor: float = 0.1159
  mid_block_add_attention: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    object.__setattr__(self, 'block_out_channels',
                       tuple(self.block_out_channels))
    _check_ranges(self, dict(pixel_factor=1, in_channels=1, out_channels=1,
                             latent_channels=1, layers_per_block=0,
                             norm_num_groups=1), ('scaling_factor',))
    if not self.block_out_channels or any(
        isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1
        for c in self.block_out_channels):
      raise ValueError(f'VAEConfig.block_out_channels='
                       f'{self.block_out_channels} must be positive integers')
    if self.kind not in ('kl', 'pixel', 'linear'):
      raise ValueError(f"VAEConfig.kind={self.kind!r}; expected 'kl', "
                       "'pixel' or 'linear'")
    if self.kind == 'pixel' and (
        self.latent_channels != self.in_channels * self.pixel_factor ** 2):
      raise ValueError(f'VAEConfig: a pixel codec with factor '
                       f'{self.pixel_factor} has latent_channels '
                       f'{self.in_channels * self.pixel_factor ** 2}, got '
                       f'{self.latent_channels}')

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent side: 2 ** (num blocks - 1), or pixel_factor."""
    if self.kind != 'kl':
      return self.pixel_factor
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def flux(cls, **kw) -> 'VAEConfig':
    return cls(**kw)

  @classmethod
  def pixel(cls, factor: int = 4, **kw) -> 'VAEConfig':
    """Pixel-unshuffled RGB as the latent space: 3 f^2 channels, no
    parameters, x in [-1, 1] used as it is (scaling 1, shift 0)."""
    return cls(kind='pixel', pixel_factor=factor,
               latent_channels=3 * factor ** 2, scaling_factor=1.0,
               shift_factor=0.0, **kw)

  @classmethod
  def linear(cls, factor: int = 4, channels: int = 12, **kw) -> 'VAEConfig':
    """A linear autoencoder on f x f patches with `channels` latents."""
    return cls(kind='linear', pixel_factor=factor, latent_channels=channels,
               **{'scaling_factor': 1.0, 'shift_factor': 0.0, **kw})

  @classmethod
  def tiny(cls, **kw) -> 'VAEConfig':
    base = dict(latent_channels=4, block_out_channels=(8, 16),
                layers_per_block=1, norm_num_groups=4)
    base.update(kw)
    return cls(**base)
