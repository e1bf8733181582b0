r"""CLIP score (and optionally CLIP-FID) of any FLUX pipeline on a prompts file.

  python experiments/evaluate_pipeline.py --pipeline=/ckpt/FLUX.1-schnell \
    --clip=/ckpt/clip-vit-large-patch14 --prompts=/data/eval_prompts.txt \
    --out_dir=/tmp/schnell_images [--reference=/tmp/teacher_images]

--pipeline: a diffusers FLUX folder, a folder written by FluxPipeline.save
(teacher or student), or a TFLite bundle (manifest.json, run through
TFLitePipeline at its exported size). --clip: a transformers CLIPModel folder
with its tokenizer and preprocessor_config.json (a local save of
openai/clip-vit-large-patch14). --prompts: a text file (one per line),
JSONL, or 'builtin'. Prints one row per prompt, then one JSON line with
clip_score and its standard error. --out_dir keeps the scored images as
{index:05d}.png (index = the prompt's position) so they can be re-scored by
another implementation; --reference adds clip_fid against the images of
such a folder (e.g. the teacher's --out_dir). Batch k of --batch_size
prompts uses noise seed --seed + k.
"""
import glob
import json
import os
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from nanoflux_jax import pipeline
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.evaluate import clip_fid
from nanoflux_jax.evaluate import clip_score
from nanoflux_jax.export import bundle
from nanoflux_jax.export import runner

_PIPELINE = flags.DEFINE_string('pipeline', None, 'Pipeline folder or TFLite '
                                'bundle.', required=True)
_CLIP = flags.DEFINE_string('clip', None, 'CLIPModel folder.', required=True)
_PROMPTS = flags.DEFINE_string('prompts', None, "Prompts file or 'builtin'.",
                               required=True)
_NUM = flags.DEFINE_integer('num', 0, 'Score the first N prompts (0: all).')
_HEIGHT = flags.DEFINE_integer('height', None, 'Pixels (default: the '
                               "pipeline's).")
_WIDTH = flags.DEFINE_integer('width', None, 'Pixels (default: the '
                              "pipeline's).")
_STEPS = flags.DEFINE_integer('steps', None, "Euler steps (default: the "
                              "pipeline's; TFLite: as exported).")
_SEED = flags.DEFINE_integer('seed', 0, 'Noise seed of the first batch.')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Prompts per pipeline call.')
_OUT_DIR = flags.DEFINE_string('out_dir', '', 'Keep the images here as PNGs.')
_REFERENCE = flags.DEFINE_string('reference', '', 'Folder of reference images '
                                 '(PNG / JPEG) for CLIP-FID.')
_THREADS = flags.DEFINE_integer('num_threads', 2, 'LiteRT threads (TFLite).')


def _reference_images(folder: str) -> list[np.ndarray]:
  files = sorted(f for ext in ('png', 'jpg', 'jpeg')
                 for f in glob.glob(os.path.join(folder, f'*.{ext}')))
  if len(files) < 2:
    raise FileNotFoundError(f'--reference={folder}: needs >= 2 PNG / JPEG '
                            f'images, found {len(files)}')
  return [np.asarray(Image.open(f).convert('RGB')) for f in files]


def _check_args() -> tuple[list[str], list[np.ndarray] | None, bool]:
  """(prompts, reference images or None, is a TFLite bundle); raises on a
  bad flag, naming it."""
  prompts = data_lib.load_prompts(_PROMPTS.value)
  pipeline.check_int('evaluate_pipeline.py', '--num', _NUM.value, 0)
  pipeline.check_int('evaluate_pipeline.py', '--batch_size', _BATCH.value)
  prompts = prompts[:_NUM.value] if _NUM.value else prompts
  for name, path in (('--pipeline', _PIPELINE.value), ('--clip', _CLIP.value)):
    if not os.path.isdir(path):
      raise FileNotFoundError(f'evaluate_pipeline.py: {name}={path} is not a '
                              'folder')
  reference = (_reference_images(_REFERENCE.value) if _REFERENCE.value
               else None)
  tflite = bundle.is_export(_PIPELINE.value)
  if tflite and _STEPS.value is not None:
    raise ValueError(f'evaluate_pipeline.py: --steps={_STEPS.value} does not '
                     f'apply to the TFLite bundle {_PIPELINE.value} (its '
                     'steps are exported in manifest.json)')
  return prompts, reference, tflite


def main(argv):
  del argv
  # Arguments and files are checked before any model is loaded.
  try:
    prompts, reference, tflite = _check_args()
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
  if tflite:
    pipe = runner.TFLitePipeline(_PIPELINE.value, _THREADS.value)
    kw = dict(height=_HEIGHT.value, width=_WIDTH.value)
  else:
    pipe = pipeline.FluxPipeline.from_pretrained(_PIPELINE.value)
    kw = dict(height=_HEIGHT.value, width=_WIDTH.value,
              num_steps=_STEPS.value)
  scorer = clip_score.ClipScorer.load(_CLIP.value, batch_size=_BATCH.value)

  t0, out = time.perf_counter(), []
  for k, i in enumerate(range(0, len(prompts), _BATCH.value)):
    chunk = prompts[i:i + _BATCH.value]
    # The last batch is padded with its last prompt: one compiled shape.
    pad = [chunk[-1]] * (_BATCH.value - len(chunk)) if not tflite else []
    batch = np.asarray(pipe(chunk + pad, seed=_SEED.value + k, **kw))
    batch = batch[:len(chunk)]
    out.append(batch)
    if _OUT_DIR.value:
      for j, img in enumerate(batch):
        Image.fromarray(img).save(
            os.path.join(_OUT_DIR.value, f'{i + j:05d}.png'))
  imgs = np.concatenate(out)
  secs = time.perf_counter() - t0
  img_emb, txt_emb = scorer.image_embeds(imgs), scorer.text_embeds(prompts)
  per = clip_score.clip_scores(img_emb, txt_emb)
  print('| # | CLIP score | prompt |\n|---:|---:|---|')
  for i, (p, s) in enumerate(zip(prompts, per)):
    print(f'| {i} | {s:.2f} | {p} |')
  result = dict(clip_score.clip_score(img_emb, txt_emb),
                pipeline=_PIPELINE.value, kind='tflite' if tflite else 'jax',
                clip=_CLIP.value, prompts=_PROMPTS.value,
                resolution=list(imgs.shape[1:3]), seed=_SEED.value,
                generate_s=round(secs, 3))
  if reference is not None:
    result['clip_fid'] = clip_fid.clip_fid(
        img_emb, np.concatenate([scorer.image_embeds(r[None])
                                 for r in reference]))
  if _OUT_DIR.value:
    result['out_dir'] = _OUT_DIR.value
  print(f"CLIP score {result['clip_score']:.3f} +- "
        f"{result['clip_score_se']:.3f} (SE) over {result['n']} prompts"
        + (f", CLIP-FID {result['clip_fid']:.4g}" if reference is not None
           else ''))
  print(json.dumps(result, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
