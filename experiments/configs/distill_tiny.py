"""Distil a tiny random FLUX teacher into a tiny student (CPU smoke run).

  python experiments/distill.py --config=experiments/configs/distill_tiny.py \
      --workdir=/tmp/distill_tiny
"""
from nanoflux_jax.config_arg import parse_arg
from nanoflux_jax.distill import trainer


def get_config(arg: str = ''):
  a = parse_arg(arg, runlocal=False)
  c = trainer.default_config()
  c.num_steps = 200
  c.compute_dtype = 'float32'
  c.log_every = 20
  c.checkpoint_every = 100
  if a.runlocal:
    c.num_steps = 10
    c.log_every = 2
  return c
