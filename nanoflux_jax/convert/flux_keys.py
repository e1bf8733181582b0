"""FLUX transformer key maps: our param paths <-> BFL / diffusers keys.

`bfl_plan(cfg)` and `diffusers_plan(cfg)` map each of our param paths to an
`Entry` (its source keys and the numpy transform: transpose, reshape, split
or concatenate, in torch layouts); `to_bfl_state_dict` is the inverse of
`bfl_plan`. Static-modulation tables and the token down-sampler have no
BFL / diffusers analogue and use nanoflux extension keys.
"""
from __future__ import annotations

from flax import traverse_util
import jax
import numpy as np

from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert import loading
from nanoflux_jax.convert.loading import Entry, linear, same
from nanoflux_jax.models import downsample
from nanoflux_jax.models import scan_blocks


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


def to_bfl_state_dict(cfg: FluxConfig, params) -> dict[str, np.ndarray]:
  """Our params -> a BFL-keyed state dict (torch layouts), the inverse of
  `bfl_plan`. Static-modulation tables keep a `.table` suffix; the token
  down-sampler is stored under `downsample.*` extension keys."""
  params = scan_blocks.unscan_params(cfg, params)  # Files hold every block.
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


def _flatten(params) -> dict:
  """{'a/b/kernel': leaf} of a nested params dict."""
  return traverse_util.flatten_dict(params, sep='/')
