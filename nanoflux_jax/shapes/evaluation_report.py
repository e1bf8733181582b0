"""report.md's section of the 'shapes' evaluator (shapes/evaluation.py).

`markdown(section, rows)` renders the evaluation table, the exports, the
ablations and the targets of the evaluator's `targets` option, each marked
met or missed with its numbers. Nothing here knows a rung kind by name: a
row's `role` (its rung kind's declared role: 'denoiser', 'text_encoder',
'export'; None for the teacher), its `ablation` flag and its measured size
say what it is, and each ablation is compared with a rung found from those
(`counterpart`), named in the text.
"""
from __future__ import annotations

from nanoflux_jax.evaluate.tables import cell

# A main rung's measured denoise speed-up over the teacher should reach this
# fraction of its FLOP ratio (target 'min_speedup_of_flop_ratio' overrides
# it): savings that follow the FLOPs.
MIN_SPEEDUP_OF_FLOP_RATIO = 0.8
# The targets the evaluator's `targets` option may set (final: the last main
# rung that is not an export; control: an ablation that trains the student
# it started from unchanged in size, against the rung after it).
TARGETS = {
    'min_param_ratio': 'teacher / final DiT params',
    'min_denoise_speedup': 'teacher / final JAX denoise ms',
    'min_total_speedup': 'teacher / final JAX ms, end to end',
    'min_geneval_retention': 'final / teacher toy-GenEval',
    'max_export_gap': '|.tflite - final JAX toy-GenEval|',
    'min_teacher_geneval': 'teacher toy-GenEval',
    'max_rung_drop': 'toy-GenEval lost by each main rung',
    'min_speedup_of_flop_ratio': 'denoise speed-up / FLOP ratio',
    'min_control_slowdown': 'a control ablation is slower by at least this',
    'max_control_gain': 'a control ablation scores at most this much higher',
    'ablations_lower_by_ci': 'roles whose ablations must score lower than '
                             'their counterpart by more than its 95% interval',
}


def _target(ok: bool | None, text: str) -> str:
  mark = 'n/a' if ok is None else ('met' if ok else '**MISSED**')
  return f'- {mark}: {text}'


def _gen(ev: dict) -> str:
  """'0.912 [0.885, 0.933]': toy-GenEval and its 95% interval."""
  ci = ev.get('geneval_ci')
  return f"{ev['geneval']:.3f}" + (
      f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')


def flop_ratio(teacher: dict, row: dict) -> float | None:
  """Teacher / row DiT FLOPs of one image's denoising loop.

  A row's `gflops` is one DiT forward per image (compress.count_flops: the
  token down-sampler's coarse blocks and resampler, static modulation and
  pruned widths included); a loop is one forward per Euler step (the
  stage's `num_steps`, where its metrics have them), and FLOPs are linear
  in the batch, so this is the ratio at the evaluation batch too: what
  the denoise speed-up, a ratio of whole loops, is held against.
  """
  if not row.get('gflops') or not teacher.get('gflops'):
    return None
  steps = lambda r: (r.get('eval') or {}).get('num_steps') or 1
  return teacher['gflops'] * steps(teacher) / (row['gflops'] * steps(row))


def speedup(teacher: dict, row: dict, part: str = 'denoise'
            ) -> float | None:
  """Teacher JAX ms / the row's, per image (None: not timed); part
  'denoise' (the Euler loop) or 'jax' (end to end). The teacher's time is
  the one taken interleaved with the row's (`teacher_{part}_ms`) where the
  row has it, else the teacher row's own (reports from before). A stage
  sampling with fewer steps gains from that too."""
  ev = row['eval']
  a = ev.get(f'teacher_{part}_ms') or teacher['eval'].get(f'{part}_ms')
  b = ev.get(f'{part}_ms')
  return a / b if a and b else None


def _merge(section: dict, rows: list[dict]) -> list[dict]:
  """rows with 'eval': the stage's metrics (None: not evaluated)."""
  res = section.get('rows') or {}
  return [dict(r, eval=res.get(r['name'])) for r in rows]


def markdown(section: dict, rows: list[dict]) -> str:
  """The section: table, exports, by object count, ablations, targets.

  Args:
    section: report['evaluation']['shapes'] ({'options', 'setup', 'rows'}).
    rows: the teacher's and rungs' report rows, each with 'role'.
  """
  setup = section.get('setup') or {}
  targets = dict((section.get('options') or {}).get('targets') or {})
  allrows = _merge(section, rows)
  shown = [r for r in allrows if r['eval'] is not None]
  teacher = allrows[0]
  acc = setup.get('classifier_accuracy') or {}
  out = [
      '## Evaluation', '',
      f"{setup.get('num_prompts', '-')} held-out prompts (world seed "
      f"{setup.get('world_seed', '-')}), the same noise for every row, each "
      f"stage with its own Euler steps, {setup.get('resolution', '-')} px. "
      'toy-GenEval: fraction of images where the classifier reads every '
      "prompted object's shape and colour at its position, with its 95% "
      'Wilson interval; toy-FID: Fréchet distance of classifier features to '
      "real renderings; PSNR: against the teacher's image from the same "
      'noise. ms per image: median; JAX: a batch of '
      f"{setup.get('timing_batch', '-')} prompts / "
      f"{setup.get('timing_batch', '-')}, the denoising loop alone and the "
      'whole pipeline (encode + denoise + decode); LiteRT: one prompt '
      f"through the batch-1 .tflite files, {setup.get('num_threads', '-')} "
      f"threads; evaluated and timed on {setup.get('device', '-')}. "
      'Classifier accuracy on real renderings: ' + ', '.join(
          f'{k} {v:.3f}' for k, v in acc.items()) + '.', '',
      'Denoise speed-up: the teacher\'s JAX denoise ms / the rung\'s, the '
      'teacher timed again interleaved with the rung (call by call, so '
      'machine load hits both alike); FLOP ratio: the teacher\'s DiT FLOPs '
      'over its denoising loop (GFLOPs per step x Euler steps) / the '
      'rung\'s.', '',
      '| rung | kind | Euler steps | DiT params | GFLOPs | JAX denoise ms / '
      'img | denoise speed-up | FLOP ratio | JAX ms / img | LiteRT ms / img '
      '| toy-GenEval [95% CI] | toy-FID | PSNR (dB) | grid |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in shown:
    ev = r['eval']
    name = r['name'] + (' (ablation)' if r.get('ablation') else '')
    if ev.get('shown'):
      name += f" ({ev['shown']} .tflite)"
    out.append(
        f"| {name} | {r.get('kind', '-')} | {ev.get('num_steps', '-')} | "
        f"{r['params']:,} | {r['gflops']:.3g} | "
        f"{cell(ev.get('denoise_ms'), '.1f')} | "
        f"{cell(speedup(teacher, r), '.2f')} | "
        f"{cell(flop_ratio(teacher, r), '.2f')} | "
        f"{cell(ev['jax_ms'], '.1f')} | {cell(ev['litert_ms'], '.1f')} | "
        f"{_gen(ev)} | {ev['fid']:.3g} | {cell(ev['psnr'], '.2f')} | "
        f"[png]({ev['grid']}) |")
  if len(shown) < len(allrows):
    out += ['', 'Not evaluated (the evaluator runs on every '
            f"{(section.get('options') or {}).get('every', 1)}-th rung, the "
            'teacher and the last rung): ' +
            ', '.join(r['name'] for r in allrows if r['eval'] is None) + '.']
  for r in shown:
    if r['eval'].get('exports'):
      out += ['', '### TFLite exports', '',
              '| file set | MB | LiteRT ms / img | toy-GenEval [95% CI] | '
              'toy-FID | PSNR (dB) |', '|---|---:|---:|---:|---:|---:|']
      for q, x in r['eval']['exports'].items():
        out.append(f"| [{q}]({x['dir']}) | {x['mb']:.2f} | "
                   f"{x['litert_ms']:.1f} | {_gen(x)} | "
                   f"{x['fid']:.3g} | {cell(x['psnr'], '.2f')} |")
  # 1 and 2 objects (the classic world), 3 where a world has them.
  keys = ['1_object', '2_objects'] + (['3_objects'] if any(
      '3_objects' in (r['eval'].get('geneval_by_objects') or {})
      for r in shown) else [])
  out += ['', '### toy-GenEval by number of prompted objects', '',
          '| rung | ' + ' | '.join(
              k.replace('_', ' ') for k in keys) + ' |',
          '|---|' + '---:|' * len(keys)]
  for r in shown:
    by = r['eval'].get('geneval_by_objects') or {}
    score = lambda k: '-' if k not in by else (
        f"{by[k]['score']:.3f} [{by[k]['ci'][0]:.3f}, {by[k]['ci'][1]:.3f}]"
        f" (n={by[k]['n']})")
    out.append(f"| {r['name']} | " + ' | '.join(score(k) for k in keys) +
               ' |')
  pairs = ablation_pairs(allrows)
  out += ['', *_ablations(pairs), '', *_targets(allrows, pairs, targets), '',
          '## Grids', '']
  out += [f"**{r['name']}**\n\n![{r['name']}]({r['eval']['grid']})\n"
          for r in shown]
  return '\n'.join(out) + '\n'


# ---------------------------------------------------------------------------
# Ablations: each compared with a rung found from roles, flags and sizes.
# ---------------------------------------------------------------------------
def _start(allrows: list[dict], i: int) -> dict:
  """The row whose student rung i started from: the last main row before
  it (the teacher when none)."""
  return [r for r in allrows[:i] if not r.get('ablation')][-1]


def counterpart(allrows: list[dict], i: int) -> tuple[dict | None, str]:
  """(the row ablation row i is compared with, how it was found).

  A control (a denoiser ablation whose DiT has the size and FLOPs of the
  student it started from: it only trained longer) is compared with the
  rung right after it: what that rung's compression did. Any other
  ablation stands in for a rung of its kind: the next main one after it,
  else the last main one before it, else the last one before it.
  """
  r = allrows[i]
  start = _start(allrows, i)
  if (r.get('role') == 'denoiser' and r['params'] == start['params'] and
      r['gflops'] == start['gflops']):
    return (allrows[i + 1] if i + 1 < len(allrows) else None), 'control'
  same = lambda m: m.get('kind') == r.get('kind')
  after = [m for m in allrows[i + 1:] if same(m) and not m.get('ablation')]
  before = [m for m in allrows[1:i] if same(m)]
  main_before = [m for m in before if not m.get('ablation')]
  found = after[:1] or main_before[-1:] or before[-1:]
  return (found[0] if found else None), 'same kind'


def ablation_pairs(allrows: list[dict]) -> list[tuple[dict, dict, str]]:
  """(ablation, counterpart, 'control' | 'same kind') for every evaluated
  ablation whose counterpart was evaluated too."""
  out = []
  for i, r in enumerate(allrows):
    if not r.get('ablation') or r['eval'] is None:
      continue
    m, how = counterpart(allrows, i)
    if m is not None and m['eval'] is not None:
      out.append((r, m, how))
  return out


def _diff(r: dict, m: dict) -> str:
  """The rung settings in which r differs from m ('' when none known)."""
  a = (r.get('settings') or {}).get('non_default') or {}
  b = (m.get('settings') or {}).get('non_default') or {}
  keys = sorted(k for k in set(a) | set(b) if k != 'ablation' and
                a.get(k) != b.get(k))
  return '; '.join(f'{k} {a.get(k, "default")} vs {b.get(k, "default")}'
                   for k in keys)


def _ablations(pairs) -> list[str]:
  """The ablation section: (a) controls, (b) text-encoder ablations, (c)
  other ablations of a rung's distillation, each with what it was compared
  with."""
  out = ['## Ablations', '']
  gen = lambda r: r['eval']['geneval']
  dms = lambda r: r['eval']['denoise_ms']
  loss_rows = []
  for r, m, how in pairs:
    if how == 'control':
      if not (dms(r) and dms(m)):
        continue
      out.append(
          f"- (a) Without {m['name']}'s compression ({m.get('kind')}): "
          f"{r['name']}, the student before it, distilled as many steps "
          f"(compared with {m['name']}): {dms(r):.1f} vs {dms(m):.1f} JAX "
          f"denoise ms per image ({100 * (dms(r) / dms(m) - 1):+.0f}% "
          f"latency); toy-GenEval {_gen(r['eval'])} vs {_gen(m['eval'])} "
          f"with it ({gen(r) - gen(m):+.3f}); DiT params {r['params']:,} vs "
          f"{m['params']:,}." + (
              f" {m['name']} is an ablation too: the ladder goes on without "
              'it.' if m.get('ablation') else ''))
    elif r.get('role') == 'text_encoder':
      diff = _diff(r, m)
      out.append(
          f"- (b) Text-encoder ablation {r['name']} (compared with "
          f"{m['name']}{'; ' + diff if diff else ''}): toy-GenEval "
          f"{_gen(r['eval'])} vs {_gen(m['eval'])} "
          f"({gen(r) - gen(m):+.3f}).")
    elif r.get('role') == 'denoiser':
      loss_rows += [(m, m), (r, m)]
  if loss_rows:
    out += ['', '(c) Ablations of a rung\'s distillation: each against the '
            'main rung of its kind it stands in for (main), the same '
            'compression and steps, other loss terms.', '',
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
                 f"{_gen(r['eval'])} | {cell(r['eval']['psnr'], '.2f')} |")
  if len(out) == 2:
    out.append('- (none in this ladder)')
  return out


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------
def _flop_targets(teacher: dict, main: list[dict], targets: dict
                  ) -> list[str]:
  """Per main rung timed in JAX: denoise speed-up >= fraction x FLOP ratio."""
  frac = targets.get('min_speedup_of_flop_ratio', MIN_SPEEDUP_OF_FLOP_RATIO)
  out = []
  for r in main:
    s, f = speedup(teacher, r), flop_ratio(teacher, r)
    if s is None or f is None:
      continue
    out.append(_target(s >= frac * f, (
        f"{r['name']}: denoising {s:.2f}x faster for {f:.2f}x fewer FLOPs, "
        f'{s / f:.2f} of the FLOP ratio (target >= {frac:g})')))
  return out


def _final_targets(teacher: dict, final: dict, exports: list[dict],
                   t: dict) -> list[str]:
  """The final student against the teacher, and the exports against it."""
  gen = lambda r: r['eval']['geneval']
  out = []
  if 'min_param_ratio' in t:
    v = teacher['params'] / final['params']
    out.append(_target(v >= t['min_param_ratio'],
                       f'DiT params {v:.2f}x fewer (target >= '
                       f"{t['min_param_ratio']:g}x)"))
  for key, what, part in (('min_denoise_speedup', 'denoising', 'denoise'),
                          ('min_total_speedup', 'end to end', 'jax')):
    if key in t:
      v, after = speedup(teacher, final, part), final['eval'][f'{part}_ms']
      out.append(_target(v >= t[key],
                         f'{what} {v:.2f}x faster in JAX, {v * after:.1f} -> '
                         f'{after:.1f} ms per image (target >= '
                         f'{t[key]:g}x)'))
  if 'min_geneval_retention' in t:
    v = gen(final) / gen(teacher) if gen(teacher) else 0.0
    out.append(_target(
        v >= t['min_geneval_retention'],
        f"toy-GenEval {_gen(final['eval'])} vs the teacher's "
        f"{_gen(teacher['eval'])}: {100 * v:.1f}% kept (target >= "
        f"{100 * t['min_geneval_retention']:g}%)"))
  if 'max_export_gap' in t:
    for r in exports:
      for q, x in r['eval']['exports'].items():
        gap = abs(x['geneval'] - gen(final))
        out.append(_target(
            gap <= t['max_export_gap'],
            f"{q} .tflite toy-GenEval {_gen(x)} vs the JAX student's "
            f"{gen(final):.3f}: gap {gap:.3f} (target <= "
            f"{t['max_export_gap']:g})"))
  return out


def _ablation_targets(teacher: dict, pairs, t: dict) -> list[str]:
  """The controls' latency and quality; the ablations of the roles named
  by 'ablations_lower_by_ci'."""
  out = []
  controls = [(r, m) for r, m, how in pairs if how == 'control' and
              r['eval'].get('denoise_ms') and m['eval'].get('denoise_ms')]
  for key in ('min_control_slowdown', 'max_control_gain'):
    if key not in t:
      continue
    if not controls:
      out.append(_target(None, f'{key}: no control ablation evaluated'))
    for r, m in controls:
      if key == 'min_control_slowdown':
        # Each over the teacher timed with it: load cancels out.
        v = speedup(teacher, m) / speedup(teacher, r) - 1
        out.append(_target(v >= t[key], (
            f"(a) without {m['name']} ({r['name']}) denoising is "
            f"{100 * v:+.0f}% slower (target >= +{100 * t[key]:g}%)")))
      else:
        v = r['eval']['geneval'] - m['eval']['geneval']
        out.append(_target(v <= t[key], (
            f"(a) without {m['name']} ({r['name']}) toy-GenEval is {v:+.3f} "
            f'(target: not better by more than {t[key]:g})')))
  roles = tuple(t.get('ablations_lower_by_ci') or ())
  for r, m, how in pairs:
    if how == 'control' or r.get('role') not in roles:
      continue
    change = r['eval']['geneval'] - m['eval']['geneval']
    width = m['eval']['geneval'] - (m['eval'].get('geneval_ci') or [
        m['eval']['geneval']])[0]
    out.append(_target(
        change < 0 and -change > width,
        f"{r['name']} changes toy-GenEval by {change:+.3f} against "
        f"{m['name']} (target: lower by more than the 95% interval, "
        f"{width:.3f} below {m['name']})"))
  return out


def _targets(allrows: list[dict], pairs, t: dict) -> list[str]:
  teacher = allrows[0]
  main = [r for r in allrows[1:] if not r.get('ablation')]
  final = ([r for r in main if r.get('role') != 'export'] or [teacher])[-1]
  out = ['## Targets', '',
         f"Final student: {final['name']}, against the teacher.", '']
  if final['eval'] is None:
    out.append(_target(None, f"{final['name']} was not evaluated; the final "
                       'student targets need it'))
  else:
    exports = [r for r in main if r.get('role') == 'export' and
               r['eval'] is not None and r['eval'].get('exports')]
    out += _final_targets(teacher, final, exports, t)
  gen = lambda r: r['eval']['geneval']
  if 'min_teacher_geneval' in t:
    out.append(_target(gen(teacher) >= t['min_teacher_geneval'],
                       f"teacher toy-GenEval {_gen(teacher['eval'])} "
                       f"(target >= {t['min_teacher_geneval']:g})"))
  timed = [r for r in main if r['eval'] is not None]
  out += _flop_targets(teacher, timed, t)
  if 'max_rung_drop' in t:
    prev = teacher
    for r in timed:
      if r.get('role') == 'export':
        continue
      drop = gen(prev) - gen(r)
      out.append(_target(drop <= t['max_rung_drop'],
                         f"{r['name']} costs {drop:+.3f} toy-GenEval (target"
                         f" <= {t['max_rung_drop']:g})"))
      prev = r
  return out + _ablation_targets(teacher, pairs, t)
