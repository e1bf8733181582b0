r"""The NanoFLUX ladder on FLUX.1-schnell (TPU pod; not run in tests).

  python experiments/ladder.py --config=experiments/configs/ladder_schnell.py:\
clip_path=/ckpt/clip-vit-large-patch14,eval_prompts=/data/eval_prompts.txt \
      --config.teacher.pipeline=/ckpt/FLUX.1-schnell \
      --config.distill.data.prompts=/data/prompts.txt \
      --workdir=gs://bucket/ladder
Launch the same command on every host. teacher.pipeline (a diffusers
FLUX.1-schnell folder) gives the prompts their real T5 / CLIP embeddings,
the text-encoder rung its teacher T5 and the export rung its VAE; with
teacher.path (a DiT alone) prompts get random stand-in embeddings and the
text-encoder and export rungs cannot run. Rungs follow the paper's order:
  0 prune      half the heads, 75% of MLP channels (Taylor sensitivity)
  1 depth      keep 40 of 57 blocks (block in/out similarity), merging the
               dropped ones into their neighbours
  2 static_modulation   AdaLN -> 4-step tables (~3.2B params less)
  3 downsample the ResNet token down-sampler over the middle blocks
  4 text_encoder        a small T5 learns T5-XXL through the frozen student
  5 export     int8 TFLite files of the student pipeline, 512 x 512
Each rung is distilled from the original schnell teacher. Config args
(comma-separated, after ':'): runlocal (2 steps per rung on one host);
clip_path (a local save of openai/clip-vit-large-patch14: CLIPModel +
tokenizer + processor) turns on the CLIP evaluator after every rung, on
eval_prompts (a file, one prompt per line or JSONL; e.g. 500 held-out
prompts) and eval_every (evaluate every N-th rung; the teacher and the last
rung always).
"""
from nanoflux_jax.config_arg import parse_arg
from nanoflux_jax.distill import t5_distill as text_encoder
from nanoflux_jax.distill import trainer

import ml_collections


def _distill(steps: int) -> dict:
  return {'num_steps': steps, 'warmup_steps': min(500, steps // 10)}


def get_config(arg: str = ''):
  a = parse_arg(arg, runlocal=False, clip_path='', eval_prompts='builtin',
                eval_every=1)
  c = ml_collections.ConfigDict()
  # 12B teacher + student + Adam state: FSDP over the whole pod slice.
  c.mesh = {'data': 1, 'fsdp': -1, 'tensor': 1}
  # True: resume a rung whose recorded settings differ from this config's
  # (refused otherwise, naming each difference); the change is recorded.
  c.accept_changed_settings = False
  # scan_blocks: the teacher, and so every student, keeps its runs of
  # identical blocks stacked and runs them as one lax.scan: FSDP gathers one
  # block at a time, not all of them (compress/layout.py, the README plan).
  c.teacher = {'path': '', 'pipeline': '', 'preset': '', 'seed': 0,
               'overrides': {}, 'scan_blocks': True}
  c.distill = trainer.default_config()
  c.distill.batch_size = 64
  c.distill.learning_rate = 1e-4
  c.distill.weight_decay = 0.01
  c.distill.remat = True
  c.distill.compute_dtype = 'bfloat16'
  c.distill.num_sampling_steps = 4          # schnell: 4 steps, no shift.
  c.distill.loss.weights = {'output_kd': 1.0, 'feature_kd': 0.1, 'rf': 0.0}
  c.distill.data = {'prompts': 'builtin', 'grid': (32, 32), 'txt_len': 256,
                    'cache_dir': '', 'cache_shards': 64}   # 512 x 512 px.
  c.distill.log_every = 50
  c.distill.checkpoint_every = 1000
  c.samples = {'prompts': 'builtin', 'num': 8, 'seed': 0, 'scale': 4}
  c.timing = {'repeats': 5}
  # CLIP score and CLIP-FID (vs the teacher's images, same noise) of the
  # teacher and the rungs, in report.json/md (ladder/clip_eval.py): on with
  # the clip_path config arg. batch_size 0: one image per data-parallel
  # shard.
  c.evaluate = [dict(type='clip', every=a.eval_every, clip_path=a.clip_path,
                     prompts=a.eval_prompts, num=0, seed=0, batch_size=0,
                     grid_images=8)] if a.clip_path else []
  te = text_encoder.default_config()
  te.student.num_layers = 12
  te.student.d_model = 1024
  te.data.grid = (32, 32)
  te.data.txt_len = 256
  te.compute_dtype = 'bfloat16'
  c.rungs = [
      # Feature KD only here: pruning keeps block indices aligned with the
      # teacher's; after the depth rung the pairs would have to be remapped.
      # scope='block': every block keeps the same widths, which the depth
      # rung's merge=True needs (it averages blocks of equal shapes).
      {'kind': 'prune', 'criterion': 'taylor', 'keep_heads': 0.5,
       'keep_mlp': 0.75, 'scope': 'block', 'calib_n': 8,
       'distill': {**_distill(20_000),
                   'loss': {'feature_pairs': ((4, 4), (18, 18), (40, 40))}}},
      {'kind': 'depth', 'keep_blocks': 40, 'criterion': 'block_io',
       'merge': True, 'calib_n': 8, 'distill': _distill(20_000)},
      {'kind': 'static_modulation', 'distill': _distill(10_000)},
      {'kind': 'downsample', 'start': 4, 'end': -5, 'factor': 2,
       'distill': _distill(20_000)},
      {'kind': 'text_encoder', 'teacher_t5': '', 'denoiser': 'student',
       'distill': {'num_steps': 20_000, 'batch_size': 64,
                   'student': te.student.to_dict(), 'data': te.data.to_dict(),
                   'compute_dtype': 'bfloat16'}},
      {'kind': 'export', 'quantize': ('int8',)},
  ]
  if a.runlocal:  # Plumbing check on one host: a few steps per rung.
    for r in c.rungs:
      if 'distill' not in r:  # The export rung trains nothing.
        continue
      r['distill'] = {**r['distill'], 'num_steps': 2}
      if 'warmup_steps' in r['distill']:
        r['distill']['warmup_steps'] = 1
    c.distill.batch_size = 2
  return c
