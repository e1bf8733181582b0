r"""A 2-rung ladder on a tiny random FLUX teacher (CPU smoke run, tests).

  python experiments/ladder.py --config=experiments/configs/ladder_tiny.py \
      --workdir=/tmp/ladder_tiny
Rungs: prune 50% of heads and MLP channels (Taylor sensitivity) -> distil;
static modulation -> distil. Config args (comma-separated, after ':'):
  runlocal       2 distillation steps per rung;
  stop_after=N   every rung's trainer stops after step N, as if preempted
                 (the ladder stops at that rung; rerun without it to resume).
"""
import ml_collections

from nanoflux_jax.config_arg import parse_arg
from nanoflux_jax.distill import trainer


def get_config(arg: str = ''):
  a = parse_arg(arg, runlocal=False, stop_after=None)
  c = ml_collections.ConfigDict()
  c.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}
  # True: resume a rung whose recorded settings differ from this config's
  # (refused otherwise, naming each difference); the change is recorded.
  c.accept_changed_settings = False
  # A random tiny teacher; set path (and preset='') for a real checkpoint.
  c.teacher = {'path': '', 'preset': 'tiny', 'seed': 1, 'overrides': {
      'depth': 1, 'depth_single_blocks': 1, 'attention_impl': 'xla'}}
  # Base trainer config of every rung's distillation; a rung's 'distill'
  # dict overrides it. Its teacher/student/mesh fields are unused: the
  # ladder passes the original teacher and the current student.
  c.distill = trainer.default_config()
  c.distill.compute_dtype = 'float32'
  c.distill.num_steps = 4
  c.distill.batch_size = 4
  c.distill.num_sampling_steps = 2
  c.distill.warmup_steps = 1
  c.distill.log_every = 2
  c.distill.checkpoint_every = 2
  c.distill.async_checkpoint = False
  c.distill.data.grid = (2, 2)
  c.distill.data.txt_len = 4
  # Sample grids: the same prompts and noise for the teacher and every rung.
  c.samples = {'prompts': 'builtin', 'num': 4, 'seed': 0, 'scale': 8}
  c.timing = {'repeats': 3}
  c.rungs = [
      {'kind': 'prune', 'criterion': 'taylor', 'keep_heads': 0.5,
       'keep_mlp': 0.5, 'scope': 'global', 'calib_n': 2,
       'distill': {'num_steps': 4}},
      {'kind': 'static_modulation', 'distill': {'num_steps': 4}},
  ]
  if a.runlocal:
    for r in c.rungs:
      r['distill']['num_steps'] = 2
  c.distill.stop_after = a.stop_after
  return c
