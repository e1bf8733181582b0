r"""The whole NanoFLUX recipe on the procedural shapes world (the default job).

  python experiments/ladder.py --config=experiments/configs/shapes.py:quick \
      --workdir=/tmp/nanoflux_shapes
1. a toy teacher with FLUX's architecture is trained from scratch with
   rectified flow (cached in workdir/teacher; a rerun reuses it);
2. Taylor sensitivity -> prune heads and MLP channels -> distil; block
   sensitivity -> remove the 2 least useful of 6 blocks -> distil;
3. static modulation -> distil; prune 30% of the MLP channels -> distil;
4. the ResNet token down-sampler (middle blocks on a 4x4 grid) -> distil;
5. text-encoder distillation (embedding + visual-cue loss), and the ablation
   with the embedding loss only;
6. TFLite export of the final student (fp32 and int8) to workdir/tflite;
7. evaluation of every rung: report.md (toy-GenEval, toy-FID, PSNR, JAX and
   LiteRT ms per image, ablations, targets) and samples/eval_*.png grids.

Variants (the part after ':'; options after a comma):
  micro   a few steps per rung, tiny eval: the CI smoke run (< 5 min);
  quick   <= 15 min on 2 CPU cores (default);
  full    the variant the README's targets are read from.
  stop_after=N   every trainer stops after step N (preemption tests);
  train_only     no export rung, no evaluation: train on an accelerator,
                 then rerun without it on a CPU to export, evaluate and time
                 (the finished rungs are reused).
"""
import ml_collections

from nanoflux_jax.distill import shapes_teacher
from nanoflux_jax.distill import trainer

# Steps: teacher, each DiT rung, each text-encoder rung.
_STEPS = {'micro': (30, 4, 4), 'quick': (500, 100, 60),
          'full': (15000, 1500, 600)}


def get_config(arg: str = 'quick'):
  variant, *opts = (arg or 'quick').split(',')
  if variant not in _STEPS:
    raise ValueError(f'shapes config: unknown variant {variant!r}; known: '
                     f'{sorted(_STEPS)}')
  teacher_steps, dit_steps, te_steps = _STEPS[variant]
  c = ml_collections.ConfigDict()
  c.mesh = {'data': -1, 'fsdp': 1, 'tensor': 1}

  t = shapes_teacher.default_config()
  t.train.num_steps = teacher_steps
  t.train.warmup_steps = min(100, teacher_steps // 10)
  t.train.sample_every = t.train.checkpoint_every = max(teacher_steps // 4, 1)
  t.train.log_every = max(teacher_steps // 20, 1)
  if variant == 'full':
    t.flux.update(hidden_size=192, num_heads=6)
    t.train.batch_size = 64
    t.pool_size = 50_000
  elif variant == 'micro':  # Fewer, narrower blocks: less to compile.
    t.flux.update(hidden_size=64, num_heads=4, head_dim=16, axes_dim=(4, 6, 6),
                  depth=1, depth_single_blocks=3)
    t.pool_size = 256
  c.teacher = {'path': '', 'preset': '', 'pipeline': '', 'shapes': t}
  grid = (t.resolution // (2 * t.pixel_factor),) * 2
  steps = t.train.num_sampling_steps

  # Every DiT rung's distillation: output KD on cached teacher trajectories
  # of training-world captions (one cache, shared by the rungs).
  d = trainer.default_config()
  d.compute_dtype = 'float32'
  d.num_steps = dit_steps
  d.batch_size = 16 if variant != 'full' else 32
  d.learning_rate = 5e-4
  d.warmup_steps = max(dit_steps // 10, 1)
  d.num_sampling_steps = steps
  d.log_every = max(dit_steps // 10, 1)
  d.checkpoint_every = max(dit_steps // 2, 1)
  d.async_checkpoint = False
  d.data.prompts = 'shapes:4096'
  d.data.grid = grid
  d.data.txt_len = t.txt_len
  d.data.cache_dir = 'teacher_cache'   # relative: inside the workdir.
  d.data.cache_shards = 64
  c.distill = d

  te = {'num_steps': te_steps, 'batch_size': d.batch_size,
        'learning_rate': 1e-3, 'warmup_steps': max(te_steps // 10, 1),
        'compute_dtype': 'float32', 'num_sampling_steps': steps,
        'log_every': max(te_steps // 10, 1),
        'checkpoint_every': te_steps, 'async_checkpoint': False,
        'student': {'num_layers': 1},
        'loss': {'lambda_emb': 1.0, 'lambda_vis': 1.0, 'vis_blocks': (0,)},
        'data': {'prompts': 'shapes:4096', 'txt_len': t.txt_len,
                 'grid': grid}}
  emb_only = {**te, 'loss': {**te['loss'], 'lambda_vis': 0.0}}
  c.rungs = [
      {'kind': 'prune', 'criterion': 'taylor', 'keep_heads': 0.5,
       'keep_mlp': 0.25, 'scope': 'global', 'calib_n': 8, 'distill': {}},
      {'kind': 'depth', 'keep_blocks': 4, 'criterion': 'block_io',
       'calib_n': 8, 'distill': {}},
      {'kind': 'static_modulation', 'distill': {}},
      # A second, MLP-only pass on the static student, whose AdaLN layers
      # (a third of the teacher) are gone: the budget is >= 4x fewer params.
      {'kind': 'prune', 'criterion': 'taylor', 'keep_heads': 1.0,
       'keep_mlp': 0.7, 'scope': 'global', 'calib_n': 8, 'distill': {}},
      {'kind': 'downsample', 'start': 1, 'end': -2, 'factor': 2,
       'channels': 16, 'distill': {}},
      {'kind': 'text_encoder', 'distill': te},
      {'kind': 'text_encoder', 'ablation': True, 'distill': emb_only},
      {'kind': 'export', 'quantize': ('none', 'int8')},
  ]
  c.samples = {'prompts': 'shapes:16:1', 'num': 16, 'seed': 0, 'scale': 1}
  c.timing = {'repeats': 5}
  c.evaluate = {
      'world_seed': 1000, 'num_prompts': {'micro': 8, 'quick': 32,
                                          'full': 256}[variant],
      'noise_seed': 0, 'num_reference': 512 if variant != 'micro' else 64,
      'classifier_steps': {'micro': 30, 'quick': 500, 'full': 1500}[variant],
      # LiteRT ms of every rung costs an fp32 export per rung (the export
      # rung's files are always timed).
      'repeats': 5 if variant != 'micro' else 1,
      'timing_batch': 8 if variant != 'micro' else 1,
      'litert': variant == 'full',
      'num_threads': 2, 'grid_images': 16}
  if variant == 'micro':  # 4 blocks: keep 3, down-sample the middle one.
    c.rungs[1]['keep_blocks'] = 3
    c.distill.data.cache_shards = 2
    c.distill.checkpoint_every = dit_steps
    t.train.sample_every = t.train.checkpoint_every = teacher_steps
  for o in opts:
    key, _, value = o.partition('=')
    if key == 'stop_after':
      c.distill.stop_after = int(value)
      t.train.stop_after = int(value)
    elif key == 'train_only':
      c.rungs = [r for r in c.rungs if r['kind'] != 'export']
      del c.evaluate
    else:
      raise ValueError(f'shapes config: unknown option {o!r}')
  return c
