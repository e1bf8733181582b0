r"""Distillation throughput: steps/s, student tokens/s, bytes per device.

  python experiments/benchmark_distill.py [--batch_size=4 --steps=10]

Teacher: FluxConfig.benchmark() (hidden 768, 4 double + 8 single, 1024 image
+ 128 text tokens), one device; the teacher runs its 4-step trajectory on
the fly every step. Student: variant (d) of the compression benchmark.
--dtype=bfloat16 computes in bf16 with fp32 master weights; --peak_tflops
(e.g. 989 for an H100/H200 in bf16) adds model FLOPs utilisation (MFU).
Last line: one JSON object.
"""
import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from nanoflux_jax import parallel
from nanoflux_jax.compress import count_flops
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import sharding

_BATCH = flags.DEFINE_integer('batch_size', 4, 'Global batch.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype (params stay fp32).')
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Device peak, for MFU.')
_GRID = (32, 32)   # 1024 image tokens.
_TXT = 128


def student_config(teacher: FluxConfig) -> tuple[FluxConfig, str]:
  """The shapes of the compression issue's variant (d).

  Pruning 50% of heads and MLP channels per block, static modulation and a
  down-sampler over blocks 2..n-3 give this config whatever the scores, and
  step speed does not depend on the weights, so random init stands in for
  the compressed teacher.
  """
  n_d, n_s = teacher.depth, teacher.depth_single_blocks
  mlp = int(teacher.hidden_size * teacher.mlp_ratio) // 2
  sched = tuple(sampling.schedule_for(teacher, 4, _GRID[0] * _GRID[1]))[:-1]
  cfg = teacher.replace(
      double_heads=(teacher.num_heads // 2,) * n_d,
      single_heads=(teacher.num_heads // 2,) * n_s,
      double_mlp_img=(mlp,) * n_d, double_mlp_txt=(mlp,) * n_d,
      single_mlp=(mlp,) * n_s, modulation='static', static_timesteps=sched,
      downsample_start=2, downsample_end=n_d + n_s - 3)
  return cfg, ('variant (d): 50% heads + MLP per block, static modulation, '
               f'down-sampler over blocks 2..{n_d + n_s - 3}')


def main(argv):
  del argv
  teacher = FluxConfig.benchmark(dtype=_DTYPE.value)
  student, how = student_config(teacher)
  print('student:', how)
  mesh = parallel.create_mesh((1, 1, 1), jax.devices()[:1])
  t_params, t_sh = sharding.init_flux(teacher, mesh, jax.random.PRNGKey(1))
  s_params, s_sh = sharding.init_flux(student, mesh, jax.random.PRNGKey(0))
  c = trainer.default_config()
  c.num_steps = 1000
  tx = loop.make_optimizer(c)
  params, p_sh = {'student': s_params}, {'student': s_sh}
  state_sh = loop.state_shardings(tx, params, p_sh, mesh)
  state = jax.jit(lambda p: loop.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.PRNGKey(0)), out_shardings=state_sh)(params)
  schedule = tuple(sampling.schedule_for(teacher, 4, _GRID[0] * _GRID[1]))
  spec = trainer.DistillSpec(student=student, teacher=teacher,
                             schedule=schedule, grid=_GRID,
                             weights=(('output_kd', 1.0),))
  data = data_lib.PromptData(
      data_lib.load_prompts('builtin'),
      data_lib.random_embedder(teacher, _TXT), teacher, _GRID, _BATCH.value)
  batch = data_lib.to_global(data.batch(0), mesh)
  batch_sh = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in
              batch.items()}
  step = loop.compile_train_step(
      functools.partial(trainer.distill_loss, spec=spec), tx, 1, state_sh,
      batch_sh, {'teacher': t_sh}, mesh)
  compiled = step.lower(state, batch, {'teacher': t_params}).compile()
  mem = compiled.memory_analysis()
  nbytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes +
               mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  frozen = {'teacher': t_params}
  for _ in range(2):  # Warm-up.
    state, m = step(state, batch, frozen)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, m = step(state, batch, frozen)
  jax.block_until_ready(m)
  dt = time.perf_counter() - t0
  steps_per_s = _STEPS.value / dt
  tokens = _BATCH.value * (_GRID[0] * _GRID[1] + _TXT)
  print(f'device: {jax.devices()[0].device_kind}; batch {_BATCH.value}; '
        f'loss {float(m["loss"]):.4f}; memory {mem}')
  # Model FLOPs per step: the teacher's trajectory forwards plus the
  # student's forward and backward (3x a forward).
  img, txt = _GRID[0] * _GRID[1], _TXT
  flops = _BATCH.value * ((len(schedule) - 1) * count_flops(teacher, img, txt)
                          + 3 * count_flops(student, img, txt))
  out = {'steps_per_s': round(steps_per_s, 4),
         'tokens_per_s': round(steps_per_s * tokens, 1),
         'bytes_per_device': nbytes, 'dtype': _DTYPE.value,
         'tflops': round(flops * steps_per_s / 1e12, 2)}
  if _PEAK.value:
    out['mfu'] = round(flops * steps_per_s / 1e12 / _PEAK.value, 4)
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
