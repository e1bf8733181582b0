"""The text_encoder rung kind: a small T5 distilled from the teacher's
(NanoFLUX's text-encoder distillation; distill/t5_distill.py trains it)."""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from nanoflux_jax.convert.text_encoders import load_t5_encoder
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import t5_distill
from nanoflux_jax.ladder.rungs import Context, override, register_rung
from nanoflux_jax.ladder.rungs import RungResult, Student, trained, unchanged
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import sharding


def text_encoder_config(rung, where) -> ml_collections.ConfigDict:
  """t5_distill.default_config() with the rung's distill overrides."""
  tc = t5_distill.default_config()
  override(tc, rung['distill'], f'{where}.distill')
  return tc


def _check_text_encoder(c, opts, where):
  del c
  text_encoder_config(opts, where)
  if opts['teacher_t5'] and not os.path.exists(opts['teacher_t5']):
    raise FileNotFoundError(f"{where}: teacher_t5={opts['teacher_t5']!r} does "
                            'not exist')
  if opts['denoiser'] not in ('student', 'teacher'):
    raise ValueError(f"{where}: denoiser={opts['denoiser']!r}; expected "
                     "'student' or 'teacher'")


def _distill_text_encoder(ctx: Context, stage: Stage, student: Student, opts
                          ) -> RungResult:
  """A small T5 learns the teacher T5 through the frozen denoiser.

  teacher_t5: an HF T5EncoderModel folder; '' takes the ladder's teacher
  pipeline (its T5, tokenizer and pooled CLIP vectors), else
  distill.pipeline or a random preset. The student T5 is written to
  rung_dir/student_text_encoder and, unless the rung is an `ablation`,
  becomes the pipeline's T5 for the rungs after it; the denoiser passes on
  unchanged.
  """
  tc = text_encoder_config(opts, 'text_encoder')
  # The frozen denoiser samples on its own schedule.
  tc.num_sampling_steps = (stage.num_steps if opts['denoiser'] == 'student'
                           else ctx.teacher_stage.num_steps)
  t5 = tokens = None
  if opts['teacher_t5']:
    t5 = load_t5_encoder(opts['teacher_t5'],
                         shardings=sharding.t5_loading_shardings(ctx.mesh))
  elif ctx.pipeline is not None:
    t5 = (ctx.pipeline.t5_cfg, ctx.pipeline.t5_params)
    tokens = data_lib.pipeline_tokens(
        ctx.pipeline, data_lib.load_prompts(tc.data.prompts), tc.data.txt_len)
  state, history = t5_distill.train_text_encoder(
      tc, ctx.rung_dir, teacher_t5=t5, tokens=tokens, mesh=ctx.mesh,
      denoiser=student if opts['denoiser'] == 'student' else ctx.teacher)
  done, fields = trained(ctx.rung_dir, state, history, tc.num_steps)
  return RungResult(done, fields, dataclasses.replace(
      stage, text_encoder=os.path.join(ctx.rung_dir, t5_distill.STUDENT_DIR)))


register_rung('text_encoder', dict(teacher_t5='', denoiser='student'),
              check=_check_text_encoder, run=_distill_text_encoder,
              role='text_encoder',
              distill_base=lambda config: t5_distill.default_config()
              )(unchanged)


