"""Evaluation of every ladder rung on the shapes world, and its report.

After the last rung, `evaluate_stages` runs each stage (the teacher, every
rung, the exported .tflite folders) on the same held-out prompts and noise:
toy-GenEval, toy-FID, PSNR against the teacher's images, JAX ms per image
and LiteRT ms per image. Results are cached per stage in {stage
dir}/eval.json (+ eval_images.npy), so a rerun only evaluates what is new;
delete those files to re-measure (e.g. on a quieter machine).

`markdown(report)` renders the evaluation table, the ablation rungs against
the main rungs they stand in for ((a) the student without the token
down-sampler, (b) a student text encoder trained on embedding MSE only,
(c) other distillation losses) and the targets of config.evaluate.targets,
each marked met or missed with its numbers. toy-GenEval is judged by the
classifier shipped with the package (data.shapes.classifier_path()) and
carries a 95% Wilson interval.
"""
from __future__ import annotations

import json
import os
import tempfile

from absl import logging
import jax
import numpy as np

from nanoflux_jax import atomic
from nanoflux_jax import images
from nanoflux_jax.shapes import classifier as clf_lib
from nanoflux_jax.shapes import scoring as toy
from nanoflux_jax.export import bundle
from nanoflux_jax.export import runner


def _save(stage_dir: str, ev: dict, imgs: np.ndarray) -> None:
  """eval_images.npy, then eval.json (the marker), each atomically."""
  atomic.write_file(os.path.join(stage_dir, 'eval_images.npy'),
                    lambda f: np.save(f, imgs), 'wb')
  atomic.write_file(os.path.join(stage_dir, 'eval.json'),
                    lambda f: json.dump(ev, f, indent=2))


def _eval_pipeline(ctx, stage, s, clf, teacher_images, e
                   ) -> tuple[dict, np.ndarray]:
  """A JAX stage: images, scores, JAX ms and (optionally) LiteRT ms."""
  steps, txt_len = len(ctx.schedule) - 1, ctx.config.distill.data.txt_len
  pipe = ctx.pipeline_for(stage['dit'](), stage['text_encoder'])
  imgs = toy.generate(pipe, s, steps, txt_len)
  ev = toy.scores(clf, imgs, s, teacher_images)
  ms = toy.jax_ms_per_image(pipe, s, steps, txt_len, e.repeats,
                            e.timing_batch)
  ev['jax_ms'], ev['denoise_ms'] = ms['total'], ms['denoise']
  ev['litert_ms'] = None
  if e.litert:  # fp32 export of this stage, timed, then thrown away.
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
  per_q, imgs = {}, None
  for name, info in stage['exports'].items():
    tp = runner.TFLitePipeline(os.path.join(ctx.workdir, info['dir']),
                               e.num_threads)
    imgs = toy.generate_litert(tp, s)
    per_q[name] = dict(toy.scores(clf, imgs, s, teacher_images),
                       litert_ms=toy.litert_ms_per_image(tp, s, e.repeats),
                       mb=info['mb'], dir=info['dir'])
  return dict(per_q[name], jax_ms=None, denoise_ms=None, shown=name,
              exports=per_q), imgs


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
  world = e.get('world', 'shapes')   # data.shapes.WORLDS.
  s = toy.eval_set(e.world_seed, e.num_prompts, ctx.resolution,
                   (ctx.grid[0] * ctx.grid[1], cfg.in_channels),
                   e.noise_seed, e.num_reference, world)
  clf = clf_lib.load_judge(e.get('classifier') or '', world, ctx.resolution)
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
              noise_seed=e.noise_seed, num_reference=e.num_reference,
              txt_len=ctx.config.distill.data.txt_len,
              resolution=ctx.resolution, num_steps=len(ctx.schedule) - 1,
              device=jax.devices()[0].device_kind,
              timing_batch=e.timing_batch, num_threads=e.num_threads,
              classifier_accuracy=clf_lib.evaluate_on_world(clf, n=256),
              targets=dict(e.get('targets') or {}),
              # Reports of the classic world stay as they were.
              **({'world': world} if world != 'shapes' else {}))


# ---------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------
def _f(v, spec: str) -> str:
  return '-' if v is None else format(v, spec)


def _target(ok: bool | None, text: str) -> str:
  mark = 'n/a' if ok is None else ('met' if ok else '**MISSED**')
  return f'- {mark}: {text}'


def _gen(ev: dict) -> str:
  """'0.912 [0.885, 0.933]': toy-GenEval and its 95% interval."""
  ci = ev.get('geneval_ci')
  return f"{ev['geneval']:.3f}" + (
      f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')


# A main rung's measured denoise speed-up over the teacher should reach this
# fraction of its FLOP ratio (config.evaluate.targets
# 'min_speedup_of_flop_ratio' overrides it): savings that follow the FLOPs.
MIN_SPEEDUP_OF_FLOP_RATIO = 0.8


def flop_ratio(teacher: dict, row: dict) -> float | None:
  """Teacher FLOPs / the row's FLOPs per denoising step.

  A row's `gflops` is one DiT forward per image (compress.count_flops: the
  token down-sampler's coarse blocks and resampler, static modulation and
  pruned widths included); one denoising step is one forward and FLOPs are
  linear in the batch, so the ratio at the evaluation batch is this one.
  """
  if not row.get('gflops') or not teacher.get('gflops'):
    return None
  return teacher['gflops'] / row['gflops']


def denoise_speedup(teacher: dict, row: dict) -> float | None:
  """Teacher JAX denoise ms / the row's, per image (None: not timed)."""
  a, b = teacher['eval'].get('denoise_ms'), row['eval'].get('denoise_ms')
  return a / b if a and b else None


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
      "prompted object's shape and colour at its position, with its 95% "
      'Wilson interval; toy-FID: Fréchet distance of classifier features to '
      "real renderings; PSNR: against the teacher's image from the same "
      'noise. ms per image: median; JAX: a batch of '
      f"{ev_setup['timing_batch']} prompts / {ev_setup['timing_batch']}, "
      'the denoising loop alone and the whole pipeline (encode + denoise + '
      'decode); LiteRT: one prompt through the batch-1 .tflite files, '
      f"{ev_setup['num_threads']} threads; evaluated and timed on "
      f"{ev_setup.get('device', '-')}. Classifier accuracy on real "
      'renderings: ' + ', '.join(
          f'{k} {v:.3f}' for k, v in ev_setup['classifier_accuracy'].items())
      + '.', '',
      'Denoise speed-up: the teacher\'s JAX denoise ms / the rung\'s; FLOP '
      'ratio: the teacher\'s FLOPs per denoising step / the rung\'s.', '',
      '| rung | kind | DiT params | GFLOPs | JAX denoise ms / img | denoise '
      'speed-up | FLOP ratio | JAX ms / img | LiteRT ms / img | toy-GenEval '
      '[95% CI] | toy-FID | PSNR (dB) | grid |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in rows:
    ev = r['eval']
    name = r['name'] + (' (ablation)' if r.get('ablation') else '')
    if ev.get('shown'):
      name += f" ({ev['shown']} .tflite)"
    out.append(
        f"| {name} | {r.get('kind', '-')} | {r['params']:,} | "
        f"{r['gflops']:.3g} | {_f(ev.get('denoise_ms'), '.1f')} | "
        f"{_f(denoise_speedup(report['teacher'], r), '.2f')} | "
        f"{_f(flop_ratio(report['teacher'], r), '.2f')} | "
        f"{_f(ev['jax_ms'], '.1f')} | {_f(ev['litert_ms'], '.1f')} | "
        f"{_gen(ev)} | {ev['fid']:.3g} | {_f(ev['psnr'], '.2f')} | "
        f"[png]({ev['grid']}) |")
  for r in rows:
    if r['eval'].get('exports'):
      out += ['', '### TFLite exports', '',
              '| file set | MB | LiteRT ms / img | toy-GenEval [95% CI] | '
              'toy-FID | PSNR (dB) |', '|---|---:|---:|---:|---:|---:|']
      for q, x in r['eval']['exports'].items():
        out.append(f"| [{q}]({x['dir']}) | {x['mb']:.2f} | "
                   f"{x['litert_ms']:.1f} | {_gen(x)} | "
                   f"{x['fid']:.3g} | {_f(x['psnr'], '.2f')} |")
  # 1 and 2 objects (the classic world), 3 where a world has them.
  keys = ['1_object', '2_objects'] + (['3_objects'] if any(
      '3_objects' in (r['eval'].get('geneval_by_objects') or {})
      for r in rows) else [])
  out += ['', '### toy-GenEval by number of prompted objects', '',
          '| rung | ' + ' | '.join(
              k.replace('_', ' ') for k in keys) + ' |',
          '|---|' + '---:|' * len(keys)]
  for r in rows:
    by = r['eval'].get('geneval_by_objects') or {}
    cell = lambda k: '-' if k not in by else (
        f"{by[k]['score']:.3f} [{by[k]['ci'][0]:.3f}, {by[k]['ci'][1]:.3f}]"
        f" (n={by[k]['n']})")
    out.append(f"| {r['name']} | " + ' | '.join(cell(k) for k in keys) +
               ' |')
  out += ['', *_ablations_and_targets(report), '', '## Grids', '']
  out += [f"**{r['name']}**\n\n![{r['name']}]({r['eval']['grid']})\n"
          for r in rows]
  return '\n'.join(out) + '\n'


def _ablations(rungs: list[dict]) -> tuple[list[str], dict]:
  """The ablation section's lines, and the figures the targets check.

  An ablation rung is compared with the rung it stands in for: a
  `finetune` ablation (the student without the next rung's compression,
  trained as long) with the next rung, ablation or not; a text-encoder
  ablation with the text-encoder rung before it, ablation or not (else the
  last main one); any other ablation with the next main rung of its kind.
  """
  out, figures = ['## Ablations', ''], {}
  gen = lambda r: r['eval']['geneval']
  dms = lambda r: r['eval']['denoise_ms']
  main = [r for r in rungs if not r.get('ablation')]

  def counterpart(i, r):
    if r.get('kind') == 'finetune':
      return rungs[i + 1] if i + 1 < len(rungs) else None
    if r.get('kind') == 'text_encoder':
      same = ([m for m in rungs[:i] if m.get('kind') == 'text_encoder'] or
              [m for m in main if m.get('kind') == 'text_encoder'])
      return same[-1] if same else None
    same = [m for m in main[len([x for x in main if rungs.index(x) < i]):]
            if m.get('kind') == r.get('kind')]
    return same[0] if same else None

  loss_rows = []
  for i, r in enumerate(rungs):
    m = counterpart(i, r) if r.get('ablation') else None
    if m is None or m.get('kind') == 'finetune':
      continue
    if m.get('kind') == 'downsample' and r.get('kind') == 'finetune':
      figures['no_ds_slowdown'] = dms(r) / dms(m) - 1
      figures['no_ds_gain'] = gen(r) - gen(m)
      out.append(
          f"- (a) Without the token down-sampler ({r['name']}: the student "
          f"before {m['name']}, distilled as many steps): "
          f"{dms(r):.1f} vs {dms(m):.1f} JAX denoise ms per image "
          f"({100 * figures['no_ds_slowdown']:+.0f}% latency); toy-GenEval "
          f"{_gen(r['eval'])} vs {_gen(m['eval'])} with it "
          f"({figures['no_ds_gain']:+.3f}); DiT params {r['params']:,} vs "
          f"{m['params']:,}." + (
              ' The ladder goes on without the down-sampler.'
              if m.get('ablation') else ''))
    elif r.get('kind') == 'text_encoder':
      figures['emb_only_change'] = gen(r) - gen(m)
      # How far below the main rung its 95% interval reaches.
      figures['emb_only_ci_below'] = gen(m) - (
          m['eval'].get('geneval_ci') or [gen(m)])[0]
      figures['emb_only_vs'] = m['name']
      out.append(
          f"- (b) Text encoder trained on embedding MSE only ({r['name']}): "
          f"toy-GenEval {_gen(r['eval'])} vs {_gen(m['eval'])} with the "
          f"visual-cue loss ({m['name']}).")
    else:
      loss_rows += [(m, m), (r, m)]
  if loss_rows:
    out += ['', '(c) The distillation loss: the same compression and steps, '
            'different loss terms.', '',
            '| rung | loss terms (weights) | toy-GenEval [95% CI] | '
            'PSNR (dB) |', '|---|---|---:|---:|']
    seen = set()
    for r, m in loss_rows:
      if r['name'] in seen:
        continue
      seen.add(r['name'])
      terms = ', '.join(f'{k} {v:g}' for k, v in sorted(
          (r.get('loss_weights') or {}).items()))
      out.append(f"| {r['name']}{' (main)' if r is m else ''} | {terms} | "
                 f"{_gen(r['eval'])} | {_f(r['eval']['psnr'], '.2f')} |")
  if len(out) == 2:
    out.append('- (none in this ladder)')
  return out, figures


def _flop_targets(teacher: dict, main: list[dict], targets: dict
                  ) -> list[str]:
  """Per main rung timed in JAX: denoise speed-up >= fraction x FLOP ratio."""
  frac = targets.get('min_speedup_of_flop_ratio', MIN_SPEEDUP_OF_FLOP_RATIO)
  out = []
  for r in main:
    s, f = denoise_speedup(teacher, r), flop_ratio(teacher, r)
    if s is None or f is None:
      continue
    out.append(_target(s >= frac * f, (
        f"{r['name']}: denoising {s:.2f}x faster for {f:.2f}x fewer FLOPs, "
        f'{s / f:.2f} of the FLOP ratio (target >= {frac:g})')))
  return out


def _ablations_and_targets(report: dict) -> list[str]:
  teacher, rungs = report['teacher'], report['rungs']
  targets = report['evaluation'].get('targets') or {}
  main = [r for r in rungs if not r.get('ablation')]
  dit = [r for r in main if r.get('kind') not in ('text_encoder', 'export')]
  te_full = [r for r in main if r.get('kind') == 'text_encoder']
  exports = [r for r in rungs if r['eval'].get('exports')]
  final = (te_full or dit or [teacher])[-1]
  ms = lambda r: r['eval']['jax_ms']
  dms = lambda r: r['eval']['denoise_ms']
  gen = lambda r: r['eval']['geneval']
  out, fig = _ablations(rungs)
  out += ['', '## Targets', '',
          f"Final student: {final['name']}, against the teacher.", '']
  t = targets
  if 'min_param_ratio' in t:
    v = teacher['params'] / final['params']
    out.append(_target(v >= t['min_param_ratio'],
                       f'DiT params {v:.2f}x fewer (target >= '
                       f"{t['min_param_ratio']:g}x)"))
  for key, what, f in (('min_denoise_speedup', 'denoising', dms),
                       ('min_total_speedup', 'end to end', ms)):
    if key in t:
      v = f(teacher) / f(final)
      out.append(_target(v >= t[key],
                         f'{what} {v:.2f}x faster in JAX, {f(teacher):.1f} -> '
                         f'{f(final):.1f} ms per image (target >= '
                         f'{t[key]:g}x)'))
  if 'min_geneval_retention' in t:
    v = gen(final) / gen(teacher) if gen(teacher) else 0.0
    out.append(_target(
        v >= t['min_geneval_retention'],
        f"toy-GenEval {_gen(final['eval'])} vs the teacher's "
        f"{_gen(teacher['eval'])}: {100 * v:.1f}% kept (target >= "
        f"{100 * t['min_geneval_retention']:g}%)"))
  out += _flop_targets(teacher, main, t)
  if 'max_export_gap' in t:
    for r in exports:
      for q, x in r['eval']['exports'].items():
        gap = abs(x['geneval'] - gen(final))
        out.append(_target(
            gap <= t['max_export_gap'],
            f"{q} .tflite toy-GenEval {_gen(x)} vs the JAX student's "
            f"{gen(final):.3f}: gap {gap:.3f} (target <= "
            f"{t['max_export_gap']:g})"))
  if 'min_teacher_geneval' in t:
    out.append(_target(gen(teacher) >= t['min_teacher_geneval'],
                       f"teacher toy-GenEval {_gen(teacher['eval'])} "
                       f"(target >= {t['min_teacher_geneval']:g})"))
  if 'max_rung_drop' in t:
    prev = teacher
    for r in main:
      if r['eval'].get('exports'):
        continue
      drop = gen(prev) - gen(r)
      out.append(_target(drop <= t['max_rung_drop'],
                         f"{r['name']} costs {drop:+.3f} toy-GenEval (target"
                         f" <= {t['max_rung_drop']:g})"))
      prev = r
  no_ds = fig.get('no_ds_slowdown')
  if 'min_no_downsampler_slowdown' in t:
    out.append(_target(
        None if no_ds is None else no_ds >= t['min_no_downsampler_slowdown'],
        '(a) without the down-sampler denoising is '
        f"{'-' if no_ds is None else f'{100 * no_ds:+.0f}%'} slower (target "
        f">= +{100 * t['min_no_downsampler_slowdown']:g}%)"))
  if 'max_no_downsampler_gain' in t:
    gain = fig.get('no_ds_gain')
    out.append(_target(
        None if gain is None else gain <= t['max_no_downsampler_gain'],
        '(a) without the down-sampler toy-GenEval is '
        f"{'-' if gain is None else f'{gain:+.3f}'} (target: not better by "
        f"more than {t['max_no_downsampler_gain']:g})"))
  if 'emb_only_change' in fig:
    change, width = fig['emb_only_change'], fig['emb_only_ci_below']
    te = fig['emb_only_vs']
    out.append(_target(
        change < 0 and -change > width,
        f'(b) the embedding-MSE-only text encoder changes toy-GenEval by '
        f'{change:+.3f} (target: lower by more than the 95% interval, '
        f'{width:.3f} below {te})'))
  return out
