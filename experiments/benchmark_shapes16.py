r"""Seconds per training step of a shapes teacher: its DiT and its T5.

  python experiments/benchmark_shapes16.py \
      --config=experiments/configs/shapes.py:teacher16 [--steps=4]

Times, at the config's batch sizes and sequence lengths, (1) the DiT's
rectified-flow step through `trainer.train` (the teacher's own code path) on
synthetic batches of the right shapes, and (2) the T5's caption-structure
pretraining step (`shapes_encoders.pretrain_t5`) on real captions. Both
exclude compilation: the DiT from the trainer's cumulative rate after its
first 2 steps, the T5 as the median of its steps after the first 2. The
DiT's matmul FLOPs per training step (3x a forward) come with them, for an
estimate on an accelerator.
Prints the budget of the config's steps and, last, one JSON line. The
machine's load average is printed with it: on a shared CPU it inflates every
figure.
"""
import json
import os
import tempfile

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import config_flag  # experiments/config_flag.py, beside this binary.
from nanoflux_jax import parallel
from nanoflux_jax.compress import count_flops
from nanoflux_jax.configs import ClipConfig, T5Config, VAEConfig
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.shapes import t5_pretrain as shapes_encoders
from nanoflux_jax.shapes import teacher as shapes_teacher
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import sharding
from nanoflux_jax.models.t5 import T5Encoder
from nanoflux_jax.testing import tiny_flux

_CONFIG = config_flag.define_config_file('config', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 4, 'Timed DiT steps (after 2).')
_T5_STEPS = flags.DEFINE_integer('t5_steps', 20, 'Timed T5 steps.')


class _Synthetic:
  """Random batches of the teacher's shapes (the DiT cost does not depend on
  the values)."""

  def __init__(self, batch: int, txt: tuple, y: int, latents: tuple):
    rng = np.random.default_rng(0)
    self.arrays = {
        'txt': rng.standard_normal((batch,) + txt, np.float32),
        'y': rng.standard_normal((batch, y), np.float32),
        'noise': rng.standard_normal((batch,) + latents, np.float32),
        'latents': rng.standard_normal((batch,) + latents, np.float32)}

  def batch(self, step, process_index=0, process_count=1):
    del step, process_index, process_count
    return self.arrays


def _dit_seconds(t, tok_len: int, workdir: str) -> tuple[float, int, int]:
  """-> (s per DiT step, DiT params, matmul FLOPs per training step)."""
  vae = VAEConfig.linear(t.pixel_factor, t.latent_channels)
  t5_kw = dict(t.t5)
  t5 = T5Config.tiny(**{**t5_kw, 'vocab_size': tok_len})
  clip = ClipConfig.tiny(vocab_size=tok_len, **{
      k: v for k, v in dict(t.clip).items() if k != 'num_merges'})
  cfg = shapes_teacher.flux_config(t, vae, t5, clip)
  mesh = parallel.create_mesh({'data': -1})
  params = sharding.init_flux(cfg, mesh, jax.random.PRNGKey(0))[0]
  grid = (t.resolution // (2 * t.pixel_factor),) * 2
  tc = ml_collections.ConfigDict(t.train.to_dict())
  tc.data.grid, tc.data.txt_len = grid, t.txt_len
  tc.num_steps = 2 + _STEPS.value
  tc.log_every, tc.warmup_steps = 1, 1
  tc.checkpoint_every = tc.sample_every = 10 ** 6
  data = _Synthetic(tc.batch_size, (t.txt_len, t5.d_model), clip.hidden_size,
                    (grid[0] * grid[1], cfg.in_channels))
  _, history = trainer.train(tc, workdir, student=(cfg, params), data=data,
                             mesh=mesh)
  # Cumulative rates -> elapsed time at each logged step.
  elapsed = {h['step']: h['step'] / h['steps_per_s'] for h in history}
  last = max(elapsed)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  flops = 3 * count_flops(cfg, grid[0] * grid[1], t.txt_len, tc.batch_size)
  return (elapsed[last] - elapsed[2]) / (last - 2), n_params, flops


def _t5_seconds(t, tokenizer) -> float:
  cfg = T5Config.tiny(**{**dict(t.t5), 'vocab_size': len(tokenizer)})
  params = jax.jit(lambda r: nn.meta.unbox(T5Encoder(cfg).init(
      r, jnp.zeros((1, 8), jnp.int32))['params']))(jax.random.PRNGKey(0))
  world = shapes.ShapesWorld(t.world_seed, t.resolution,
                             t.get('world', 'shapes'))
  kw = dict(t.t5_pretrain)
  kw.pop('steps')
  timings = []
  shapes_encoders.pretrain_t5(cfg, params, tokenizer, world, t.txt_len,
                              steps=2 + _T5_STEPS.value, timings=timings,
                              **kw)
  return float(np.median(timings[2:]))   # The first compiles.


def main(argv):
  del argv
  t = _CONFIG.value.teacher.shapes
  world = t.get('world', 'shapes')
  corpus = shapes.ShapesWorld(t.world_seed, t.resolution, world).captions(
      2000) + [' '.join(shapes.vocabulary(world))]
  with tempfile.TemporaryDirectory() as tmp:
    tok = tiny_flux.make_t5_tokenizer(os.path.join(tmp, 'tok'),
                                      t.t5.vocab_size, sentences=corpus,
                                      model_type='word')
    t5_s = _t5_seconds(t, tok)
    dit_s, dit_params, dit_flops = _dit_seconds(t, len(tok), os.path.join(tmp, 'dit'))
  out = {'device': jax.devices()[0].device_kind,
         'load_average': os.getloadavg(), 'dit_params': dit_params,
         'dit_batch': t.train.batch_size, 'dit_s_per_step': dit_s,
         'dit_train_step_gflop': dit_flops / 1e9,
         'dit_steps': t.train.num_steps,
         't5_batch': t.t5_pretrain.batch_size, 't5_s_per_step': t5_s,
         't5_steps': t.t5_pretrain.steps}
  print(f"DiT: {t.train.num_steps} steps x {dit_s:.3f} s = "
        f"{t.train.num_steps * dit_s / 3600:.2f} h; T5: "
        f"{t.t5_pretrain.steps} steps x {t5_s:.3f} s = "
        f"{t.t5_pretrain.steps * t5_s / 3600:.2f} h")
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
