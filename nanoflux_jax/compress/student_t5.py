"""A smaller T5 student for text-encoder distillation (NanoFLUX rung 5).

The student is a shallower and/or narrower T5 encoder plus a learned Dense
projection to the teacher's width (`models.t5.StudentTextEncoder`), so it
drops into the pipeline in place of T5-XXL. `student_t5_config` derives its
config from the teacher's, `init_from_teacher` copies (and, narrower,
slices) the teacher's layers, `init_student` is a random init;
`save_student` / `load_student` are its checkpoint format.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import checkpoint as nf_checkpoint
from nanoflux_jax.configs import T5Config
from nanoflux_jax.models.t5 import StudentTextEncoder
from nanoflux_jax.models.t5 import student_from_checkpoint

Array = jax.Array
# Fields that fix the shape of some T5 parameter other than the layer count.
SHAPE_FIELDS = ('vocab_size', 'd_model', 'd_kv', 'num_heads', 'd_ff',
                'relative_attention_num_buckets')


def student_t5_config(teacher: T5Config, num_layers: int | None = None,
                      d_model: int | None = None, num_heads: int | None = None,
                      d_kv: int | None = None, d_ff: int | None = None,
                      **overrides) -> T5Config:
  """A smaller T5 derived from the teacher's config.

  Unset fields keep the teacher's value, except that a narrower d_model also
  narrows what scales with it: num_heads = d_model // d_kv (the per-head
  width is kept) and d_ff scales by d_model / teacher.d_model.

  Args:
    teacher: the teacher encoder's config.
    num_layers, d_model, num_heads, d_kv, d_ff: student sizes (None: derived).
    **overrides: any other T5Config field (dtype, ...).
  Raises:
    ValueError: a size is not positive, or d_model is not a multiple of d_kv
      when num_heads is derived.
  """
  d_model = teacher.d_model if d_model is None else int(d_model)
  d_kv = teacher.d_kv if d_kv is None else int(d_kv)
  if num_heads is None:
    if d_model == teacher.d_model:
      num_heads = teacher.num_heads
    elif d_model % d_kv:
      raise ValueError(f'student_t5_config: d_model={d_model} is not a '
                       f'multiple of d_kv={d_kv}; pass num_heads')
    else:
      num_heads = d_model // d_kv
  if d_ff is None:
    d_ff = max(1, round(teacher.d_ff * d_model / teacher.d_model))
  cfg = teacher.replace(
      num_layers=teacher.num_layers if num_layers is None else int(num_layers),
      d_model=d_model, d_kv=d_kv, num_heads=int(num_heads), d_ff=int(d_ff),
      **overrides)
  bad = {k: getattr(cfg, k) for k in ('num_layers', 'd_model', 'd_kv',
                                      'num_heads', 'd_ff')
         if getattr(cfg, k) < 1}
  if bad:
    raise ValueError(f'student_t5_config: sizes must be >= 1, got {bad}')
  return cfg


def dummy_ids(length: int = 4) -> Array:
  return jnp.zeros((1, length), jnp.int32)


def init_student(config: T5Config, out_dim: int, rng: Array) -> dict:
  """Random (unboxed) StudentTextEncoder params, jitted like Flux init."""
  init = jax.jit(lambda r: StudentTextEncoder(config, out_dim).init(
      r, dummy_ids())['params'])
  return nn.meta.unbox(init(rng))


def default_layer_map(teacher_layers: int,
                      student_layers: int) -> tuple[int, ...]:
  """Evenly spaced teacher layers, first and last included: 24 -> 6 gives
  (0, 5, 9, 14, 18, 23); equal depths give the identity."""
  if student_layers == 1:
    return (0,)
  return tuple(int(i) for i in np.round(
      np.linspace(0, teacher_layers - 1, student_layers)))


def init_from_teacher(teacher_cfg: T5Config, teacher_params,
                      student_cfg: T5Config,
                      layer_map: Sequence[int] | None = None) -> dict:
  """Block-wise init: the student starts as a subset of the teacher's layers.

  Copies the token embedding, the shared relative attention bias, the final
  norm and, for student layer i, teacher layer layer_map[i]; the projection
  starts as the identity (the widths are equal), so a student holding every
  teacher layer reproduces the teacher exactly.

  Args:
    teacher_cfg, teacher_params: the teacher T5Encoder (params tree of
      `T5Encoder`, as loaded by convert.text_encoders.load_t5_encoder).
    student_cfg: the student's config; every shape field but num_layers must
      equal the teacher's.
    layer_map: teacher layer index per student layer; None: evenly spaced.
  Returns:
    StudentTextEncoder params {'t5': ..., 'proj': ...} in the student's
    param_dtype (fresh copies: the train state is donated, the teacher's
    buffers must survive it).
  Raises:
    ValueError: widths differ (names the fields; use `init_student` for a
      narrower student), layer_map has the wrong length or an index outside
      [0, teacher layers).
    KeyError: teacher_params lacks a tree entry the copy needs.
  """
  diff = {k: (getattr(teacher_cfg, k), getattr(student_cfg, k))
          for k in SHAPE_FIELDS
          if getattr(teacher_cfg, k) != getattr(student_cfg, k)}
  if diff:
    raise ValueError(
        'init_from_teacher: cannot copy teacher layers into a student of a '
        'different width; (teacher, student) differ in '
        f'{diff}. Initialise such a student randomly (init_student / '
        "config student.init='random').")
  n_t, n_s = teacher_cfg.num_layers, student_cfg.num_layers
  layer_map = (default_layer_map(n_t, n_s) if layer_map is None
               else tuple(int(j) for j in layer_map))
  if len(layer_map) != n_s:
    raise ValueError(f'init_from_teacher: layer_map {layer_map} has '
                     f'{len(layer_map)} entries but the student has {n_s} '
                     'layers')
  bad = [j for j in layer_map if not 0 <= j < n_t]
  if bad:
    raise ValueError(f'init_from_teacher: layer_map {layer_map} has indices '
                     f'{bad} outside the teacher\'s layers [0, {n_t - 1}]')
  dtype = jnp.dtype(student_cfg.param_dtype)
  teacher_params = nn.meta.unbox(teacher_params)

  def take(key):
    if key not in teacher_params:
      raise KeyError(f'init_from_teacher: teacher params have no {key!r} '
                     f'(top-level keys: {sorted(teacher_params)})')
    return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True),
                        teacher_params[key])

  t5 = {k: take(k) for k in ('token_embed', 'relative_attention_bias',
                             'final_norm')}
  for i, j in enumerate(layer_map):
    t5[f'layers_{i}'] = take(f'layers_{j}')
  d = student_cfg.d_model
  proj = {'kernel': jnp.eye(d, dtype=dtype), 'bias': jnp.zeros((d,), dtype)}
  return {'t5': t5, 'proj': proj}


def save_student(path: str, config: T5Config, out_dim: int, params) -> None:
  """nanoflux checkpoint with config {'t5': T5Config dict, 'out_dim': int}."""
  nf_checkpoint.save(path, {'t5': config.to_dict(), 'out_dim': int(out_dim)},
                     params)


def load_student(path: str, shardings=None) -> tuple[T5Config, int, Any]:
  """-> (student T5Config, out_dim, params) from a `save_student` folder."""
  return student_from_checkpoint(
      *nf_checkpoint.load(path, shardings=shardings), path)
