"""The 'clip' evaluator: CLIP score and CLIP-space FID of ladder stages.

  config.evaluate = [dict(type='clip', every=1,
                          clip_path='/ckpt/clip-vit-large-patch14',
                          prompts='/data/eval_prompts.txt', num=0, seed=0,
                          batch_size=0, grid_images=8)]
Each evaluated stage (the teacher, then the rungs as they finish; see
evaluators.py for `every` and the cache) generates one image per prompt
from the same seeded noise with its own DiT, its own sampling steps and
schedule (and its own student T5 after a text_encoder rung), decoded by the
teacher pipeline's VAE, and `evaluate` returns:
  clip_score, clip_score_se   100 * max(cos(image, prompt), 0), mean and SE;
  clip_fid                    Fréchet distance of the CLIP image embeddings
                              to the teacher's images from the same noise.
The DiT is used where it lies: its sharded params go straight into the
jitted sampler in batches split over the mesh's data axes (no host copy);
CLIP's params are sharded by the same rules. The teacher's embeddings are
kept in {teacher dir}/clip_embeds.npz. Importing this module registers the
evaluator.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import images
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.ladder import evaluators
from nanoflux_jax.ladder import rungs as rungs_lib
from nanoflux_jax.evaluate import clip_fid as fid_lib
from nanoflux_jax.evaluate import clip_score as score_lib

# Default settings; experiments/configs/ladder_schnell.py names them.
# batch_size 0: one image per data-parallel shard of the mesh.
DEFAULTS = dict(clip_path='', prompts='builtin', num=0, seed=0, batch_size=0,
                grid_images=8)
EMBEDS_FILE = 'clip_embeds.npz'  # The teacher's, in its folder.
METRICS = ('clip_score', 'clip_score_se', 'clip_fid')


def check(config, s: dict, where: str) -> None:
  """Raises naming `where` (config.evaluate[i]) and the field, before any
  work."""
  if not s['clip_path'] or not os.path.isfile(
      os.path.join(s['clip_path'], 'config.json')):
    raise FileNotFoundError(
        f"{where}: clip_path {s['clip_path']!r} is not a CLIPModel "
        'folder (config.json + model.safetensors + tokenizer files)')
  if not (config.teacher.get('pipeline') or config.teacher.get('shapes')):
    raise ValueError(f'{where}: the CLIP evaluator needs a teacher pipeline '
                     '(teacher.pipeline or teacher.shapes) to encode prompts '
                     'and decode images; a bare DiT teacher has neither')
  for key in ('num', 'seed', 'batch_size'):
    if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 0:
      raise ValueError(f'{where}: {key}={s[key]!r} must be an integer >= 0')
  for key in ('grid_images',):
    if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
      raise ValueError(f'{where}: {key}={s[key]!r} must be an integer >= 1')
  n = len(_prompts(s))
  if n < 2:
    raise ValueError(f"{where}: prompts {s['prompts']!r} gives {n} "
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
             schedule, text_encoder: str | None = None) -> np.ndarray:
  """uint8 images [N, R, R, 3] of `prompts` by `student` (cfg, params) from
  seeded noise (the same for every student), sampled on `schedule` (the
  stage's timesteps, 1 -> 0) and decoded by the teacher's VAE.

  Batches of `batch_size` (the last one padded) go over the mesh's data
  axes when they split evenly; the params stay sharded as they are. Prompts
  are encoded batch by batch, so host memory does not grow with N (T5-XXL
  embeddings are 4 MiB per prompt).
  """
  cfg, params = student
  (h, w), n = ctx.grid, len(prompts)
  noise = np.random.default_rng(seed).standard_normal(
      (n, h * w, cfg.in_channels), np.float32)
  sched = jnp.asarray(schedule, jnp.float32)
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


def _images(ctx, sub, s: dict) -> np.ndarray:
  """The stage's images of the evaluation prompts (its DiT, its student T5
  if any, its own schedule)."""
  return generate(ctx, sub.load(), _prompts(s), s['seed'],
                  _batch_size(ctx, s), sub.stage.schedule, sub.text_encoder)


def _teacher_embeds(ctx, teacher, s: dict, scorer) -> np.ndarray:
  """CLIP image embeddings [N, P] of the teacher's images: computed once per
  options in {teacher dir}/clip_embeds.npz, keyed by them and the teacher's
  stage key."""
  file = os.path.join(teacher.dir, EMBEDS_FILE)
  key = json.dumps(dict({k: v for k, v in s.items() if k not in (
      'every', 'grid_images')}, stage=teacher.key), sort_keys=True)
  if os.path.isfile(file):
    with np.load(file) as z:
      if str(z['key']) == key:
        return z['embeds']
  embeds = scorer.image_embeds(_images(ctx, teacher, s))
  if jax.process_index() == 0:
    os.makedirs(teacher.dir, exist_ok=True)
    atomic.write_file(file, lambda f: np.savez(f, key=key, embeds=embeds),
                      'wb')
  return embeds


def evaluate(ctx, sub, s: dict, done: list) -> dict:
  """The 'clip' evaluator: the CLIP metrics of one stage (evaluators.py).

  An export stage takes the metrics of the stage with its DiT and text
  encoder (the JAX student it exported; score its .tflite files with
  experiments/evaluate_pipeline.py) and names it in 'clip_of'.

  Returns:
    {'clip_score', 'clip_score_se', 'clip_fid', 'clip_n', 'clip_grid'}:
    clip_grid is samples/clip_{name}.png, a grid of the first images.
  """
  if sub.role == 'export':
    same = [(d, m) for d, m in done if d.index and d.role != 'export' and
            d.key.get('dit') == sub.key.get('dit') and
            d.key.get('text_encoder') == sub.key.get('text_encoder')]
    if same:
      d, m = same[-1]
      return dict({k: v for k, v in m.items() if k != 'clip_grid'},
                  clip_of=d.name)
  batch = _batch_size(ctx, s)
  scorer = _scorer(s['clip_path'], ctx.mesh, batch)
  prompts = _prompts(s)
  teacher = done[0][0] if done else sub
  reference = _teacher_embeds(ctx, teacher, s, scorer)
  imgs = _images(ctx, sub, s)
  # The teacher's own images give the reference embeddings again; computed
  # rather than copied, its CLIP-FID (~0) checks the pipeline is
  # deterministic.
  embeds = scorer.image_embeds(imgs)
  out = score_lib.clip_score(embeds, scorer.text_embeds(prompts))
  png = os.path.join('samples', f'clip_{sub.name}.png')
  if jax.process_index() == 0:
    images.save_grid(imgs[:s['grid_images']], os.path.join(ctx.workdir, png))
  return dict(clip_score=out['clip_score'],
              clip_score_se=out['clip_score_se'], clip_n=out['n'],
              clip_fid=fid_lib.clip_fid(embeds, reference), clip_grid=png,
              num_steps=sub.num_steps)


def summary(ctx, s: dict) -> dict:
  """The report's setup line: the prompt count and CLIP folder."""
  return dict(num_prompts=len(_prompts(s)),
              clip_path=os.path.abspath(s['clip_path']),
              txt_len=int(ctx.config.distill.data.txt_len))


def markdown(section: dict, rows: list[dict]) -> str:
  """The CLIP section: score +- SE, change vs the teacher, CLIP-FID."""
  res, s = section.get('rows') or {}, section.get('options') or {}
  setup = section.get('setup') or {}
  base = (res.get(rows[0]['name']) or {}).get('clip_score')
  out = ['## CLIP score', '',
         f"{setup.get('num_prompts', '-')} prompts ({s.get('prompts', '-')}),"
         f" CLIP {setup.get('clip_path', s.get('clip_path', '-'))}, the same "
         'noise for every row, each stage with its own sampling steps. '
         'CLIP score: 100 * max(cos(image, prompt), 0), mean +- standard '
         "error; change: relative to the teacher's; CLIP-FID: Fréchet "
         "distance of CLIP image embeddings to the teacher's images.", '',
         '| rung | kind | steps | CLIP score | change | CLIP-FID | grid |',
         '|---|---|---:|---:|---:|---:|---|']
  for i, r in enumerate(rows):
    m = res.get(r['name'])
    if m is None:
      continue
    change = ('-' if not base or i == 0 else
              f"{100 * (m['clip_score'] / base - 1):+.1f}%")
    grid = f"[png]({m['clip_grid']})" if m.get('clip_grid') else (
        f"as {m['clip_of']}" if m.get('clip_of') else '-')
    out.append(f"| {r['name']} | {r.get('kind', '-')} | "
               f"{m.get('num_steps', '-')} | "
               f"{m['clip_score']:.2f} +- {m['clip_score_se']:.2f} | "
               f"{change} | {m['clip_fid']:.4g} | {grid} |")
  return '\n'.join(out) + '\n'


evaluators.register_evaluator(
    'clip', defaults=DEFAULTS, check=check, summary=summary,
    markdown=markdown)(evaluate)
