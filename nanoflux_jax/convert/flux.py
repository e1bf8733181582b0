"""FLUX transformer import from BFL and diffusers checkpoints (and export to BFL).

Formats (auto-detected):
  * BFL: one `.safetensors` file keyed like `double_blocks.0.img_attn.qkv.weight`;
  * diffusers: a `transformer/` folder (possibly sharded, with an index json)
    keyed like `transformer_blocks.0.attn.to_q.weight`, or a whole pipeline
    folder containing one;
  * nanoflux: a folder written by `nanoflux_jax.checkpoint.save`.
The config is inferred from tensor shapes, so pruned students (per-block
widths) load like the teacher. Conversion streams one tensor at a time.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert import loading
from nanoflux_jax.convert.loading import Entry, linear, same
from nanoflux_jax.convert.safetensors_io import CheckpointError, open_tensors

CONFIG_METADATA_KEY = 'nanoflux_config'


# ----------------------------------------------------------------------------
# Small numpy transforms shared by both key maps.
# ----------------------------------------------------------------------------
def _mod(key: str, n: int, swap: bool = False) -> list[tuple[str, Entry]]:
  """Modulation Linear [n*D, D] -> kernel [D, n, D], bias [n, D]."""
  def kernel(w):
    k = w.T.reshape(w.shape[1], n, -1)
    return k[:, ::-1] if swap else k

  def bias(b):
    b = b.reshape(n, -1)
    return b[::-1] if swap else b
  return [('lin/kernel', Entry((f'{key}.weight',), kernel)),
          ('lin/bias', Entry((f'{key}.bias',), bias))]


def _dense(key: str, dst: str, bias: bool = True) -> list[tuple[str, Entry]]:
  out = [(f'{dst}/kernel', linear(f'{key}.weight'))]
  if bias:
    out.append((f'{dst}/bias', same(f'{key}.bias')))
  return out


def _qkv_fused(key: str, heads: int, hd: int, bias=True) -> list[tuple[str, Entry]]:
  """BFL fused rows laid out (3, heads, head_dim) -> kernel [D, 3, H, Dh]."""
  n = 3 * heads * hd
  out = [('qkv/kernel', Entry((f'{key}.weight',), lambda w: w[:n].T
                              .reshape(w.shape[1], 3, heads, hd)))]
  if bias:
    out.append(('qkv/bias', Entry((f'{key}.bias',),
                                  lambda b: b[:n].reshape(3, heads, hd))))
  return out


def _qkv_split(keys: tuple[str, str, str], heads: int, hd: int,
               bias=True) -> list[tuple[str, Entry]]:
  """diffusers to_q/to_k/to_v [H*Dh, D] each -> kernel [D, 3, H, Dh]."""
  stack = lambda *ws: np.stack([w.T for w in ws], 1).reshape(
      ws[0].shape[1], 3, heads, hd)
  out = [('qkv/kernel', Entry(tuple(f'{k}.weight' for k in keys), stack))]
  if bias:
    out.append(('qkv/bias', Entry(
        tuple(f'{k}.bias' for k in keys),
        lambda *bs: np.stack(bs).reshape(3, heads, hd))))
  return out


def _proj(key: str, heads: int, hd: int, bias=True) -> list[tuple[str, Entry]]:
  """Out projection [D, H*Dh(+...)] -> kernel [H, Dh, D] (first H*Dh cols)."""
  n = heads * hd
  out = [('proj/kernel', Entry((f'{key}.weight',),
                               lambda w: w[:, :n].T.reshape(heads, hd, -1)))]
  if bias:
    out.append(('proj/bias', same(f'{key}.bias')))
  return out


def _prefix(prefix: str, items) -> dict[str, Entry]:
  return {f'{prefix}/{k}': e for k, e in items}


# ----------------------------------------------------------------------------
# Key maps: our param path -> Entry, for a given config.
# ----------------------------------------------------------------------------
def _static_or_adaln(cfg: FluxConfig, key: str, dst: str, n: int,
                     swap=False) -> dict[str, Entry]:
  if cfg.modulation == 'static':  # nanoflux extension key (no BFL analogue).
    return {f'{dst}/table': same(f'{key}.table')}
  return _prefix(dst, _mod(key, n, swap))


DOWNSAMPLE_PREFIX = 'downsample'


def _downsample_shapes(cfg: FluxConfig) -> dict[str, tuple[int, ...]]:
  """'downsample/...' param path -> shape, for a down-sampling cfg."""
  if cfg.downsample_start is None:
    return {}
  import jax  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.models import downsample  # pylint: disable=g-import-not-at-top
  tree = jax.eval_shape(lambda: downsample.init_params(cfg, jax.random.key(0)))
  return {f'{DOWNSAMPLE_PREFIX}/{k}': tuple(v.shape)
          for k, v in _flatten(tree).items()}


def _downsample_key(path: str) -> str:
  """'downsample/down_res/conv1/kernel' -> 'downsample.down_res.conv1.weight'
  (kernels and GroupNorm scales are torch 'weight's, in torch layouts)."""
  *mods, leaf = path.split('/')
  return '.'.join(mods) + ('.bias' if leaf == 'bias' else '.weight')


def _downsample_plan(cfg: FluxConfig) -> dict[str, Entry]:
  """nanoflux extension keys (no BFL/diffusers analogue) of the down-sampler:
  Dense kernels as torch Linear weights, 3x3 convs as torch Conv2d weights."""
  plan = {}
  for path, shape in _downsample_shapes(cfg).items():
    key = _downsample_key(path)
    if path.endswith('/kernel'):
      plan[path] = loading.conv(key) if len(shape) == 4 else linear(key)
    else:
      plan[path] = same(key)
  return plan


def bfl_plan(cfg: FluxConfig) -> dict[str, Entry]:
  """Our param path -> Entry for a BFL checkpoint of `cfg`."""
  hd, qb = cfg.head_dim, cfg.qkv_bias
  plan = {}
  for src, dst in (('img_in', 'img_in'), ('txt_in', 'txt_in'),
                   ('final_layer.linear', 'final_linear')):
    plan.update(dict(_dense(src, dst)))
  if cfg.modulation == 'adaln':
    embedders = [('time_in', 'time_in'), ('vector_in', 'vector_in')]
    if cfg.guidance_embed:
      embedders.append(('guidance_in', 'guidance_in'))
    for src, dst in embedders:
      plan.update(dict(_dense(f'{src}.in_layer', f'{dst}/in_layer')))
      plan.update(dict(_dense(f'{src}.out_layer', f'{dst}/out_layer')))
  plan.update(_static_or_adaln(cfg, 'final_layer.adaLN_modulation.1',
                               'final_mod', 2))
  for i in range(cfg.depth):
    src, dst, h = f'double_blocks.{i}', f'double_blocks_{i}', cfg.double_heads[i]
    for s in ('img', 'txt'):
      plan.update(_static_or_adaln(cfg, f'{src}.{s}_mod.lin',
                                       f'{dst}/{s}_mod', 6))
      a = f'{src}.{s}_attn'
      plan.update(_prefix(f'{dst}/{s}_attn', _qkv_fused(f'{a}.qkv', h, hd,
                                                        bias=qb)))
      plan.update(_prefix(f'{dst}/{s}_attn', _proj(f'{a}.proj', h, hd)))
      for n in ('query', 'key'):
        plan[f'{dst}/{s}_attn/{n}_norm/scale'] = same(f'{a}.norm.{n}_norm.scale')
      plan.update(dict(_dense(f'{src}.{s}_mlp.0', f'{dst}/{s}_mlp/fc1')))
      plan.update(dict(_dense(f'{src}.{s}_mlp.2', f'{dst}/{s}_mlp/fc2')))
  for i in range(cfg.depth_single_blocks):
    src, dst, h = f'single_blocks.{i}', f'single_blocks_{i}', cfg.single_heads[i]
    n = 3 * h * hd
    plan.update(_static_or_adaln(cfg, f'{src}.modulation.lin',
                                 f'{dst}/modulation', 3))
    plan.update(_prefix(f'{dst}/attn', _qkv_fused(f'{src}.linear1', h, hd,
                                                  bias=qb)))
    plan[f'{dst}/mlp_in/kernel'] = Entry((f'{src}.linear1.weight',),
                                         lambda w, n=n: w[n:].T)
    plan[f'{dst}/mlp_in/bias'] = Entry((f'{src}.linear1.bias',),
                                       lambda b, n=n: b[n:])
    plan.update(_prefix(f'{dst}/attn', _proj(f'{src}.linear2', h, hd)))
    plan[f'{dst}/mlp_out/kernel'] = Entry((f'{src}.linear2.weight',),
                                          lambda w, n=h * hd: w[:, n:].T)
    for nm in ('query', 'key'):
      plan[f'{dst}/attn/{nm}_norm/scale'] = same(f'{src}.norm.{nm}_norm.scale')
  plan.update(_downsample_plan(cfg))
  return plan


def diffusers_plan(cfg: FluxConfig) -> dict[str, Entry]:
  """Our param path -> Entry for a diffusers FluxTransformer2DModel of `cfg`."""
  hd, qb = cfg.head_dim, cfg.qkv_bias
  plan = {}
  for src, dst in (('x_embedder', 'img_in'), ('context_embedder', 'txt_in'),
                   ('proj_out', 'final_linear')):
    plan.update(dict(_dense(src, dst)))
  if cfg.modulation == 'adaln':
    tte = 'time_text_embed'
    embedders = [('timestep_embedder', 'time_in'),
                 ('text_embedder', 'vector_in')]
    if cfg.guidance_embed:
      embedders.append(('guidance_embedder', 'guidance_in'))
    for src, dst in embedders:
      plan.update(dict(_dense(f'{tte}.{src}.linear_1', f'{dst}/in_layer')))
      plan.update(dict(_dense(f'{tte}.{src}.linear_2', f'{dst}/out_layer')))
  # diffusers' AdaLayerNormContinuous orders the halves (scale, shift).
  plan.update(_static_or_adaln(cfg, 'norm_out.linear', 'final_mod', 2,
                               swap=True))
  for i in range(cfg.depth):
    src, dst, h = f'transformer_blocks.{i}', f'double_blocks_{i}', cfg.double_heads[i]
    a = f'{src}.attn'
    for s, norm, qkv, out, ff, nq in (
        ('img', 'norm1', ('to_q', 'to_k', 'to_v'), 'to_out.0', 'ff', 'norm_'),
        ('txt', 'norm1_context', ('add_q_proj', 'add_k_proj', 'add_v_proj'),
         'to_add_out', 'ff_context', 'norm_added_')):
      plan.update(_static_or_adaln(cfg, f'{src}.{norm}.linear',
                                   f'{dst}/{s}_mod', 6))
      plan.update(_prefix(f'{dst}/{s}_attn', _qkv_split(
          tuple(f'{a}.{k}' for k in qkv), h, hd, bias=qb)))
      plan.update(_prefix(f'{dst}/{s}_attn', _proj(f'{a}.{out}', h, hd)))
      plan[f'{dst}/{s}_attn/query_norm/scale'] = same(f'{a}.{nq}q.weight')
      plan[f'{dst}/{s}_attn/key_norm/scale'] = same(f'{a}.{nq}k.weight')
      plan.update(dict(_dense(f'{src}.{ff}.net.0.proj', f'{dst}/{s}_mlp/fc1')))
      plan.update(dict(_dense(f'{src}.{ff}.net.2', f'{dst}/{s}_mlp/fc2')))
  for i in range(cfg.depth_single_blocks):
    src, dst, h = (f'single_transformer_blocks.{i}', f'single_blocks_{i}',
                   cfg.single_heads[i])
    a = f'{src}.attn'
    plan.update(_static_or_adaln(cfg, f'{src}.norm.linear',
                                 f'{dst}/modulation', 3))
    plan.update(_prefix(f'{dst}/attn', _qkv_split(
        (f'{a}.to_q', f'{a}.to_k', f'{a}.to_v'), h, hd, bias=qb)))
    plan[f'{dst}/attn/query_norm/scale'] = same(f'{a}.norm_q.weight')
    plan[f'{dst}/attn/key_norm/scale'] = same(f'{a}.norm_k.weight')
    plan.update(dict(_dense(f'{src}.proj_mlp', f'{dst}/mlp_in')))
    plan.update(_prefix(f'{dst}/attn', _proj(f'{src}.proj_out', h, hd)))
    plan[f'{dst}/mlp_out/kernel'] = Entry((f'{src}.proj_out.weight',),
                                          lambda w, n=h * hd: w[:, n:].T)
  plan.update(_downsample_plan(cfg))
  return plan


# ----------------------------------------------------------------------------
# Config inference from tensor shapes.
# ----------------------------------------------------------------------------
def _count_blocks(keys, prefix: str, origin: str) -> int:
  idx = {int(m.group(1)) for k in keys
         if (m := re.match(re.escape(prefix) + r'\.(\d+)\.', k))}
  if idx and idx != set(range(max(idx) + 1)):
    raise CheckpointError(f'{origin}: {prefix} block indices are not '
                          f'contiguous: missing {sorted(set(range(max(idx) + 1)) - idx)}')
  return len(idx)


def _need(shape, keys, key: str, origin: str):
  if key not in keys:
    raise CheckpointError(f'{origin}: missing key {key!r} (needed to infer '
                          'the model config)')
  return shape(key)


def _infer_downsample(cfg: dict[str, Any], keys, shape, origin: str):
  """Down-sampler fields from its extension keys; its block range can only
  come from the stored nanoflux config (`base`)."""
  if f'{DOWNSAMPLE_PREFIX}.down_proj.weight' not in keys:
    if cfg.get('downsample_start') is not None:
      raise CheckpointError(
          f'{origin}: the stored config down-samples blocks '
          f'[{cfg["downsample_start"]}, {cfg.get("downsample_end")}] but '
          f'there is no {DOWNSAMPLE_PREFIX}.down_proj.weight')
    cfg.update(downsample_start=None, downsample_end=None)
    return
  if cfg.get('downsample_start') is None or cfg.get('downsample_end') is None:
    raise CheckpointError(
        f'{origin}: has down-sampler keys ({DOWNSAMPLE_PREFIX}.*) but no '
        f'nanoflux config metadata giving downsample_start/end')
  d, fd = shape(f'{DOWNSAMPLE_PREFIX}.down_proj.weight')
  f = int(round((fd // d) ** 0.5))
  if f * f * d != fd:
    raise CheckpointError(f'{origin}: {DOWNSAMPLE_PREFIX}.down_proj.weight '
                          f'shape {(d, fd)} is not [D, f*f*D]')
  c = shape(f'{DOWNSAMPLE_PREFIX}.down_res.conv1.weight')[0]
  cfg['downsample_factor'] = f
  if (cfg.get('downsample_channels') or max(d // 4, 1)) != c:
    cfg['downsample_channels'] = c


def infer_config(source, fmt: str, base: dict[str, Any]) -> FluxConfig:
  """Infers a FluxConfig from the tensor shapes of a BFL/diffusers source.

  `base` supplies what shapes cannot tell (axes_dim, theta, static
  timesteps, ...), e.g. from a config.json or nanoflux metadata.
  """
  keys, origin = set(source), source.origin
  shape = lambda k: _need(source.shape, keys, k, origin)
  bfl = fmt == 'bfl'
  dbl, sgl = (('double_blocks', 'single_blocks') if bfl else
              ('transformer_blocks', 'single_transformer_blocks'))
  hidden, in_ch = shape('img_in.weight' if bfl else 'x_embedder.weight')
  cfg = dict(base)
  cfg.update(
      hidden_size=hidden, in_channels=in_ch,
      context_in_dim=shape('txt_in.weight' if bfl else
                           'context_embedder.weight')[1],
      out_channels=shape('final_layer.linear.weight' if bfl else
                         'proj_out.weight')[0],
      depth=_count_blocks(keys, dbl, origin),
      depth_single_blocks=_count_blocks(keys, sgl, origin))
  if cfg['out_channels'] == in_ch:
    cfg['out_channels'] = None
  final_mod = ('final_layer.adaLN_modulation.1' if bfl else 'norm_out.linear')
  cfg['modulation'] = 'static' if f'{final_mod}.table' in keys else 'adaln'
  if cfg['modulation'] == 'adaln':
    cfg['vec_in_dim'] = shape('vector_in.in_layer.weight' if bfl else
                              'time_text_embed.text_embedder.linear_1.weight')[1]
    cfg['guidance_embed'] = ('guidance_in.in_layer.weight' if bfl else
                             'time_text_embed.guidance_embedder.linear_1.weight'
                             ) in keys
  else:
    n_steps = shape(f'{final_mod}.table')[0]
    if len(cfg.get('static_timesteps', ())) != n_steps:
      raise CheckpointError(
          f'{origin}: static-modulation tables have {n_steps} rows but the '
          f'stored config lists timesteps {cfg.get("static_timesteps")}')
  if cfg['depth']:
    norm = ('double_blocks.0.img_attn.norm.query_norm.scale' if bfl else
            'transformer_blocks.0.attn.norm_q.weight')
  else:
    norm = ('single_blocks.0.norm.query_norm.scale' if bfl else
            'single_transformer_blocks.0.attn.norm_q.weight')
  hd = shape(norm)[0]
  cfg['head_dim'] = hd
  dh, dmi, dmt, sh, sm = [], [], [], [], []
  for i in range(cfg['depth']):
    b = f'{dbl}.{i}'
    if bfl:
      dh.append(shape(f'{b}.img_attn.qkv.weight')[0] // (3 * hd))
      dmi.append(shape(f'{b}.img_mlp.0.weight')[0])
      dmt.append(shape(f'{b}.txt_mlp.0.weight')[0])
    else:
      dh.append(shape(f'{b}.attn.to_q.weight')[0] // hd)
      dmi.append(shape(f'{b}.ff.net.0.proj.weight')[0])
      dmt.append(shape(f'{b}.ff_context.net.0.proj.weight')[0])
  for i in range(cfg['depth_single_blocks']):
    b = f'{sgl}.{i}'
    if bfl:  # linear1: 3*H*Dh + mlp rows; linear2: H*Dh + mlp columns.
      a, c = shape(f'{b}.linear1.weight')[0], shape(f'{b}.linear2.weight')[1]
      attn = (a - c) // 2
      sh.append(attn // hd)
      sm.append(c - attn)
    else:
      sh.append(shape(f'{b}.attn.to_q.weight')[0] // hd)
      sm.append(shape(f'{b}.proj_mlp.weight')[0])
  heads = dh + sh
  mlps = dmi + dmt + sm
  cfg.update(double_heads=tuple(dh), double_mlp_img=tuple(dmi),
             double_mlp_txt=tuple(dmt), single_heads=tuple(sh),
             single_mlp=tuple(sm), num_heads=max(heads),
             mlp_ratio=max(mlps) / hidden if mlps else 4.0)
  qkv = (f'{dbl}.0.img_attn.qkv.bias' if bfl else f'{dbl}.0.attn.to_q.bias'
         ) if cfg['depth'] else (f'{sgl}.0.linear1.bias' if bfl else
                                 f'{sgl}.0.attn.to_q.bias')
  cfg['qkv_bias'] = qkv in keys
  _infer_downsample(cfg, keys, shape, origin)
  if 'axes_dim' not in cfg:
    if hd != 128:
      raise CheckpointError(
          f'{origin}: cannot infer the RoPE axes_dim for head_dim {hd} (only '
          'FLUX.1\'s 128 -> (16, 56, 56) is known); pass axes_dim=')
    cfg['axes_dim'] = (16, 56, 56)
  try:
    return FluxConfig.from_dict(cfg)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{origin}: inconsistent model config: {e}') from e


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------
def _resolve(path: str) -> tuple[str, str]:
  """-> (format, path of the transformer's file or folder)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such file or folder')
  if os.path.isdir(path):
    from nanoflux_jax import checkpoint  # pylint: disable=g-import-not-at-top
    if checkpoint.is_checkpoint(path):
      return 'nanoflux', path
    if os.path.exists(os.path.join(path, 'model_index.json')):
      sub = os.path.join(path, 'transformer')
      if not os.path.isdir(sub):
        raise CheckpointError(f'{path}: pipeline folder has no transformer/')
      return _resolve(sub)
  return 'sniff', path


# diffusers FluxTransformer2DModel config.json key -> our FluxConfig field.
_DIFFUSERS_FIELDS = {
    'num_layers': 'depth', 'num_single_layers': 'depth_single_blocks',
    'attention_head_dim': 'head_dim', 'num_attention_heads': 'num_heads',
    'in_channels': 'in_channels', 'out_channels': 'out_dim',
    'joint_attention_dim': 'context_in_dim',
    'pooled_projection_dim': 'vec_in_dim', 'guidance_embeds': 'guidance_embed'}
# FluxConfig fields that a checkpoint's tensors determine, checked against a
# stored nanoflux config (per-block widths rather than num_heads/mlp_ratio,
# which a pruned student keeps from its teacher).
_TENSOR_FIELDS = (
    'in_channels', 'out_dim', 'hidden_size', 'context_in_dim', 'vec_in_dim',
    'depth', 'depth_single_blocks', 'head_dim', 'guidance_embed', 'qkv_bias',
    'modulation', 'double_heads', 'double_mlp_img', 'double_mlp_txt',
    'single_heads', 'single_mlp')


def _diffusers_base(path: str) -> tuple[dict[str, Any], dict[str, Any], str]:
  """-> (base config fields, stored fields to check, config.json path)."""
  if not os.path.isfile(os.path.join(path, 'config.json')):
    return {}, {}, ''
  cfg_file, c = loading.read_config_json(path)
  if c.get('patch_size', 1) != 1:
    raise CheckpointError(f'{cfg_file}: patch_size {c["patch_size"]} '
                          'is not supported (FLUX uses 1)')
  stored = {ours: c[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items()
            if c.get(theirs) is not None}
  base = {}
  if 'axes_dims_rope' in c:
    if not isinstance(c['axes_dims_rope'], list):
      raise CheckpointError(f'{cfg_file}: axes_dims_rope='
                            f'{c["axes_dims_rope"]!r} is not a list')
    base['axes_dim'] = tuple(c['axes_dims_rope'])
  return base, stored, cfg_file


def _stored_metadata(source, path: str) -> dict[str, Any]:
  """The nanoflux config kept in a BFL file's metadata ({} when absent)."""
  if CONFIG_METADATA_KEY not in source.metadata:
    return {}
  try:
    meta = json.loads(source.metadata[CONFIG_METADATA_KEY])
  except (TypeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{path}: corrupt {CONFIG_METADATA_KEY} metadata: '
                          f'{e}') from e
  if not isinstance(meta, dict):
    raise CheckpointError(f'{path}: corrupt {CONFIG_METADATA_KEY} metadata: '
                          'not a JSON object')
  return meta


def _check_stored(cfg: FluxConfig, stored: dict[str, Any], where: str,
                  fields) -> None:
  """Raises when a config stored with the tensors disagrees with them.

  A checkpoint whose last blocks were dropped would otherwise load as a
  smaller model; its stored depth gives it away.
  """
  errors = []
  for field in fields:
    if field not in stored:
      continue
    want = stored[field]
    have = getattr(cfg, field)
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
    if norm(want) != norm(have):
      errors.append(f'{field}: stored {want!r}, tensors give {have!r}')
  if errors:
    raise CheckpointError(f'{where}: the stored config does not match the '
                          'tensors (a truncated or edited checkpoint?):\n  ' +
                          '\n  '.join(errors))


def load_flux_transformer(path: str, dtype=None, *, shardings=None,
                          axes_dim=None, progress: bool = False,
                          nonfinite: str = 'warn', **config_overrides):
  """Loads a FLUX transformer checkpoint into (FluxConfig, params).

  Args:
    path: a BFL `.safetensors` file, a diffusers `transformer/` folder
      (sharded or not), a diffusers pipeline folder, or a nanoflux checkpoint.
    dtype: cast params to this dtype (also becomes the config's param_dtype);
      None keeps the stored dtype.
    shardings: a pytree of jax Shardings matching the params, or a callable
      (config, param_shapes) -> such a pytree; each tensor is placed onto its
      sharding as soon as it is converted.
    axes_dim: RoPE axes split, needed for BFL files of non-FLUX head dims.
    progress: show a progress bar.
    nonfinite: a param with NaN / inf values: 'warn' (names it in the log),
      'error' (CheckpointError) or 'ignore'.
    **config_overrides: e.g. attention_impl='xla', remat=True, dtype='bfloat16'.
  Returns:
    (config, params) with params a nested dict of jax arrays.
  Raises:
    CheckpointError: the path, keys, dtypes or shapes are wrong, or the
      tensors disagree with a stored config (BFL metadata, config.json);
      names the file/keys.
  """
  loading.check_nonfinite_option(nonfinite)
  from nanoflux_jax.models import flux as flux_model  # pylint: disable=g-import-not-at-top
  fmt, path = _resolve(path)
  if fmt == 'nanoflux':
    from nanoflux_jax import checkpoint  # pylint: disable=g-import-not-at-top
    return checkpoint.load(path, dtype=dtype, shardings=shardings,
                           **config_overrides)
  source = open_tensors(path)
  try:
    keys = set(source)
    if 'img_in.weight' in keys:
      fmt = 'bfl'
    elif 'x_embedder.weight' in keys:
      fmt = 'diffusers'
    else:
      raise CheckpointError(
          f'{path}: not a FLUX transformer checkpoint (no img_in.weight or '
          f'x_embedder.weight; first keys: {sorted(keys)[:5]})')
    base, stored, cfg_file = (_diffusers_base(path) if fmt == 'diffusers'
                              else ({}, {}, ''))
    meta = _stored_metadata(source, path)
    base.update(meta)
    if axes_dim is not None:
      base['axes_dim'] = tuple(axes_dim)
    cfg = infer_config(source, fmt, base)
    _check_stored(cfg, stored, cfg_file, _DIFFUSERS_FIELDS.values())
    if meta:
      out_dim = meta.get('out_channels') or meta.get('in_channels')
      meta = dict(meta, **({'out_dim': out_dim} if out_dim else {}))
      _check_stored(cfg, meta, f'{path} ({CONFIG_METADATA_KEY} metadata)',
                    _TENSOR_FIELDS)
    if dtype is not None:
      cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
    if config_overrides:
      cfg = cfg.replace(**config_overrides)
    # Files hold one tensor per block: load unrolled, then stack the runs
    # a scan_blocks config scans (each stacked array on its sharding).
    flat = cfg.replace(scan_blocks=False)
    target = flux_model.param_shapes(flat)
    if callable(shardings):
      shardings = shardings(cfg, flux_model.param_shapes(cfg))
    plan = bfl_plan(flat) if fmt == 'bfl' else diffusers_plan(flat)
    params = loading.load_strict(
        source, plan, target, dtype=dtype, origin=path, progress=progress,
        nonfinite=nonfinite, shardings=None if shardings is None else
        flux_model.unscan_params(cfg, shardings, take=_layer_sharding))
  finally:
    source.close()
  if cfg.scan_blocks:
    params = flux_model.scan_params(cfg, params)
    if shardings is not None:
      params = jax.device_put(params, shardings)
  return cfg, params


def _layer_sharding(s, i):
  """The sharding of one layer of a stacked param: its spec minus the
  leading 'layers' entry (other shardings are whole-array already)."""
  del i
  if not isinstance(s, NamedSharding):
    return s
  return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))


def to_bfl_state_dict(cfg: FluxConfig, params) -> dict[str, np.ndarray]:
  """Our params -> a BFL-keyed state dict (torch layouts), the inverse of
  `bfl_plan`. Static-modulation tables keep a `.table` suffix; the token
  down-sampler is stored under `downsample.*` extension keys."""
  from nanoflux_jax.models import flux as flux_model  # pylint: disable=g-import-not-at-top
  params = flux_model.unscan_params(cfg, params)  # Files hold every block.
  p = {k: np.asarray(v) for k, v in _flatten(params).items()}
  out: dict[str, np.ndarray] = {}
  lin = lambda dst, src, bias=True: out.update(
      {f'{dst}.weight': p[f'{src}/kernel'].T,
       **({f'{dst}.bias': p[f'{src}/bias']} if bias else {})})

  def mod(dst, src):
    if f'{src}/table' in p:
      out[f'{dst}.table'] = p[f'{src}/table']
    else:
      k = p[f'{src}/lin/kernel']
      out[f'{dst}.weight'] = k.reshape(k.shape[0], -1).T
      out[f'{dst}.bias'] = p[f'{src}/lin/bias'].reshape(-1)

  def qkv_rows(src):
    k = p[f'{src}/qkv/kernel']
    return k.reshape(k.shape[0], -1).T, p.get(f'{src}/qkv/bias')

  def proj_cols(src):
    k = p[f'{src}/proj/kernel']
    return k.reshape(-1, k.shape[-1]).T

  for dst, src in (('img_in', 'img_in'), ('txt_in', 'txt_in'),
                   ('final_layer.linear', 'final_linear')):
    lin(dst, src)
  for name in ('time_in', 'vector_in', 'guidance_in'):
    if f'{name}/in_layer/kernel' in p:
      lin(f'{name}.in_layer', f'{name}/in_layer')
      lin(f'{name}.out_layer', f'{name}/out_layer')
  mod('final_layer.adaLN_modulation.1', 'final_mod')
  for i in range(cfg.depth):
    for s in ('img', 'txt'):
      d, b = f'double_blocks.{i}.{s}', f'double_blocks_{i}/{s}'
      mod(f'{d}_mod.lin', f'{b}_mod')
      w, bias = qkv_rows(f'{b}_attn')
      out[f'{d}_attn.qkv.weight'] = w
      if bias is not None:
        out[f'{d}_attn.qkv.bias'] = bias.reshape(-1)
      out[f'{d}_attn.proj.weight'] = proj_cols(f'{b}_attn')
      out[f'{d}_attn.proj.bias'] = p[f'{b}_attn/proj/bias']
      for n in ('query', 'key'):
        out[f'{d}_attn.norm.{n}_norm.scale'] = p[f'{b}_attn/{n}_norm/scale']
      lin(f'{d}_mlp.0', f'{b}_mlp/fc1')
      lin(f'{d}_mlp.2', f'{b}_mlp/fc2')
  for i in range(cfg.depth_single_blocks):
    d, b = f'single_blocks.{i}', f'single_blocks_{i}'
    mod(f'{d}.modulation.lin', f'{b}/modulation')
    w, bias = qkv_rows(f'{b}/attn')
    out[f'{d}.linear1.weight'] = np.concatenate(
        [w, p[f'{b}/mlp_in/kernel'].T], 0)
    if bias is not None:
      out[f'{d}.linear1.bias'] = np.concatenate(
          [bias.reshape(-1), p[f'{b}/mlp_in/bias']])
    out[f'{d}.linear2.weight'] = np.concatenate(
        [proj_cols(f'{b}/attn'), p[f'{b}/mlp_out/kernel'].T], 1)
    out[f'{d}.linear2.bias'] = p[f'{b}/attn/proj/bias']
    for n in ('query', 'key'):
      out[f'{d}.norm.{n}_norm.scale'] = p[f'{b}/attn/{n}_norm/scale']
  for path, v in p.items():  # nanoflux extension keys, torch layouts.
    if path.startswith(f'{DOWNSAMPLE_PREFIX}/'):
      if path.endswith('/kernel'):
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
      out[_downsample_key(path)] = v
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_bfl(path: str, cfg: FluxConfig, params) -> None:
  """Writes a BFL-format .safetensors file (config kept in its metadata)."""
  from nanoflux_jax.convert.safetensors_io import save_file  # pylint: disable=g-import-not-at-top
  save_file(to_bfl_state_dict(cfg, params), path,
            metadata={CONFIG_METADATA_KEY: cfg.to_json()})


def _flatten(params) -> dict[str, Any]:
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(params, sep='/')
