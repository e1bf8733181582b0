"""Distil FLUX.1-schnell into a student FluxConfig on a TPU/GPU mesh.

  python experiments/distill.py --config=experiments/configs/distill_schnell.py \
      --config.teacher.path=/ckpt/FLUX.1-schnell --workdir=gs://.../run
Student: schnell's shapes with half the heads / MLP channels per block and
static modulation, unless --config.init points at a pruned checkpoint.
"""
from nanoflux_jax.config_arg import parse_arg
from nanoflux_jax.distill import trainer


def get_config(arg: str = ''):
  a = parse_arg(arg, runlocal=False)
  c = trainer.default_config()
  # Scanned teacher and student: FSDP gathers one block at a time.
  c.teacher = {'path': '', 'preset': '', 'overrides': {}, 'seed': 1,
               'scan_blocks': True}
  c.student = {'preset': 'schnell', 'overrides': {
      'num_heads': 24, 'double_heads': (12,) * 19, 'single_heads': (12,) * 38,
      'double_mlp_img': (6144,) * 19, 'double_mlp_txt': (6144,) * 19,
      'single_mlp': (6144,) * 38, 'modulation': 'static',
      'static_timesteps': (1.0, 0.75, 0.5, 0.25), 'remat': True,
      'scan_blocks': True}}
  c.mesh = {'data': 1, 'fsdp': -1, 'tensor': 1}
  c.batch_size = 64
  c.num_steps = 20_000
  c.learning_rate = 1e-4
  c.warmup_steps = 500
  c.weight_decay = 0.01
  c.remat = True
  c.compute_dtype = 'bfloat16'
  c.loss.weights = {'output_kd': 1.0, 'feature_kd': 0.1, 'rf': 0.0}
  c.loss.feature_pairs = ((4, 4), (18, 18), (40, 40))
  c.data = {'prompts': 'builtin', 'grid': (32, 32), 'txt_len': 256,
            'cache_dir': '', 'cache_shards': 64}
  c.log_every = 50
  c.checkpoint_every = 1000
  if a.runlocal:
    c.num_steps = 5
    c.batch_size = 2
  return c
