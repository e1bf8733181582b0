r"""Per-rung, per-device memory plan of a ladder config; allocates nothing.

  python experiments/plan.py --config=experiments/configs/ladder_schnell.py \
      --devices=64 --hbm_gb=95
  python experiments/plan.py --config=experiments/configs/ladder_schnell.py \
      --devices=256 --hbm_gb=32 --mesh=fsdp:64,tensor:4

Prints a markdown table (GiB per device: teacher params, student params,
gradients, Adam state, batch, activation estimate with remat, total vs the
budget, largest tensor) and ends with one JSON line. Shapes come from
`jax.eval_shape` of each rung kind's `shapes` (its compression on abstract
params, `memory_plan.rung_shapes`) and shardings from `parallel.RULES` on
an abstract mesh of --devices (no devices needed).
"""
import json

from absl import app
from absl import flags

import config_flag  # experiments/config_flag.py, beside this binary.
from nanoflux_jax.ladder import memory_bytes
from nanoflux_jax.ladder import memory_plan
_CONFIG = config_flag.define_config_file('config', 'Ladder config file.')
_DEVICES = flags.DEFINE_integer('devices', 64, 'Devices in the slice.')
_HBM_GB = flags.DEFINE_float('hbm_gb', 95.0, 'Memory per device, GB (1e9).')
_MESH = flags.DEFINE_string(
    'mesh', '', "Mesh override, e.g. 'fsdp:64,tensor:4' (missing axes 1, "
    "one may be -1); default: the config's mesh.")
_TEACHER_DTYPE = flags.DEFINE_string(
    'teacher_dtype', 'bfloat16', "The teacher checkpoint's dtype (FLUX.1 "
    'releases: bfloat16); students inherit it through the transforms.')
_STUDENT_DTYPE = flags.DEFINE_string(
    'student_dtype', '', "Cast students to this (e.g. 'float32' master "
    "weights); '' keeps what the transforms give.")
_ATTENTION = flags.DEFINE_enum(
    'attention', 'splash', ['splash', 'cudnn', 'xla', 'batched', 'per_head'],
    "The attention kernel ('splash' on TPU: no [B, H, L, L] scores).")


def _mesh_spec(text: str, default):
  if not text:
    return dict(default)
  out = {}
  for part in text.split(','):
    k, v = part.split(':')
    out[k.strip()] = int(v)
  return out


def main(argv):
  del argv
  c = _CONFIG.value
  mesh = memory_bytes.abstract_mesh(_mesh_spec(_MESH.value, c.mesh),
                                   _DEVICES.value)
  budget = int(_HBM_GB.value * 1e9)
  plans = memory_plan.plan_ladder(
      c, mesh, budget, teacher_dtype=_TEACHER_DTYPE.value or None,
      student_dtype=_STUDENT_DTYPE.value or None,
      attention=_ATTENTION.value)
  print(memory_plan.format_plan(plans, mesh, budget))
  print(json.dumps({
      'devices': _DEVICES.value, 'mesh': dict(mesh.shape),
      'budget_bytes': budget,
      'rungs': [dict(name=p.name, teacher=p.teacher, student=p.student,
                     grads=p.grads, opt_state=p.opt_state, batch=p.batch,
                     activations=p.activations,
                     gathered=p.gathered, total=p.total, fits=p.fits,
                     largest=p.largest, largest_bytes=p.largest_bytes,
                     trainable_params=p.params_count)
                for p in plans]}))


if __name__ == '__main__':
  app.run(main)
