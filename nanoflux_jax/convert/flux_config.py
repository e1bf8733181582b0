"""FluxConfig inference for BFL / diffusers checkpoints.

The config comes from the tensor shapes (so pruned students, with per-block
widths, load like the teacher), completed by what shapes cannot tell (RoPE
axes, static timesteps, the down-sampler's block range) from a diffusers
config.json or the nanoflux config kept in a BFL file's metadata; a stored
config that disagrees with the tensors is an error.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert import loading
from nanoflux_jax.convert.flux_keys import DOWNSAMPLE_PREFIX
from nanoflux_jax.errors import CheckpointError

CONFIG_METADATA_KEY = 'nanoflux_config'


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


def source_config(source, fmt: str, path: str, axes_dim=None) -> FluxConfig:
  """The FluxConfig of a BFL / diffusers ('bfl' / 'diffusers' `fmt`) tensor
  source read from `path`: inferred from its shapes and completed by its
  config.json (diffusers) or nanoflux metadata (BFL), checked against both.

  Raises:
    CheckpointError: a stored config disagrees with the tensors, or the
      shapes are inconsistent; names the file.
  """
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
  return cfg
