"""Per-rung, per-device memory plan of a ladder, before anything is launched.

`plan_ladder(config, mesh, hbm_bytes)` walks the ladder's rungs the way
`ladder.run_ladder` does, but on shapes only: every student is what the
rung's real transform (`compress.prune`, `remove_blocks`,
`to_static_modulation`, `add_downsampler`) returns under `jax.eval_shape`,
and every byte count is the shard of an array on one device under
`parallel.RULES` (`NamedSharding.shard_shape`). Nothing is allocated, and
the mesh may be an `AbstractMesh` of any size (`abstract_mesh`), so a
64-device plan runs on a laptop.

Per rung and device it reports the frozen teacher's params (the DiT; for the
text-encoder rung also T5-XXL), the student's params, their gradients, the
optimizer state (AdamW's two moments, in the params' dtype), the batch, an
activation estimate (`activation_bytes`: rematerialised blocks keep only
their inputs; one block's working set at a time), FSDP's whole-tensor copies
(`gathered_bytes`), the total against the budget, and the largest tensor.
The gradients column holds two param-shaped trees (the gradients and the
optimizer's updates). The transient terms were checked against XLA:CPU's
memory_analysis of the real step on one scaled model (the test); TPU's
scheduler may free gathered weights sooner, so the plan errs high.

`lower_train_step` builds the real distillation train step (the one
`trainer.train` runs) from abstract shapes, so tests can hold the plan
against XLA's `compile().memory_analysis()`.

Data-dependent choices are planned with their expected sizes: pruning keeps
`round(keep * width)` units in every block (scope='block'; 'global' keeps
the same total, unevenly), a depth rung with keep_blocks keeps double and
single blocks in proportion.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from nanoflux_jax import compress
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig, T5Config
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import flux as flux_lib

GIB = 1024 ** 3
_ITEM = {'float32': 4, 'bfloat16': 2, 'float16': 2}


# ---------------------------------------------------------------------------
# Bytes of sharded abstract trees.
# ---------------------------------------------------------------------------
def abstract_mesh(spec, num_devices: int) -> AbstractMesh:
  """A (data, fsdp, tensor) AbstractMesh of num_devices (no devices needed)."""
  shape = parallel.mesh_shape(spec, num_devices)
  return AbstractMesh(shape, parallel.MESH_AXES)


def shard_bytes(x, sharding) -> int:
  """Bytes of x's shard on one device."""
  shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else (
      x.shape)
  return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree, shardings=None) -> int:
  """Per-device bytes of an abstract (or concrete) tree under shardings."""
  leaves = jax.tree.leaves(tree)
  shs = ([None] * len(leaves) if shardings is None else
         jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
             s, NamedSharding)))
  return sum(shard_bytes(x, s) for x, s in zip(leaves, shs))


def largest(tree, shardings, prefix: str = '') -> tuple[int, str]:
  """(per-device bytes, 'path [shape] dtype') of the largest shard."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  shs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(
      s, NamedSharding))
  best = (0, '')
  for (path, x), s in zip(flat, shs):
    b = shard_bytes(x, s)
    if b > best[0]:
      name = jax.tree_util.keystr(path, simple=True, separator='/')
      best = (b, f'{prefix}{name} {list(x.shape)} {np.dtype(x.dtype).name}')
  return best


# ---------------------------------------------------------------------------
# Students on shapes: each rung's real transform under eval_shape.
# ---------------------------------------------------------------------------
def _abstract_params(cfg: FluxConfig, dtype: str | None):
  shapes = flux_lib.param_shapes(cfg)
  if dtype is None:
    return shapes
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def _shaped(transform, params):
  """(cfg, abstract params) of transform(params) -> (cfg, params)."""
  box = {}

  def run(p):
    cfg, out = transform(p)
    box['cfg'] = cfg
    return out
  out = jax.eval_shape(run, params)
  return box['cfg'], out


def _uniform_mask(cfg: FluxConfig, keep_heads, keep_mlp, keep_flags=None):
  keep = lambda n, r: np.asarray(
      [1.0] * max(1, round(n * r)) + [0.0] * (n - max(1, round(n * r))),
      np.float32) if r is not None else np.ones(n, np.float32)
  m = compress.PruneMask(
      double_heads=tuple(keep(n, keep_heads) for n in cfg.double_heads),
      double_mlp_img=tuple(keep(n, keep_mlp) for n in cfg.double_mlp_img),
      double_mlp_txt=tuple(keep(n, keep_mlp) for n in cfg.double_mlp_txt),
      single_heads=tuple(keep(n, keep_heads) for n in cfg.single_heads),
      single_mlp=tuple(keep(n, keep_mlp) for n in cfg.single_mlp),
      double_blocks=np.ones(cfg.depth, np.float32),
      single_blocks=np.ones(cfg.depth_single_blocks, np.float32))
  return m


def _keep_flags(cfg: FluxConfig, opts) -> np.ndarray:
  n = cfg.num_blocks
  if opts.get('keep') is not None:
    flags = np.zeros(n, bool)
    flags[np.asarray(opts['keep'], int)] = True
    return flags
  k = opts['keep_blocks']
  k = int(round(k * n)) if isinstance(k, float) else int(k)
  kd = int(round(cfg.depth * k / n))
  flags = np.zeros(n, bool)
  flags[:kd] = True
  flags[cfg.depth:cfg.depth + (k - kd)] = True
  return flags


def transform_shapes(kind: str, cfg: FluxConfig, params, opts,
                     schedule: Sequence[float], vec_in_dim: int):
  """(cfg, abstract params) after a rung of `kind` (shapes only)."""
  if kind == 'prune':
    mask = _uniform_mask(cfg, opts.get('keep_heads'), opts.get('keep_mlp'))
    return _shaped(lambda p: compress.prune(cfg, p, mask), params)
  if kind == 'depth':
    # remove_blocks(merge=...) is prune with block flags: the same shapes.
    flags = _keep_flags(cfg, opts).astype(np.float32)
    mask = _uniform_mask(cfg, None, None).replace(
        double_blocks=flags[:cfg.depth], single_blocks=flags[cfg.depth:])
    return _shaped(lambda p: compress.prune(cfg, p, mask), params)
  if kind == 'static_modulation':
    pooled = jax.ShapeDtypeStruct((2, vec_in_dim), jnp.float32)
    box = {}

    def run(p, y):
      c, out = compress.to_static_modulation(
          cfg, p, schedule[:-1], y, guidance=opts.get('guidance'))
      box['cfg'] = c
      return out
    out = jax.eval_shape(run, params, pooled)
    return box['cfg'], out
  if kind == 'downsample':
    n = cfg.num_blocks
    start, end = (v % n if v < 0 else v for v in (opts['start'],
                                                  opts['end']))
    return _shaped(lambda p: compress.add_downsampler(
        cfg, p, start, end, jax.random.PRNGKey(0), opts.get('factor', 2),
        opts.get('channels', 0)), params)
  return cfg, params


# ---------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------
def _blocks(cfg: FluxConfig, img_len: int, txt_len: int):
  """[(kind, index, heads, mlp widths, img tokens)] of every block."""
  out = []
  f2 = cfg.downsample_factor ** 2
  for g in range(cfg.num_blocks):
    down = (cfg.downsample_start is not None and
            cfg.downsample_start <= g <= cfg.downsample_end)
    li = img_len // f2 if down else img_len
    if g < cfg.depth:
      out.append(('double', cfg.double_heads[g],
                  (cfg.double_mlp_img[g], cfg.double_mlp_txt[g]), li))
    else:
      j = g - cfg.depth
      out.append(('single', cfg.single_heads[j], (cfg.single_mlp[j],), li))
  return out


def _tp(n: int, tensor: int) -> int:
  """Per-device share of n heads / channels on the tensor axis (_fit)."""
  return n // tensor if n % tensor == 0 else n


def _block_work(cfg: FluxConfig, heads, mlps, li, lt, b, tensor, act,
                attention: str, backward: bool) -> int:
  """Live bytes while one block runs (forward, or recompute + backward)."""
  d, dh = cfg.hidden_size, cfg.head_dim
  h = _tp(heads, tensor)
  length = li + lt
  m = sum(_tp(x, tensor) * (li if i == 0 else lt) for i, x in
          enumerate(mlps)) if len(mlps) == 2 else _tp(mlps[0], tensor) * length
  # Residual in/out, two normalised + modulated copies, q/k/v (and RoPE'd
  # q/k), the attention output, the MLP hidden before and after GELU.
  tok = length * (4 * d + 6 * h * dh) + 2 * m
  work = b * tok * act
  if attention in ('xla',):  # [B, H, L, L] logits and probs, fp32.
    work += 2 * b * h * length * length * 4
  elif attention in ('per_head',):
    work += 2 * b * length * length * 4
  return work * (2 if backward else 1)


def activation_bytes(student: FluxConfig, teacher: FluxConfig | None,
                     grid, txt_len: int, micro_batch: int, tensor: int,
                     compute_dtype: str, attention: str, *,
                     num_steps: int = 4, feature_pairs: int = 0,
                     cached_trajectory: bool = False) -> int:
  """Estimated per-device activation bytes of one distillation step.

  Rematerialised student blocks keep their inputs ([b, L, D] each) for the
  backward; one block at a time holds its working set twice (recompute and
  backward). The teacher runs without gradient (its trajectory of
  num_steps forwards, unless cached, plus the output-KD forward), so only
  one block's working set is live, plus the features feature KD compares.
  """
  act = _ITEM[compute_dtype]
  li = grid[0] * grid[1]
  b = micro_batch
  blocks = _blocks(student, li, txt_len)
  d = student.hidden_size
  saved = sum(b * (x[3] + txt_len) * d * act for x in blocks)
  if not student.remat:  # Every block's working set is kept.
    saved = sum(_block_work(student, x[1], x[2], x[3], txt_len, b, tensor,
                            act, attention, False) for x in blocks)
  peak = max(_block_work(student, x[1], x[2], x[3], txt_len, b, tensor, act,
                         attention, True) for x in blocks)
  # Outputs, targets, trajectory states: a few [b, Li, C] fp32 arrays.
  io = (num_steps + 6) * b * li * student.in_channels * 4
  feats = feature_pairs * b * li * d * act * 2
  t_peak = 0
  if teacher is not None:
    t_peak = max(_block_work(teacher, x[1], x[2], x[3], txt_len, b, tensor,
                             act, attention, False)
                 for x in _blocks(teacher, li, txt_len))
  return int(saved + max(peak, t_peak) + io + feats)


def gathered_block_bytes(cfg: FluxConfig, params, compute_dtype: str) -> int:
  """One block's params gathered whole in the compute dtype (FSDP)."""
  act = _ITEM[compute_dtype]
  return max(sum(int(math.prod(x.shape)) for x in jax.tree.leaves(v)) * act
             for k, v in params.items()
             if k.startswith(('double_blocks_', 'single_blocks_')))


def gathered_bytes(cfg: FluxConfig, params, compute_dtype: str,
                   grads: bool) -> int:
  """FSDP's transient whole-tensor copies per device during the step.

  Unrolled blocks (scan_blocks=False): XLA keeps every block's gathered
  params (compute dtype) from the forward to the rematerialised backward,
  and (grads=True) the gradients whole in fp32 before their
  reduce-scatter. Scanned blocks: two blocks' worth (the current one and
  the next, prefetched). Measured on XLA:CPU (tests/test_memory_plan.py);
  TPU's latency-hiding scheduler may free them sooner, so this errs high.
  """
  n_all = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))
  if cfg.scan_blocks:
    n_all = 2 * gathered_block_bytes(cfg, params, 'float32') // 4
  return n_all * (_ITEM[compute_dtype] + (4 if grads else 0))


# ---------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class RungPlan:
  name: str
  teacher: int           # frozen teacher params (DiT, + T5-XXL for te).
  student: int           # trainable params.
  grads: int
  opt_state: int
  batch: int
  activations: int       # estimate (remat).
  gathered: int          # FSDP: params gathered whole + gradient buffers.
  budget: int
  largest: str
  largest_bytes: int
  params_count: int = 0  # trainable params (whole model).
  notes: tuple[str, ...] = ()

  @property
  def total(self) -> int:
    return (self.teacher + self.student + self.grads + self.opt_state +
            self.batch + self.activations + self.gathered)

  @property
  def fits(self) -> bool:
    return self.total <= self.budget


def _rung_config(config, rung) -> ml_collections.ConfigDict:
  from nanoflux_jax.distill import rungs  # pylint: disable=g-import-not-at-top
  dc = copy.deepcopy(config.distill)
  if rung.get('kind') != 'text_encoder':
    rungs.override(dc, dict(rung.get('distill', {}) or {}),
                   f"rung {rung.get('kind')}")
  return dc


def _state_parts(c, params, shardings, mesh):
  """Per-device (params, grads, opt state) bytes of a TrainState."""
  tx = trainer.make_optimizer(c)
  st_sh = trainer.state_shardings(tx, params, shardings, mesh)
  opt = jax.eval_shape(tx.init, params)
  p = tree_bytes(params, shardings)
  return p, p, tree_bytes(opt, st_sh.opt_state)


def _dit_shardings(cfg: FluxConfig, mesh):
  return parallel.param_shardings(cfg, mesh)


def _micro_batch(c, mesh) -> tuple[int, list[str]]:
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  per_step = c.batch_size // c.grad_accum
  if per_step % shards:
    return per_step, [f'batch {per_step} does not split over {shards} batch '
                      'shards: every device runs all of it (and to_global '
                      'raises); use a batch divisible by data*fsdp or a '
                      'tensor axis']
  return per_step // shards, []


def dit_rung_plan(name: str, c, s_cfg: FluxConfig, s_params,
                  t_cfg: FluxConfig | None, t_params, mesh, budget: int,
                  attention: str) -> RungPlan:
  """The plan of one DiT distillation (trainer.train) on `mesh`."""
  s_cfg = s_cfg.replace(remat=c.remat)
  s_sh = _dit_shardings(s_cfg, mesh)
  sp, g, o = _state_parts(c, {'student': s_params}, {'student': s_sh}, mesh)
  g *= 2  # The gradients and the optimizer's update tree.
  tb = 0
  lg = largest(s_params, s_sh, 'student/')
  gathered = gathered_bytes(s_cfg, s_params, c.compute_dtype, grads=True)
  if t_cfg is not None:
    t_sh = _dit_shardings(t_cfg, mesh)
    tb = tree_bytes(t_params, t_sh)
    lg = max(lg, largest(t_params, t_sh, 'teacher/'))
    gathered += gathered_bytes(t_cfg, t_params, c.compute_dtype, grads=False)
  b, notes = _micro_batch(c, mesh)
  grid = tuple(c.data.grid)
  li, lt = grid[0] * grid[1], c.data.txt_len
  batch = c.batch_size // max(1, mesh.shape['data'] * mesh.shape['fsdp']) * (
      lt * s_cfg.context_in_dim + s_cfg.vec_in_dim +
      li * s_cfg.in_channels) * 4 if not notes else c.batch_size * (
          lt * s_cfg.context_in_dim + s_cfg.vec_in_dim +
          li * s_cfg.in_channels) * 4
  w = dict(c.loss.weights)
  pairs = (len(c.loss.feature_pairs) if w.get('feature_kd', 0) > 0 and
           c.loss.feature_pairs != 'identity' else
           (s_cfg.num_blocks if w.get('feature_kd', 0) > 0 else 0))
  act = activation_bytes(
      s_cfg, t_cfg, grid, lt, b, mesh.shape['tensor'], c.compute_dtype,
      attention, num_steps=c.num_sampling_steps, feature_pairs=pairs,
      cached_trajectory=bool(c.data.get('cache_dir')))
  n = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(s_params))
  return RungPlan(name, tb, sp, g, o, int(batch), int(act), int(gathered),
                  budget, lg[1], lg[0], n, tuple(notes))


def _t5_plan(name, config, rung, student: tuple, mesh, budget, attention):
  """The text-encoder rung: T5-XXL (frozen) + denoiser (frozen) + student."""
  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.distill import rungs
  from nanoflux_jax.distill import text_encoder
  from nanoflux_jax.models.t5 import StudentTextEncoder, T5Encoder
  tc = rungs._text_encoder_config(config, rung, name)  # pylint: disable=protected-access
  t_cfg = T5Config(dtype='bfloat16', param_dtype='bfloat16')  # T5-XXL.
  f_cfg, f_params = student
  out_dim = t_cfg.d_model
  sc = tc.student
  s_cfg = text_encoder.student_t5_config(
      t_cfg, num_layers=sc.get('num_layers'), d_model=sc.get('d_model'),
      num_heads=sc.get('num_heads'), d_ff=sc.get('d_ff'), dtype='float32',
      param_dtype='float32')
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = lambda m: nn.meta.unbox(jax.eval_shape(
      lambda: m.init(jax.random.PRNGKey(0), ids))['params'])
  sh = lambda m: parallel.variable_shardings(m, mesh, parallel.RULES,
                                             ids)['params']
  t_mod, s_mod = T5Encoder(t_cfg), StudentTextEncoder(s_cfg, out_dim)
  t_params, s_params = shapes(t_mod), shapes(s_mod)
  t_sh, s_sh = sh(t_mod), sh(s_mod)
  f_sh = _dit_shardings(f_cfg, mesh)
  teacher = tree_bytes(t_params, t_sh) + tree_bytes(f_params, f_sh)
  sp, g, o = _state_parts(tc, s_params, s_sh, mesh)
  b, notes = _micro_batch(tc, mesh)
  lt = tc.data.txt_len
  act_b = _ITEM[tc.compute_dtype]
  # T5 layers keep their activations (no remat): residual, q/k/v/o, the
  # gated FFN's two hidden states, [b, H, T, T] scores; teacher T5 forward
  # one layer at a time; the denoiser's trajectory as in the DiT plan.
  h_s = _tp(s_cfg.num_heads, mesh.shape['tensor'])
  per_layer = b * lt * (6 * s_cfg.d_model + 4 * h_s * s_cfg.d_kv +
                        3 * _tp(s_cfg.d_ff, mesh.shape['tensor'])) * act_b + (
                            2 * b * h_s * lt * lt * 4)
  act = s_cfg.num_layers * per_layer + b * lt * t_cfg.d_model * 4 * 4
  grid = tuple(tc.data.grid)
  act += activation_bytes(f_cfg.replace(remat=False), None, grid, lt, b,
                          mesh.shape['tensor'], tc.compute_dtype, attention,
                          num_steps=tc.num_sampling_steps) // max(
                              1, f_cfg.num_blocks) * 2
  g *= 2  # The gradients and the optimizer's update tree.
  # T5s unrolled: both whole in the compute dtype (+ the student's fp32
  # gradients); the frozen denoiser only up to its vis blocks (one block).
  n_t = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(t_params))
  n_s = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(s_params))
  gathered = (n_t + n_s) * act_b + n_s * 4 + gathered_block_bytes(
      f_cfg, f_params, tc.compute_dtype)
  lg = max(largest(t_params, t_sh, 't5_xxl/'), largest(f_params, f_sh,
                                                       'denoiser/'),
           largest(s_params, s_sh, 'student_t5/'))
  n = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(s_params))
  return RungPlan(name, teacher, sp, g, o, b * lt * 4 * 4, int(act),
                  int(gathered), budget, lg[1], lg[0], n, tuple(notes))


def teacher_shapes(config, preset: str = 'schnell',
                   dtype: str | None = 'bfloat16'):
  """(cfg, abstract params) of the ladder's teacher: config.teacher.preset
  (+ overrides) if set, else `preset` (a real checkpoint: its stored
  dtype, bf16 for FLUX.1 releases)."""
  t = config.teacher
  name = t.get('preset') or preset
  cfg = getattr(FluxConfig, name)(**dict(t.get('overrides', {}) or {}))
  return cfg, _abstract_params(cfg, dtype if not t.get('preset') else None)


def plan_ladder(config, mesh, hbm_bytes: int, *, teacher_preset='schnell',
                teacher_dtype: str | None = 'bfloat16',
                student_dtype: str | None = None,
                attention: str = 'splash') -> list[RungPlan]:
  """One RungPlan per trained rung of `config` (a ladder config).

  Args:
    mesh: a Mesh or AbstractMesh with axes (data, fsdp, tensor).
    hbm_bytes: the per-device budget.
    teacher_dtype: the teacher checkpoint's dtype (students inherit it
      through the transforms, as in the ladder); student_dtype: cast each
      student to this before training instead (e.g. 'float32' masters).
    attention: the attention kernel the step runs ('splash' on TPU: no
      [B, H, L, L] scores; 'xla' keeps them).
  """
  t_cfg, t_params = teacher_shapes(config, teacher_preset, teacher_dtype)
  cur_cfg, cur = t_cfg, t_params
  grid = tuple(config.distill.data.grid)
  schedule = tuple(sampling.get_schedule(
      config.distill.num_sampling_steps, grid[0] * grid[1], shift=False))
  out = []
  for i, rung in enumerate(config.rungs):
    rung = dict(rung)
    kind = rung['kind']
    name = f'{i} {kind}'
    if kind == 'export':
      continue
    if kind == 'text_encoder':
      out.append(_t5_plan(name, config, rung, (cur_cfg, cur), mesh,
                          hbm_bytes, attention))
      continue
    cur_cfg, cur = transform_shapes(kind, cur_cfg, cur, rung, schedule,
                                    t_cfg.vec_in_dim)
    params = cur if student_dtype is None else jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, student_dtype), cur)
    c = _rung_config(config, rung)
    out.append(dit_rung_plan(name, c, cur_cfg, params, t_cfg, t_params, mesh,
                             hbm_bytes, attention))
  return out


def format_plan(plans: Sequence[RungPlan], mesh, hbm_bytes: int) -> str:
  """A markdown table, GiB per device."""
  g = lambda b: f'{b / GIB:.2f}'
  shape = ' x '.join(f'{k} {v}' for k, v in mesh.shape.items())
  lines = [f'per device, GiB; mesh {shape}; budget {g(hbm_bytes)} GiB',
           '',
           '| rung | teacher | student | grads | Adam | batch | activations '
           '| gathered | total | fits | largest tensor (per device) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---|']
  for p in plans:
    lines.append(
        f'| {p.name} | {g(p.teacher)} | {g(p.student)} | {g(p.grads)} | '
        f'{g(p.opt_state)} | {g(p.batch)} | {g(p.activations)} | '
        f'{g(p.gathered)} | '
        f'{g(p.total)} | {"yes" if p.fits else "NO"} | {p.largest} '
        f'({p.largest_bytes / 2**20:.0f} MiB) |')
  for p in plans:
    for n in p.notes:
      lines.append(f'\n{p.name}: {n}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# The real step, from shapes (for memory_analysis checks).
# ---------------------------------------------------------------------------
def lower_train_step(c, s_cfg: FluxConfig, s_params, t_cfg: FluxConfig | None,
                     t_params, mesh):
  """jit(train_step).lower(...) of trainer.train's step, on shapes.

  Builds the same DistillSpec, optimizer and shardings as `trainer.train`
  (with c.data.cache_dir empty: the teacher trajectory runs in the step).
  """
  s_cfg = s_cfg.replace(remat=c.remat)
  spec = trainer.distill_spec(c, s_cfg, t_cfg)
  loss_fn = lambda *a: trainer.distill_loss(*a, spec=spec)
  tx = trainer.make_optimizer(c)
  params = {'student': s_params}
  p_sh = {'student': parallel.param_shardings(s_cfg, mesh)}
  state_sh = trainer.state_shardings(tx, params, p_sh, mesh)
  state = jax.eval_shape(lambda p: trainer.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.PRNGKey(0)), params)
  frozen, frozen_sh = {}, {}
  if t_cfg is not None:
    frozen = {'teacher': t_params}
    frozen_sh = {'teacher': parallel.param_shardings(t_cfg, mesh)}
  b, li, lt = c.batch_size, spec.grid[0] * spec.grid[1], c.data.txt_len
  batch = {'txt': jax.ShapeDtypeStruct((b, lt, s_cfg.context_in_dim),
                                       jnp.float32),
           'y': jax.ShapeDtypeStruct((b, s_cfg.vec_in_dim), jnp.float32),
           'noise': jax.ShapeDtypeStruct((b, li, s_cfg.in_channels),
                                         jnp.float32)}
  batch_sh = {k: parallel.batch_sharding(mesh, len(v.shape))
              for k, v in batch.items()}
  step = trainer.compile_train_step(loss_fn, tx, c.grad_accum, state_sh,
                                    batch_sh, frozen_sh, mesh)
  return step.lower(state, batch, frozen)


def compiled_peak_bytes(compiled) -> dict[str, int]:
  """memory_analysis() of a compiled step -> its parts and the peak."""
  m = compiled.memory_analysis()
  parts = dict(arguments=m.argument_size_in_bytes,
               outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temp=m.temp_size_in_bytes)
  parts['peak'] = (parts['arguments'] + parts['outputs'] - parts['aliased'] +
                   parts['temp'])
  return parts
