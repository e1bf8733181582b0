"""Evaluation of every ladder rung on the shapes world, and its report.

After the last rung, `evaluate_stages` runs each stage (the teacher, every
rung, the exported .tflite folders) on the same held-out prompts and noise:
toy-GenEval, toy-FID, PSNR against the teacher's images, JAX ms per image
and LiteRT ms per image. Results are cached per stage in {stage
dir}/eval.json (+ eval_images.npy), so a rerun only evaluates what is new;
delete those files to re-measure (e.g. on a quieter machine).

`markdown(report)` renders the evaluation table, the two ablations (the
final student without the token down-sampler; a student text encoder
trained on embedding MSE only) and the NanoFLUX targets, each marked met or
missed with its numbers.
"""
from __future__ import annotations

import json
import os
import tempfile

from absl import logging
import jax
import numpy as np

from nanoflux_jax import images
from nanoflux_jax.evaluate import classifier as clf_lib
from nanoflux_jax.evaluate import toy

# Targets (issue: the shapes-world ladder), checked in `markdown`.
MIN_PARAM_RATIO = 4.0
MIN_SPEEDUP = 3.0
MAX_GENEVAL_DROP = 0.05      # relative to the teacher.
MIN_TEACHER_GENEVAL = 0.8
MIN_NO_DOWNSAMPLER_SLOWDOWN = 0.3


def _save(stage_dir: str, ev: dict, imgs: np.ndarray) -> None:
  """eval_images.npy, then eval.json (the marker), each atomically."""
  os.makedirs(stage_dir, exist_ok=True)
  tmp = os.path.join(stage_dir, f'.eval_images.tmp-{os.getpid()}.npy')
  np.save(tmp, imgs)
  os.replace(tmp, os.path.join(stage_dir, 'eval_images.npy'))
  tmp = os.path.join(stage_dir, f'.eval.tmp-{os.getpid()}.json')
  with open(tmp, 'w') as f:
    json.dump(ev, f, indent=2)
  os.replace(tmp, os.path.join(stage_dir, 'eval.json'))


def _eval_pipeline(ctx, stage, s, clf, teacher_images, e
                   ) -> tuple[dict, np.ndarray]:
  """A JAX stage: images, scores, JAX ms and (optionally) LiteRT ms."""
  steps, txt_len = len(ctx.schedule) - 1, ctx.config.distill.data.txt_len
  pipe = ctx.pipeline_for(stage['dit'](), stage['text_encoder'])
  imgs = toy.generate(pipe, s, steps, txt_len)
  ev = toy.scores(clf, imgs, s, teacher_images)
  ev['jax_ms'] = toy.jax_ms_per_image(pipe, s, steps, txt_len, e.repeats,
                                      e.timing_batch)
  ev['litert_ms'] = None
  if e.litert:  # fp32 export of this stage, timed, then thrown away.
    # pylint: disable-next=g-import-not-at-top
    from nanoflux_jax.export import bundle, runner
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'tflite')
      bundle.export_pipeline(pipe, out, ctx.resolution, ctx.resolution,
                             num_steps=steps, max_sequence_length=txt_len)
      ev['litert_ms'] = toy.litert_ms_per_image(
          runner.TFLitePipeline(out, e.num_threads), s, e.repeats)
  return ev, imgs


def _eval_exports(ctx, stage, s, clf, teacher_images, e
                  ) -> tuple[dict, np.ndarray]:
  """An export stage: every quantization through LiteRT; the row shows the
  last one (the smallest, int8, in the default config)."""
  # pylint: disable-next=g-import-not-at-top
  from nanoflux_jax.export import runner
  per_q, imgs = {}, None
  for name, info in stage['exports'].items():
    tp = runner.TFLitePipeline(os.path.join(ctx.workdir, info['dir']),
                               e.num_threads)
    imgs = toy.generate_litert(tp, s)
    per_q[name] = dict(toy.scores(clf, imgs, s, teacher_images),
                       litert_ms=toy.litert_ms_per_image(tp, s, e.repeats),
                       mb=info['mb'], dir=info['dir'])
  return dict(per_q[name], jax_ms=None, shown=name, exports=per_q), imgs


def evaluate_stages(ctx, stages: list[dict]) -> dict:
  """Fills stage['row']['eval'] for every stage; returns the setup summary.

  Args:
    ctx: the ladder Context (config.evaluate, pipeline, workdir, grid).
    stages: dicts with row, dit (a callable -> (cfg, params)), text_encoder
      (a student T5 folder or None), dir (where eval.json goes) and, for
      export rungs, exports {name: {'dir', 'mb'}}. The first is the teacher.
  """
  e = ctx.config.evaluate
  cfg = ctx.pipeline.flux_cfg
  s = toy.eval_set(e.world_seed, e.num_prompts, ctx.resolution,
                   (ctx.grid[0] * ctx.grid[1], cfg.in_channels),
                   e.noise_seed, e.num_reference)
  clf = clf_lib.load_or_train(os.path.join(ctx.workdir, 'classifier'),
                              steps=e.classifier_steps,
                              resolution=ctx.resolution)
  teacher_images = None
  for stage in stages:
    row = stage['row']
    file = os.path.join(stage['dir'], 'eval.json')
    img_file = os.path.join(stage['dir'], 'eval_images.npy')
    if os.path.isfile(file) and os.path.isfile(img_file):
      with open(file) as f:
        ev = json.load(f)
      imgs = np.load(img_file)
    else:
      logging.info('ladder: evaluating %s on %d prompts', row['name'],
                   len(s.prompts))
      fn = _eval_exports if stage.get('exports') else _eval_pipeline
      ev, imgs = fn(ctx, stage, s, clf, teacher_images, e)
      if jax.process_index() == 0:  # Every host computes the same.
        _save(stage['dir'], ev, imgs)
      logging.info('ladder: %s: %s', row['name'], ev)
    if teacher_images is None:
      teacher_images = imgs
    png = os.path.join('samples', f"eval_{row['name']}.png")
    if jax.process_index() == 0:
      images.save_grid(imgs[:e.grid_images], os.path.join(ctx.workdir, png))
    row['eval'] = dict(ev, grid=png)
  return dict(num_prompts=len(s.prompts), world_seed=e.world_seed,
              resolution=ctx.resolution, num_steps=len(ctx.schedule) - 1,
              timing_batch=e.timing_batch, num_threads=e.num_threads,
              classifier_accuracy=clf_lib.evaluate_on_world(clf, n=256))


# ---------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------
def _f(v, spec: str) -> str:
  return '-' if v is None else format(v, spec)


def _target(ok: bool | None, text: str) -> str:
  mark = 'n/a' if ok is None else ('met' if ok else '**MISSED**')
  return f'- {mark}: {text}'


def markdown(report: dict) -> str:
  """The evaluation table, the ablations and the targets."""
  ev_setup = report['evaluation']
  rows = [report['teacher']] + report['rungs']
  out = [
      '## Evaluation', '',
      f"{ev_setup['num_prompts']} held-out prompts (world seed "
      f"{ev_setup['world_seed']}), the same noise for every row, "
      f"{ev_setup['num_steps']} Euler steps, {ev_setup['resolution']} px. "
      'toy-GenEval: fraction of images where the classifier reads every '
      "prompted object's shape and colour at its position; toy-FID: "
      'Fréchet distance of classifier features to real renderings; PSNR: '
      "against the teacher's image from the same noise. ms per image: "
      'encode + denoise + decode, median; JAX: a batch of '
      f"{ev_setup['timing_batch']} prompts / {ev_setup['timing_batch']}, "
      'LiteRT: one prompt through the batch-1 .tflite files, '
      f"{ev_setup['num_threads']} threads. Classifier accuracy on real "
      'renderings: ' + ', '.join(
          f'{k} {v:.3f}' for k, v in ev_setup['classifier_accuracy'].items())
      + '.', '',
      '| rung | kind | DiT params | GFLOPs | JAX ms / img | LiteRT ms / img '
      '| toy-GenEval | toy-FID | PSNR (dB) | grid |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in rows:
    ev = r['eval']
    name = r['name'] + (' (ablation)' if r.get('ablation') else '')
    if ev.get('shown'):
      name += f" ({ev['shown']} .tflite)"
    out.append(
        f"| {name} | {r.get('kind', '-')} | {r['params']:,} | "
        f"{r['gflops']:.3g} | {_f(ev['jax_ms'], '.1f')} | "
        f"{_f(ev['litert_ms'], '.1f')} | {ev['geneval']:.3f} | "
        f"{ev['fid']:.3g} | {_f(ev['psnr'], '.2f')} | [png]({ev['grid']}) |")
  for r in rows:
    if r['eval'].get('exports'):
      out += ['', '### TFLite exports', '',
              '| file set | MB | LiteRT ms / img | toy-GenEval | toy-FID | '
              'PSNR (dB) |', '|---|---:|---:|---:|---:|---:|']
      for q, x in r['eval']['exports'].items():
        out.append(f"| [{q}]({x['dir']}) | {x['mb']:.2f} | "
                   f"{x['litert_ms']:.1f} | {x['geneval']:.3f} | "
                   f"{x['fid']:.3g} | {_f(x['psnr'], '.2f')} |")
  out += ['', *_ablations_and_targets(report), '', '## Grids', '']
  out += [f"**{r['name']}**\n\n![{r['name']}]({r['eval']['grid']})\n"
          for r in rows]
  return '\n'.join(out) + '\n'


def _ablations_and_targets(report: dict) -> list[str]:
  teacher, rungs = report['teacher'], report['rungs']
  dit = [r for r in rungs if r.get('kind') not in ('text_encoder', 'export')]
  te = [r for r in rungs if r.get('kind') == 'text_encoder']
  te_full = [r for r in te if not r.get('ablation')]
  te_abl = [r for r in te if r.get('ablation')]
  final = (te_full or dit or [teacher])[-1]
  ms = lambda r: r['eval']['jax_ms']
  gen = lambda r: r['eval']['geneval']
  out = ['## Ablations', '']
  no_ds = None
  idx = [i for i, r in enumerate(rungs) if r.get('kind') == 'downsample']
  if idx and idx[-1] > 0 and rungs[idx[-1] - 1].get('kind') in (
      'prune', 'depth', 'static_modulation'):
    with_ds, without = rungs[idx[-1]], rungs[idx[-1] - 1]
    no_ds = ms(without) / ms(with_ds) - 1
    out.append(
        f"- Without the token down-sampler ({without['name']}, the same "
        f"student before it): {ms(without):.1f} vs {ms(with_ds):.1f} JAX ms "
        f"per image ({100 * no_ds:+.0f}% latency); toy-GenEval "
        f"{gen(without):.3f} vs {gen(with_ds):.3f}.")
  emb_only = None
  if te_full and te_abl:
    emb_only = gen(te_abl[-1]) - gen(te_full[-1])
    rel = 100 * emb_only / max(gen(te_full[-1]), 1e-9)
    out.append(
        f"- Text encoder trained on embedding MSE only ({te_abl[-1]['name']})"
        f": toy-GenEval {gen(te_abl[-1]):.3f} vs {gen(te_full[-1]):.3f} with "
        f"the visual-cue loss ({rel:+.1f}%"
        f"); toy-FID {te_abl[-1]['eval']['fid']:.3g} vs "
        f"{te_full[-1]['eval']['fid']:.3g}.")
  p_ratio = teacher['params'] / final['params']
  speed = ms(teacher) / ms(final)
  drop = (1 - gen(final) / gen(teacher)) if gen(teacher) else None
  out += ['', '## Targets', '', f"Final student: {final['name']}.", '',
          _target(p_ratio >= MIN_PARAM_RATIO,
                  f'DiT params {p_ratio:.2f}x fewer than the teacher '
                  f'(target >= {MIN_PARAM_RATIO:g}x)'),
          _target(speed >= MIN_SPEEDUP,
                  f'{speed:.2f}x faster per image in JAX (target >= '
                  f'{MIN_SPEEDUP:g}x)'),
          _target(None if drop is None else drop <= MAX_GENEVAL_DROP,
                  f'toy-GenEval {gen(final):.3f} vs teacher '
                  f"{gen(teacher):.3f}: "
                  f"{'-' if drop is None else f'{100 * drop:.1f}%'} lower "
                  f'(target <= {100 * MAX_GENEVAL_DROP:g}%)'),
          _target(gen(teacher) >= MIN_TEACHER_GENEVAL,
                  f'teacher toy-GenEval {gen(teacher):.3f} (target >= '
                  f'{MIN_TEACHER_GENEVAL:g})'),
          _target(None if no_ds is None
                  else no_ds >= MIN_NO_DOWNSAMPLER_SLOWDOWN,
                  'without the down-sampler latency is '
                  f"{'-' if no_ds is None else f'{100 * no_ds:+.0f}%'} "
                  f'(target >= +{100 * MIN_NO_DOWNSAMPLER_SLOWDOWN:g}%)'),
          _target(None if emb_only is None else emb_only < 0,
                  'embedding-MSE-only text encoder changes toy-GenEval by '
                  f"{'-' if emb_only is None else f'{emb_only:+.3f}'} "
                  '(target: lower)')]
  return out
