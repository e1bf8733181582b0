"""The ladder's report files: report.json and report.md (written
atomically, by process 0)."""
from __future__ import annotations

import json
import os

import jax

from nanoflux_jax import atomic
from nanoflux_jax.evaluate.tables import cell
from nanoflux_jax.ladder import evaluators
from nanoflux_jax.ladder import provenance


def write_atomic(path: str, text: str) -> None:
  if jax.process_index() == 0:
    atomic.write_file(path, lambda f: f.write(text))


def read_json(path: str):
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)


def report_markdown(report: dict) -> str:
  """The markdown table: the teacher row, then one row per finished rung."""
  c = report['setup']
  lines = [
      '# NanoFLUX compression ladder', '',
      f"Forward: batch 1, {c['img_len']} image + {c['txt_len']} text tokens "
      f"on {c['device']}; ms = median of {c['repeats']} jitted calls. Sample "
      'MSE: final latents vs the teacher\'s (same prompts and noise); '
      'sample PSNR: their images against the teacher\'s, right after the '
      'compression (step 0) and after the distillation. Trained on: the '
      'device that distilled the rung (and timed its ms / fwd).', '']
  if report.get('rendered'):
    lines += [f"Re-rendered from report.json ({report['rendered']}): the "
              'text and checks are the current code\'s, every figure is the '
              'run\'s own.', '']
  if c.get('start'):
    lines += [f"The first rung starts from the finished student "
              f"{os.path.relpath(c['start'])} (config.student), not from "
              'the teacher; every rung still distils from the teacher.', '']
  lines += [
      '| rung | kind | params | GFLOPs | ms / fwd | trained on | steps | '
      'loss | output_kd | sample MSE | sample PSNR step 0 -> end (dB) | '
      'samples |',
      '|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|']
  for r in [report['teacher']] + report['rungs']:
    loss = r.get('losses') or {}
    name = r['name'] + (' (ablation)' if r.get('ablation') else '')
    lines.append(
        f"| {name} | {r.get('kind', '-')} | {r['params']:,} | "
        f"{r['gflops']:.4g} | {r['ms']:.2f} | {r.get('device', '-')} | "
        f"{r.get('steps', '-')} | "
        f"{cell(loss.get('loss'), '.4g')} | "
        f"{cell(loss.get('output_kd'), '.4g')} | {r['sample_mse']:.4g} | "
        f"{cell(r.get('sample_psnr_init'), '.2f')} -> "
        f"{cell(r.get('sample_psnr'), '.2f')} | [png]({r['samples']}) |")
  if any(r.get('settings') for r in report['rungs']):
    lines += ['', provenance.markdown(report['rungs'])]
  if report.get('evaluation'):
    lines += ['', evaluators.markdown(report)]
  return '\n'.join(lines) + '\n'


def write_report(workdir: str, report: dict) -> None:
  write_atomic(os.path.join(workdir, 'report.json'),
                json.dumps(report, indent=2, sort_keys=True))
  write_atomic(os.path.join(workdir, 'report.md'), report_markdown(report))
