"""The FLUX.1 rectified-flow DiT: double-stream and single-stream blocks.

Parameter layout follows BFL's `flux` package with fused tensors split along
their natural axes, so heads and MLP channels can be sliced and sharded:
  qkv kernel [D, 3, heads, head_dim]  (BFL rows are laid out (3, H, Dh))
  proj kernel [heads, head_dim, D]
  single block: linear1 = [qkv | mlp_in], linear2 = [attn_out ; mlp_out]
  modulation kernel [D, n, D] (n = 6 double, 3 single, 2 final layer)
"""
from __future__ import annotations


from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import downsample
from nanoflux_jax.models import layers
from nanoflux_jax.models import scan_blocks

Array = jax.Array
_ACT = ('act_batch', 'act_len', 'act_embed')


def _constrain(x: Array) -> Array:
  return nn.with_logical_constraint(x, _ACT)


class Modulation(nn.Module):
  """AdaLN modulation vectors (shift, scale, gate, ...) for one block.

  'adaln': Linear(SiLU(vec)), as in FLUX. 'static' (Static-LN): a learned
  table with one row per timestep of the fixed sampling schedule, indexed by
  the step; it needs neither t nor the pooled text vector at run time.

  Returns a list of n arrays [B, 1, D].
  """
  config: FluxConfig
  n: int

  @nn.compact
  def __call__(self, cond: Array) -> list[Array]:
    cfg = self.config
    dtype, param_dtype = layers.dtypes(cfg)
    d = cfg.hidden_size
    if cfg.modulation == 'static':
      table = self.param(
          'table', nn.with_logical_partitioning(
              nn.initializers.zeros, (None, None, 'embed')),
          (len(cfg.static_timesteps), self.n, d), param_dtype)
      out = jnp.take(table, cond, axis=0).astype(dtype)  # cond: [B] step.
    else:  # cond: vec [B, D]
      out = layers.dense((self.n, d), ('embed', None, 'mlp'), name='lin',
                         dtype=dtype, param_dtype=param_dtype)(nn.silu(cond))
    return [out[:, None, i] for i in range(self.n)]


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  return (1 + scale) * layers.layer_norm(x) + shift


class SelfAttention(nn.Module):
  """Fused qkv projection and QK RMSNorm of one stream (BFL `SelfAttention`).

  `qkv` gives q, k, v [B, L, heads, head_dim]; `proj` maps attention output
  [B, L, heads, head_dim] back to [B, L, D].
  """
  config: FluxConfig
  heads: int

  def setup(self):
    cfg = self.config
    dtype, param_dtype = layers.dtypes(cfg)
    self.qkv_proj = layers.dense(
        (3, self.heads, cfg.head_dim), ('embed', None, 'heads', 'kv'),
        name='qkv', dtype=dtype, param_dtype=param_dtype,
        use_bias=cfg.qkv_bias)
    self.query_norm = layers.RMSNorm(param_dtype=param_dtype)
    self.key_norm = layers.RMSNorm(param_dtype=param_dtype)
    self.out_proj = layers.dense(
        cfg.hidden_size, ('heads', 'kv', 'embed'), name='proj', in_axes=2,
        dtype=dtype, param_dtype=param_dtype)

  def qkv(self, x: Array) -> tuple[Array, Array, Array]:
    qkv = self.qkv_proj(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return self.query_norm(q), self.key_norm(k), v

  def proj(self, x: Array) -> Array:
    return self.out_proj(x)


class MLP(nn.Module):
  """Linear -> tanh-GELU -> Linear, [B, L, D] -> [B, L, D]."""
  config: FluxConfig
  width: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype, param_dtype = layers.dtypes(self.config)
    x = layers.dense(self.width, ('embed', 'mlp'), name='fc1', dtype=dtype,
                     param_dtype=param_dtype)(x)
    x = nn.gelu(x, approximate=True)
    return layers.dense(self.config.hidden_size, ('mlp', 'embed'), name='fc2',
                        dtype=dtype, param_dtype=param_dtype)(x)


class DoubleStreamBlock(nn.Module):
  """Separate weights for text and image tokens, joint attention over both.

  img [B, Li, D], txt [B, Lt, D] -> (img, txt), same shapes.
  """
  config: FluxConfig
  index: int
  scan_outputs: bool = False  # scan_step also stacks every block's output.

  def scan_step(self, carry: tuple[Array, Array], cond: Array,
                pe: tuple[Array, Array]):
    """nn.scan body: ((img, txt), cond, pe) -> ((img, txt), ys)."""
    out = self(*carry, cond, pe)
    return out, (out if self.scan_outputs else None)

  @nn.compact
  def __call__(self, img: Array, txt: Array, cond: Array,
               pe: tuple[Array, Array]) -> tuple[Array, Array]:
    cfg, i = self.config, self.index
    heads = cfg.double_heads[i]
    img_mod = Modulation(cfg, 6, name='img_mod')(cond)
    txt_mod = Modulation(cfg, 6, name='txt_mod')(cond)
    img_attn = SelfAttention(cfg, heads, name='img_attn')
    txt_attn = SelfAttention(cfg, heads, name='txt_attn')

    img_q, img_k, img_v = img_attn.qkv(_modulate(img, *img_mod[:2]))
    txt_q, txt_k, txt_v = txt_attn.qkv(_modulate(txt, *txt_mod[:2]))
    # Text tokens come first in the joint sequence, as in BFL.
    q, k, v = (jnp.concatenate(p, axis=1) for p in
               ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
    q, k = layers.apply_rope(q, pe), layers.apply_rope(k, pe)
    attn = layers.attention(q, k, v, cfg.attention_impl)
    lt = txt.shape[1]
    txt_out, img_out = attn[:, :lt], attn[:, lt:]

    img = img + img_mod[2] * img_attn.proj(img_out)
    img = img + img_mod[5] * MLP(cfg, cfg.double_mlp_img[i], name='img_mlp')(
        _modulate(img, *img_mod[3:5]))
    txt = txt + txt_mod[2] * txt_attn.proj(txt_out)
    txt = txt + txt_mod[5] * MLP(cfg, cfg.double_mlp_txt[i], name='txt_mlp')(
        _modulate(txt, *txt_mod[3:5]))
    return _constrain(img), _constrain(txt)


class SingleStreamBlock(nn.Module):
  """Parallel attention + MLP over the joint sequence x [B, L, D] -> same.

  BFL fuses linear1 = [q|k|v|mlp_in] and linear2 = [attn ; mlp] -> D; we keep
  the attention and MLP parts as separate kernels (same math) so each has its
  own width and logical axes. linear2's single bias lives on `attn_out`.
  """
  config: FluxConfig
  index: int
  scan_outputs: bool = False  # scan_step also stacks every block's output.

  def scan_step(self, x: Array, cond: Array, pe: tuple[Array, Array]):
    """nn.scan body: (x, cond, pe) -> (x, ys)."""
    x = self(x, cond, pe)
    return x, (x if self.scan_outputs else None)

  @nn.compact
  def __call__(self, x: Array, cond: Array,
               pe: tuple[Array, Array]) -> Array:
    cfg, i = self.config, self.index
    dtype, param_dtype = layers.dtypes(cfg)
    heads, width = cfg.single_heads[i], cfg.single_mlp[i]
    shift, scale, gate = Modulation(cfg, 3, name='modulation')(cond)
    h = _modulate(x, shift, scale)
    attn = SelfAttention(cfg, heads, name='attn')
    q, k, v = attn.qkv(h)
    q, k = layers.apply_rope(q, pe), layers.apply_rope(k, pe)
    a = layers.attention(q, k, v, cfg.attention_impl)
    m = layers.dense(width, ('embed', 'mlp'), name='mlp_in', dtype=dtype,
                     param_dtype=param_dtype)(h)
    m = layers.dense(cfg.hidden_size, ('mlp', 'embed'), name='mlp_out',
                     dtype=dtype, param_dtype=param_dtype, use_bias=False)(
                         nn.gelu(m, approximate=True))
    return _constrain(x + gate * (attn.proj(a) + m))


class MLPEmbedder(nn.Module):
  """in_layer -> SiLU -> out_layer, [B, in] -> [B, D]."""
  config: FluxConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype, param_dtype = layers.dtypes(self.config)
    d = self.config.hidden_size
    x = layers.dense(d, (None, 'embed'), name='in_layer', dtype=dtype,
                     param_dtype=param_dtype)(x)
    return layers.dense(d, ('mlp', 'embed'), name='out_layer', dtype=dtype,
                        param_dtype=param_dtype)(nn.silu(x))


def static_step_index(timesteps: Array, schedule: tuple[float, ...]) -> Array:
  """[B] timesteps -> [B] int32 index of the nearest schedule point."""
  table = jnp.asarray(schedule, jnp.float32)
  return jnp.argmin(jnp.abs(timesteps.astype(jnp.float32)[:, None] -
                            table[None]), axis=-1).astype(jnp.int32)


@struct.dataclass
class FluxOutput:
  """What `Flux` returns, always (big_vision returns (x, out); gemma an
  Output dataclass): a pytree, so it passes through jit, scan and vmap.

  velocity: [B, L, out_channels] the predicted flow.
  intermediates: {} unless the call asked for them; then {'img': tuple of
    [B, L_block, D] image tokens after each block, 'txt': the text tokens},
    double blocks first.
  """
  velocity: Array
  intermediates: dict = struct.field(default_factory=dict)


class Flux(nn.Module):
  """FLUX.1 DiT with BFL's forward contract.

  Call with img [B, L, in_channels] (packed 2x2 latent patches), img_ids
  [B, L, 3], txt [B, T, context_in_dim], txt_ids [B, T, 3], timesteps [B] in
  [0, 1], y [B, vec_in_dim] (pooled CLIP; unused with static modulation) and
  guidance [B] (guidance-distilled models only). Returns a `FluxOutput`:
  the velocity [B, L, out_channels] and, when `return_intermediates`, every
  block's output tokens {'img': (...), 'txt': (...)} (double blocks first).

  With the token down-sampler (config.downsample_start/end), `img_grid=(h, w)`
  (static Python ints, h * w = L, both divisible by downsample_factor f) is
  required; blocks start..end then see (h/f)*(w/f) coarse image tokens, and
  their intermediates 'img' are those coarse tokens [B, L/f^2, D].

  With `config.scan_blocks`, each run of identical blocks (`block_runs`) is
  one lax.scan over params stacked as `{kind}_blocks_{a}_to_{b}`; same
  outputs, one block body to compile per run.
  """
  config: FluxConfig

  def _resampler(self, img, img_ids, txt_ids, img_grid):
    """-> resample(g, 'down'|'up', tokens, pe, lt=None) -> (tokens, pe).

    A no-op unless global block g starts ('down', before it) or ends ('up',
    after it) the down-sampled range. tokens are img [B, L, D], or with `lt`
    the joint sequence [B, lt + L, D] whose first lt tokens (text) pass.
    """
    cfg = self.config
    if cfg.downsample_start is None:
      return lambda g, where, x, pe, lt=None: (x, pe)
    grid = downsample.check_grid(cfg, img.shape[1], img_grid)
    ds = downsample.TokenDownsampler(cfg, name='downsample')
    ids = downsample.coarse_ids(img_ids, grid, cfg.downsample_factor)
    pe_coarse = layers.rope(jnp.concatenate([txt_ids, ids], axis=1),
                            cfg.axes_dim, cfg.theta)
    state = {}

    def resample(g, where, x, pe, lt=None):
      at = cfg.downsample_start if where == 'down' else cfg.downsample_end
      if g != at:
        return x, pe
      t, im = (x[:, :lt], x[:, lt:]) if lt is not None else (None, x)
      if where == 'down':
        state['skip'], state['pe'] = im, pe
        im = state['coarse_in'] = ds.down(im, grid)
        pe = pe_coarse
      else:
        im = ds.up(im, state['coarse_in'], state['skip'], grid)
        pe = state['pe']
      im = _constrain(im)
      return (im if t is None else jnp.concatenate([t, im], axis=1)), pe
    return resample

  def _check(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    cfg = self.config
    b = img.shape[0]
    expect = {'img': (img, (b, None, cfg.in_channels)),
              'img_ids': (img_ids, (b, img.shape[1], len(cfg.axes_dim))),
              'txt': (txt, (b, None, cfg.context_in_dim)),
              'txt_ids': (txt_ids, (b, txt.shape[1], len(cfg.axes_dim))),
              'timesteps': (timesteps, (b,))}
    if cfg.modulation == 'adaln':
      if y is None:
        raise ValueError('Flux: y (pooled text vector) is required')
      expect['y'] = (y, (b, cfg.vec_in_dim))
    if cfg.guidance_embed:
      if guidance is None:
        raise ValueError('Flux: this model has a guidance embedder; pass '
                         'guidance [B]')
      expect['guidance'] = (guidance, (b,))
    for name, (x, shape) in expect.items():
      ok = x.ndim == len(shape) and all(
          s is None or s == d for s, d in zip(shape, x.shape))
      if not ok:
        raise ValueError(f'Flux: {name} has shape {tuple(x.shape)}, expected '
                         f'{tuple("*" if s is None else s for s in shape)}')

  @nn.compact
  def __call__(self, img: Array, img_ids: Array, txt: Array, txt_ids: Array,
               timesteps: Array, y: Array | None = None,
               guidance: Array | None = None,
               return_intermediates: bool = False,
               img_grid: tuple[int, int] | None = None) -> FluxOutput:
    cfg = self.config
    self._check(img, img_ids, txt, txt_ids, timesteps, y, guidance)
    dtype, param_dtype = layers.dtypes(cfg)
    d = cfg.hidden_size

    img = layers.dense(d, (None, 'embed'), name='img_in', dtype=dtype,
                       param_dtype=param_dtype)(img.astype(dtype))
    txt = layers.dense(d, (None, 'embed'), name='txt_in', dtype=dtype,
                       param_dtype=param_dtype)(txt.astype(dtype))
    if cfg.modulation == 'static':
      cond = static_step_index(timesteps, cfg.static_timesteps)
    else:
      cond = MLPEmbedder(cfg, name='time_in')(
          layers.timestep_embedding(timesteps, 256).astype(dtype))
      if cfg.guidance_embed:
        cond = cond + MLPEmbedder(cfg, name='guidance_in')(
            layers.timestep_embedding(guidance, 256).astype(dtype))
      cond = cond + MLPEmbedder(cfg, name='vector_in')(y.astype(dtype))
    pe = layers.rope(jnp.concatenate([txt_ids, img_ids], axis=1),
                     cfg.axes_dim, cfg.theta)

    double, single = (scan_blocks.maybe_remat(b, cfg)
                      for b in (DoubleStreamBlock, SingleStreamBlock))
    resample = self._resampler(img, img_ids, txt_ids, img_grid)
    runs = scan_blocks.block_runs(cfg)
    feats_img, feats_txt = [], []
    img, txt = _constrain(img), _constrain(txt)
    for kind, a, b in runs:
      if kind != 'double':
        continue
      if b - a > 1:  # A scanned run: stacked outputs [n, B, L, D].
        img, pe = resample(a, 'down', img, pe)  # Runs break at the range.
        run = scan_blocks.scanned(DoubleStreamBlock, cfg, b - a)(
            cfg, a, return_intermediates, name=scan_blocks.run_name(kind, a, b))
        (img, txt), ys = run.scan_step((img, txt), cond, pe)
        if return_intermediates:
          feats_img.extend(ys[0])
          feats_txt.extend(ys[1])
        img, pe = resample(b - 1, 'up', img, pe)
        continue
      img, pe = resample(a, 'down', img, pe)
      img, txt = double(cfg, a, name=scan_blocks.run_name(kind, a, b))(img, txt, cond, pe)
      feats_img.append(img)
      feats_txt.append(txt)
      img, pe = resample(a, 'up', img, pe)
    lt = txt.shape[1]
    x = jnp.concatenate([txt, img], axis=1)
    for kind, a, b in runs:
      if kind != 'single':
        continue
      if b - a > 1:
        x, pe = resample(cfg.depth + a, 'down', x, pe, lt)
        run = scan_blocks.scanned(SingleStreamBlock, cfg, b - a)(
            cfg, a, return_intermediates, name=scan_blocks.run_name(kind, a, b))
        x, ys = run.scan_step(x, cond, pe)
        if return_intermediates:
          feats_img.extend(ys[:, :, lt:])
          feats_txt.extend(ys[:, :, :lt])
        x, pe = resample(cfg.depth + b - 1, 'up', x, pe, lt)
        continue
      g = cfg.depth + a
      x, pe = resample(g, 'down', x, pe, lt)
      x = single(cfg, a, name=scan_blocks.run_name(kind, a, b))(x, cond, pe)
      feats_img.append(x[:, lt:])
      feats_txt.append(x[:, :lt])
      x, pe = resample(g, 'up', x, pe, lt)
    img = x[:, lt:]

    # Final layer: BFL orders the modulation halves (shift, scale).
    shift, scale = Modulation(cfg, 2, name='final_mod')(cond)
    out = layers.dense(cfg.out_dim, ('embed', None), name='final_linear',
                       dtype=dtype, param_dtype=param_dtype)(
                           _modulate(img, shift, scale))
    if not return_intermediates:
      return FluxOutput(out)
    return FluxOutput(out, {'img': tuple(feats_img), 'txt': tuple(feats_txt)})


def init_params(config: FluxConfig, rng: Array, batch: int = 1,
                img_len: int = 16, txt_len: int = 8) -> dict:
  """Randomly initialised (unboxed) params for `config`.

  Jitted: run eagerly, every initializer call would compile on its own.
  """
  init = jax.jit(lambda r: Flux(config).init(
      r, **dummy_inputs(config, batch, img_len, txt_len))['params'])
  return nn.meta.unbox(init(rng))


def param_shapes(config: FluxConfig) -> dict:
  """Param shapes (jax.ShapeDtypeStruct tree, unboxed) without allocating."""
  return nn.meta.unbox(jax.eval_shape(
      lambda: Flux(config).init(jax.random.key(0), **dummy_inputs(config))
  )['params'])


def dummy_inputs(config: FluxConfig, batch: int = 1, img_len: int = 16,
                 txt_len: int = 8) -> dict[str, Array]:
  """Zero inputs of the right shapes, for init and shape inference.

  For a down-sampling model this includes the static `img_grid` (a square).
  """
  n = len(config.axes_dim)
  out = dict(img=jnp.zeros((batch, img_len, config.in_channels)),
             img_ids=jnp.zeros((batch, img_len, n)),
             txt=jnp.zeros((batch, txt_len, config.context_in_dim)),
             txt_ids=jnp.zeros((batch, txt_len, n)),
             timesteps=jnp.zeros((batch,)))
  if config.modulation == 'adaln':
    out['y'] = jnp.zeros((batch, config.vec_in_dim))
  if config.guidance_embed:
    out['guidance'] = jnp.zeros((batch,))
  if config.downsample_start is not None:
    side = int(round(img_len ** 0.5))
    if side * side != img_len:
      raise ValueError(f'dummy_inputs: img_len={img_len} must be a square '
                       'for a down-sampling model')
    out['img_grid'] = (side, side)
  return out
