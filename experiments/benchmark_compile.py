r"""Compile time (unrolled vs scanned blocks) and attention memory per device.

  python experiments/benchmark_compile.py [--preset=schnell --backend=cpu]

Everything is AOT from abstract shapes (`jax.jit(f).lower(ShapeDtypeStruct
...).compile()`): no params are allocated, so FLUX.1-schnell size (12B
params, 4096 image + 512 text tokens, batch 1) compiles on a laptop's CPU
backend, or on a GPU with --backend=gpu.

1. lower + compile seconds of the forward (bf16) and of one training step
   (bf16 compute, fp32 master weights, AdamW, remat per block: the
   distill_schnell setting; a rectified-flow step, the student's part of a
   distillation step), with `scan_blocks` off and on;
2. the attention's memory per device: `memory_analysis()` of one compiled
   attention forward + backward at that size ([1, 4608, 24, 128] bf16:
   batch 1 and all 24 heads on a device) for 'xla' and 'splash' (Pallas;
   interpret mode off TPU, so its figure there is the kernel's tiles as XLA
   interprets them).

3. the same train-step compile for the student after a rung of a ladder
   config (--ladder_config, --rung; default `ladder_schnell.py`'s rung 0,
   the prune rung: half the heads, 75% of the MLP channels in every block;
   its shapes from the rung kind's own transform on abstract params,
   `memory_plan.rung_shapes`), unrolled and scanned.

Last line: one JSON object {"forward_unrolled_s", "forward_scanned_s",
"train_unrolled_s", "train_scanned_s", "<kind>_train_unrolled_s",
"<kind>_train_scanned_s"} (<kind>: the rung's kind, e.g. prune).
"""
import functools
import importlib.util
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import loop
from nanoflux_jax.ladder import memory_bytes
from nanoflux_jax.ladder import memory_plan
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import flux
from nanoflux_jax.models import layers

_PRESET = flags.DEFINE_enum('preset', 'schnell', ['schnell', 'tiny'],
                            'Model size (tiny: a quick smoke run).')
_BACKEND = flags.DEFINE_string('backend', 'cpu', 'jax backend to compile for.')
_GRID = flags.DEFINE_integer('grid', 64, 'Image token grid side (64: 1024 px).')
_TXT = flags.DEFINE_integer('txt_len', 512, 'Text tokens.')
_MEMORY = flags.DEFINE_bool('memory', True, 'Measure attention memory.')
_LADDER = flags.DEFINE_string(
    'ladder_config', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  'configs', 'ladder_schnell.py'),
    'Ladder config file whose rung --rung gives the student of step 3.')
_RUNG = flags.DEFINE_integer('rung', 0, 'Index into the ladder\'s rungs; the '
                             'rungs before it are applied first.')


def _ladder_rungs(path: str) -> list:
  """config.rungs of the ladder config file at path (its get_config())."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--ladder_config {path!r} does not exist')
  spec = importlib.util.spec_from_file_location('ladder_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.get_config().rungs)


def rung_student(cfg: FluxConfig, rungs, index: int):
  """(cfg, abstract params, kind) after rungs[0..index] on cfg (4 steps)."""
  if not 0 <= index < len(rungs):
    raise ValueError(f'--rung={index}: the ladder has {len(rungs)} rungs')
  student = (cfg, memory_bytes.abstract_params(cfg, None))
  stage = Stage(cfg, 4, (_GRID.value, _GRID.value))
  for rung in rungs[:index + 1]:
    student, stage = memory_plan.rung_shapes(rung, stage, student)
  return student[0], student[1], rungs[index]['kind']


def _abstract(tree, device):
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def _timed_compile(fn, *args) -> tuple[float, float, object]:
  """-> (lower seconds, compile seconds, compiled) of jit(fn) at args."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return t1 - t0, time.perf_counter() - t1, compiled


def _inputs(cfg: FluxConfig, grid: int, txt_len: int) -> dict:
  x = flux.dummy_inputs(cfg, 1, grid * grid, txt_len)
  return {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in x.items()}


def forward_compile(cfg: FluxConfig, grid: int, txt_len: int, device):
  """The denoiser forward (an inference step): bf16 params and compute."""
  cfg = cfg.replace(dtype='bfloat16', param_dtype='bfloat16')
  fn = jax.jit(
      lambda p, x: flux.Flux(cfg).apply({'params': p}, **x).velocity)
  return _timed_compile(fn, _abstract(flux.param_shapes(cfg), device),
                        _abstract(_inputs(cfg, grid, txt_len), device))


def train_compile(cfg: FluxConfig, grid: int, txt_len: int, device):
  """One rectified-flow training step (loop.train_step, donated state)."""
  cfg = cfg.replace(dtype='bfloat16', param_dtype='float32', remat=True)
  c = trainer.default_config()
  tx = loop.make_optimizer(c)
  spec = trainer.DistillSpec(
      student=cfg, teacher=None, grid=(grid, grid),
      schedule=tuple(sampling.schedule_for(cfg, 4, grid * grid)),
      weights=(('rf', 1.0),))
  params = {'student': flux.param_shapes(cfg)}
  state = jax.eval_shape(lambda p: loop.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.PRNGKey(0)), params)
  x = _inputs(cfg, grid, txt_len)
  batch = {'noise': x['img'], 'latents': x['img'], 'txt': x['txt'],
           'y': x['y']}
  fn = jax.jit(functools.partial(
      loop.train_step, loss_fn=functools.partial(trainer.distill_loss,
                                                    spec=spec), tx=tx),
               donate_argnums=0)
  return _timed_compile(fn, _abstract(state, device), _abstract(batch, device),
                        {})


def attention_memory(impl: str, length: int, heads: int, head_dim: int,
                     device) -> dict:
  """memory_analysis() of one attention forward + backward (bf16)."""
  def step(q, k, v):
    f = lambda *a: jnp.sum(layers.attention(*a, impl=impl).astype(
        jnp.float32))
    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

  x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  _, _, compiled = _timed_compile(jax.jit(step), x, x, x)
  m = compiled.memory_analysis()
  return {'temp_bytes': int(m.temp_size_in_bytes),
          'argument_bytes': int(m.argument_size_in_bytes),
          'output_bytes': int(m.output_size_in_bytes)}


def main(argv):
  del argv
  device = jax.devices(_BACKEND.value)[0]
  base = (FluxConfig.schnell() if _PRESET.value == 'schnell' else
          FluxConfig.tiny(depth=3, depth_single_blocks=4))
  # 'xla' attention everywhere for the compile timings: a fixed, backend-
  # neutral program (on CPU 'auto' would pick per_head's chunked loops).
  base = base.replace(attention_impl='xla')
  grid, txt = _GRID.value, _TXT.value
  print(f'{_PRESET.value}: {base.depth} double + {base.depth_single_blocks} '
        f'single blocks, {grid * grid} image + {txt} text tokens, batch 1, '
        f'on {device.platform} ({device.device_kind})')
  out = {}
  for what, compile_fn in (('forward', forward_compile),
                           ('train', train_compile)):
    for layout in ('unrolled', 'scanned'):
      cfg = base.replace(scan_blocks=layout == 'scanned')
      lower_s, compile_s, _ = compile_fn(cfg, grid, txt, device)
      out[f'{what}_{layout}_s'] = round(lower_s + compile_s, 2)
      print(f'{what:8s} {layout:9s} lower {lower_s:7.2f} s  compile '
            f'{compile_s:7.2f} s', flush=True)
  # The student after a ladder rung (the default, ladder_schnell's prune
  # with scope='block': equal widths per block, so each kind is still one
  # scanned run).
  student, _, kind = rung_student(base, _ladder_rungs(_LADDER.value),
                                  _RUNG.value)
  print(f'rung {_RUNG.value} ({kind}) student: {student.num_blocks} blocks, '
        f'heads {student.double_heads[0]}, MLP {student.double_mlp_img[0]} '
        'per block')
  for layout in ('unrolled', 'scanned'):
    cfg = student.replace(scan_blocks=layout == 'scanned')
    lower_s, compile_s, _ = train_compile(cfg, grid, txt, device)
    out[f'{kind}_train_{layout}_s'] = round(lower_s + compile_s, 2)
    print(f'{kind} train {layout:9s} lower {lower_s:7.2f} s  compile '
          f'{compile_s:7.2f} s', flush=True)
  if _MEMORY.value:
    length = grid * grid + txt
    mem = {impl: attention_memory(impl, length, base.num_heads,
                                  base.head_dim, device)
           for impl in ('xla', 'splash')}
    for impl, m in mem.items():
      print(f'attention fwd+bwd [1, {length}, {base.num_heads}, '
            f'{base.head_dim}] bf16, {impl:6s}: temp '
            f'{m["temp_bytes"] / 2**20:9.1f} MiB, arguments '
            f'{m["argument_bytes"] / 2**20:.1f} MiB, outputs '
            f'{m["output_bytes"] / 2**20:.1f} MiB')
    print('memory: ' + json.dumps(mem))
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
