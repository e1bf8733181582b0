"""CLIP score and CLIP-space FID of every ladder rung (config.clip_eval).

  config.clip_eval = {'clip_path': '/ckpt/clip-vit-large-patch14',
                      'prompts': '/data/eval_prompts.txt', 'num': 0,
                      'seed': 0, 'batch_size': 0, 'grid_images': 8}
Empty clip_path: off. With it, each stage (the teacher, then every rung as
it finishes) generates one image per prompt from the same seeded noise with
its own DiT (and its own student T5 after a text_encoder rung), decoded by
the teacher pipeline's VAE, and `evaluate` returns:
  clip_score, clip_score_se   100 * max(cos(image, prompt), 0), mean and SE;
  clip_fid                    Fréchet distance of the CLIP image embeddings
                              to the teacher's images from the same noise.
The DiT is used where it lies: its sharded params go straight into the
jitted sampler in batches split over the mesh's data axes (no host copy);
CLIP's params are sharded by the same rules.

Results are cached in {stage dir}/clip_eval.json (keyed by the settings), the
teacher's embeddings in workdir/clip_eval/teacher.npz, so a resumed ladder
scores only what is new. `evaluate(ctx, student, text_encoder)` is the
evaluator proper (a context and a student in, a dict of metrics out);
`score_stages` is the ladder's hook; `markdown` renders the report section.
"""
from __future__ import annotations

import functools
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import images
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.ladder import rungs as rungs_lib
from nanoflux_jax.evaluate import clip_fid as fid_lib
from nanoflux_jax.evaluate import clip_score as score_lib

# Default settings; experiments/configs/ladder_schnell.py names them.
# batch_size 0: one image per data-parallel shard of the mesh.
DEFAULTS = dict(clip_path='', prompts='builtin', num=0, seed=0, batch_size=0,
                grid_images=8)
RESULT_FILE = 'clip_eval.json'
METRICS = ('clip_score', 'clip_score_se', 'clip_fid')


def settings(config) -> dict | None:
  """config.clip_eval with defaults filled in; None when off (no clip_path)."""
  c = config.get('clip_eval')
  c = dict(c.to_dict() if hasattr(c, 'to_dict') else (c or {}))
  if not c.get('clip_path'):
    return None
  unknown = sorted(set(c) - set(DEFAULTS))
  if unknown:
    raise ValueError(f'ladder: unknown clip_eval options {unknown}; known: '
                     f'{sorted(DEFAULTS)}')
  return {**DEFAULTS, **c}


def check_config(config) -> None:
  """Raises naming the clip_eval field before any work (no-op when off)."""
  s = settings(config)
  if s is None:
    return
  if not os.path.isfile(os.path.join(s['clip_path'], 'config.json')):
    raise FileNotFoundError(
        f"ladder: clip_eval.clip_path {s['clip_path']!r} is not a CLIPModel "
        'folder (config.json + model.safetensors + tokenizer files)')
  if not (config.teacher.get('pipeline') or config.teacher.get('shapes')):
    raise ValueError('ladder: clip_eval needs a teacher pipeline '
                     '(teacher.pipeline or teacher.shapes) to encode prompts '
                     'and decode images; a bare DiT teacher has neither')
  for key in ('num', 'seed', 'batch_size'):
    if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 0:
      raise ValueError(f'ladder: clip_eval.{key}={s[key]!r} must be an '
                       'integer >= 0')
  for key in ('grid_images',):
    if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
      raise ValueError(f'ladder: clip_eval.{key}={s[key]!r} must be an '
                       'integer >= 1')
  n = len(_prompts(s))
  if n < 2:
    raise ValueError(f"ladder: clip_eval.prompts {s['prompts']!r} gives {n} "
                     'prompt(s); CLIP-FID needs at least 2')


def _prompts(s: dict) -> list[str]:
  prompts = data_lib.load_prompts(s['prompts'])
  return prompts[:s['num']] if s['num'] else prompts


@functools.lru_cache(maxsize=2)
def _scorer(path: str, mesh, batch_size: int) -> score_lib.ClipScorer:
  """One CLIP per (folder, mesh): loaded once, reused by every stage."""
  return score_lib.ClipScorer.load(path, mesh=mesh, batch_size=batch_size)


def _batch_size(ctx, s: dict) -> int:
  return s['batch_size'] or parallel.num_batch_shards(ctx.mesh)


def _key(ctx, s: dict) -> dict:
  """What a cached result depends on."""
  return dict(clip_path=os.path.abspath(s['clip_path']),
              prompts=s['prompts'] if isinstance(s['prompts'], str)
              else list(s['prompts']), num=s['num'], seed=s['seed'],
              grid=list(ctx.grid), schedule=list(ctx.schedule),
              txt_len=ctx.config.distill.data.txt_len)


def _encoder(ctx, text_encoder: str | None):
  """prompts -> {'txt', 'y'}: the teacher's encoders, or its pipeline with
  the stage's student T5 (loaded once)."""
  if not text_encoder:
    return ctx.embed
  pipe = ctx.pipeline.with_text_encoder(text_encoder)

  def embed(prompts):
    txt, y = pipe.encode_prompt(prompts, ctx.config.distill.data.txt_len)
    return {'txt': np.asarray(txt), 'y': np.asarray(y)}
  return embed


def generate(ctx, student, prompts: list[str], seed: int, batch_size: int,
             text_encoder: str | None = None) -> np.ndarray:
  """uint8 images [N, R, R, 3] of `prompts` by `student` (cfg, params) from
  seeded noise (the same for every student), decoded by the teacher's VAE.

  Batches of `batch_size` (the last one padded) go over the mesh's data
  axes when they split evenly; the params stay sharded as they are. Prompts
  are encoded batch by batch, so host memory does not grow with N (T5-XXL
  embeddings are 4 MiB per prompt).
  """
  cfg, params = student
  (h, w), n = ctx.grid, len(prompts)
  noise = np.random.default_rng(seed).standard_normal(
      (n, h * w, cfg.in_channels), np.float32)
  sched = jnp.asarray(ctx.schedule, jnp.float32)
  grid = rungs_lib.img_grid(cfg, ctx.grid)
  split = batch_size % parallel.num_batch_shards(ctx.mesh) == 0
  embed = _encoder(ctx, text_encoder)
  out = []
  for i in range(0, n, batch_size):
    chunk, x = list(prompts[i:i + batch_size]), noise[i:i + batch_size]
    pad = batch_size - len(x)
    if pad:  # One compiled shape for every batch.
      chunk += chunk[-1:] * pad
      x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
    emb = embed(chunk)
    txt, y = emb['txt'], emb['y']
    if split:
      x, txt, y = (jax.device_put(a, parallel.batch_sharding(ctx.mesh, a.ndim))
                   for a in (x, txt, y))
    lat = sampling.denoise(
        cfg, params, x, sampling.image_ids(batch_size, h, w), txt,
        sampling.text_ids(batch_size, txt.shape[1]), y, sched, img_grid=grid)
    imgs = ctx.pipeline.decode_latents(lat, ctx.resolution, ctx.resolution)
    out.append(score_lib.to_host(imgs)[:batch_size - pad])
  return np.concatenate(out)


def _teacher_embeds(ctx, s: dict, scorer) -> np.ndarray:
  """CLIP image embeddings [N, P] of the teacher's images (computed once per
  settings, in workdir/clip_eval/teacher.npz)."""
  file = os.path.join(ctx.workdir, 'clip_eval', 'teacher.npz')
  key = json.dumps(_key(ctx, s), sort_keys=True)
  if os.path.isfile(file):
    with np.load(file) as z:
      if str(z['key']) == key:
        return z['embeds']
  imgs = generate(ctx, ctx.teacher, _prompts(s), s['seed'],
                  _batch_size(ctx, s))
  embeds = scorer.image_embeds(imgs)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(file), exist_ok=True)
    atomic.write_file(file, lambda f: np.savez(f, key=key, embeds=embeds),
                      'wb')
  return embeds


def evaluate(ctx, student, text_encoder: str | None = None, *,
             name: str = '') -> dict:
  """The CLIP metrics of one stage: its DiT `student` (cfg, params) and,
  after a text_encoder rung, its student T5 folder.

  Returns:
    {'clip_score', 'clip_score_se', 'clip_fid', 'clip_n'}; with `name`, a
    grid of the first images is written to samples/clip_{name}.png and
    named by 'clip_grid'.
  """
  s = settings(ctx.config)
  if s is None:
    raise ValueError('clip_eval.evaluate: config.clip_eval.clip_path is empty')
  batch = _batch_size(ctx, s)
  scorer = _scorer(s['clip_path'], ctx.mesh, batch)
  prompts = _prompts(s)
  reference = _teacher_embeds(ctx, s, scorer)
  imgs = generate(ctx, student, prompts, s['seed'], batch, text_encoder)
  # The teacher's own images give the reference embeddings again; computed
  # rather than copied, its CLIP-FID (~0) checks the pipeline is
  # deterministic.
  embeds = scorer.image_embeds(imgs)
  out = score_lib.clip_score(embeds, scorer.text_embeds(prompts))
  out = dict(clip_score=out['clip_score'],
             clip_score_se=out['clip_score_se'], clip_n=out['n'],
             clip_fid=fid_lib.clip_fid(embeds, reference))
  if name:
    png = os.path.join('samples', f'clip_{name}.png')
    if jax.process_index() == 0:
      images.save_grid(imgs[:s['grid_images']], os.path.join(ctx.workdir, png))
    out['clip_grid'] = png
  return out


def score_stages(ctx, stages: list[dict], report: dict) -> bool:
  """Adds the CLIP metrics to every stage row that lacks them.

  Args:
    stages: the ladder's stages (row, dit, text_encoder, dir, exports); an
      export stage takes the metrics of the stage before it (the JAX
      student it exported; score its .tflite files with
      experiments/evaluate_pipeline.py).
    report: gets report['clip_eval'], the settings.
  Returns:
    True when a row changed (the caller rewrites the report).
  """
  s = settings(ctx.config)
  if s is None:
    return False
  key = _key(ctx, s)
  report['clip_eval'] = dict(key, num_prompts=len(_prompts(s)))
  changed = False
  for i, stage in enumerate(stages):
    row = stage['row']
    if row.get('clip_score') is not None:
      continue
    file = os.path.join(stage['dir'], RESULT_FILE)
    cached = None
    if os.path.isfile(file):
      with open(file) as f:
        cached = json.load(f)
    if cached is not None and cached.get('key') == key:
      metrics = cached['metrics']
    elif stage.get('exports') and i:
      metrics = {k: v for k, v in stages[i - 1]['row'].items()
                 if k.startswith('clip_')}
      metrics['clip_of'] = stages[i - 1]['row']['name']
    else:
      logging.info('ladder: CLIP-scoring %s', row['name'])
      metrics = evaluate(ctx, stage['dit'](), stage.get('text_encoder'),
                         name=row['name'])
      if jax.process_index() == 0:
        os.makedirs(stage['dir'], exist_ok=True)
        atomic.write_file(file, lambda f, m=metrics: json.dump(
            dict(key=key, metrics=m), f, indent=2))
      logging.info('ladder: %s: %s', row['name'], metrics)
    row.update(metrics)
    changed = True
  return changed


def markdown(report: dict) -> str:
  """The CLIP section: score +- SE, change vs the teacher, CLIP-FID."""
  c = report.get('clip_eval') or {}
  rows = [report['teacher']] + report['rungs']
  base = report['teacher'].get('clip_score')
  out = ['## CLIP score', '',
         f"{c.get('num_prompts', '-')} prompts ({c.get('prompts', '-')}), "
         f"CLIP {c.get('clip_path', '-')}, the same noise for every row. "
         'CLIP score: 100 * max(cos(image, prompt), 0), mean +- standard '
         "error; change: relative to the teacher's; CLIP-FID: Fréchet "
         "distance of CLIP image embeddings to the teacher's images.", '',
         '| rung | kind | CLIP score | change | CLIP-FID | grid |',
         '|---|---|---:|---:|---:|---|']
  for r in rows:
    if r.get('clip_score') is None:
      continue
    change = ('-' if not base or r is report['teacher'] else
              f"{100 * (r['clip_score'] / base - 1):+.1f}%")
    grid = f"[png]({r['clip_grid']})" if r.get('clip_grid') else (
        f"as {r['clip_of']}" if r.get('clip_of') else '-')
    out.append(f"| {r['name']} | {r.get('kind', '-')} | "
               f"{r['clip_score']:.2f} +- {r['clip_score_se']:.2f} | "
               f"{change} | {r['clip_fid']:.4g} | {grid} |")
  return '\n'.join(out) + '\n'
