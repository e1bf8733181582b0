"""The export rung kind: the current stage as a FluxPipeline folder and as
.tflite files (fp32, int8, ...), with the stage's sampling steps."""
from __future__ import annotations

import os

from nanoflux_jax.compress import layout
from nanoflux_jax.export import bundle
from nanoflux_jax.export import tflite
from nanoflux_jax.ladder.rungs import Context, register_rung, RungResult
from nanoflux_jax.ladder.rungs import Student, unchanged
from nanoflux_jax.ladder.stage import Stage


_QUANT_NAMES = {'none': 'fp32'}


def _check_export(c, opts, where):
  if not (c.teacher.get('shapes') or c.teacher.get('pipeline')):
    raise ValueError(f'{where}: export needs a teacher pipeline '
                     '(teacher.shapes or teacher.pipeline) for the text '
                     'encoders and the VAE')
  if not opts['quantize']:
    raise ValueError(f'{where}: export needs at least one quantize option')
  for q in opts['quantize']:
    try:
      tflite.check_quantize(q)
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from e


def _export(ctx: Context, stage: Stage, student: Student, opts
            ) -> RungResult:
  """The current pipeline (student DiT + student T5) as a FluxPipeline
  folder, workdir/pipeline, and as .tflite files in
  workdir/tflite/{fp32,int8,...}, one folder per quantization."""
  # The folder carries the settings the student was distilled for
  # (call_defaults.json): pipe(prompts) then needs no more arguments.
  # The exporters address blocks one by one: a scanned student is unrolled.
  pipe = ctx.pipeline_for(layout.unrolled(student, ctx.mesh),
                          stage.text_encoder).with_call_defaults(
      height=ctx.resolution, width=ctx.resolution,
      num_steps=stage.num_steps,
      max_sequence_length=ctx.config.distill.data.txt_len)
  pipe.save(os.path.join(ctx.workdir, 'pipeline'))
  out = {}
  for q in opts['quantize']:
    path = os.path.join(ctx.workdir, 'tflite', _QUANT_NAMES.get(q, q))
    m = bundle.export_pipeline(
        pipe, path, ctx.resolution, ctx.resolution,
        num_steps=stage.num_steps,
        max_sequence_length=ctx.config.distill.data.txt_len, quantize=q)
    out[_QUANT_NAMES.get(q, q)] = dict(
        dir=os.path.relpath(path, ctx.workdir),
        mb=m['sizes']['total_bytes'] / 1e6, export_s=m['export']['seconds'])
  return RungResult(True, dict(exports=out, pipeline='pipeline'))


register_rung('export', dict(quantize=('none', 'int8')), check=_check_export,
              run=_export, role='export')(unchanged)


