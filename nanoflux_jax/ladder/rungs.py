"""The rung protocol of the compression ladder (`runner.run_ladder` walks it).

A rung kind is registered with `register_rung` and declares what it is:
  check(config, opts, where)        raises on bad options, before any work;
  compress(ctx, stage, student, opts) -> (student, stage): the compressed
                                    DiT (cfg, params) and the stage that
                                    describes it (see stage.py);
  run(ctx, stage, student, opts)    -> RungResult: what the rung trained or
                                    wrote and the stage it ends with;
  role                              'denoiser' (trains the DiT: the memory
                                    plan, resume from the trainer's
                                    checkpoint and the step-0 PSNR apply),
                                    'text_encoder' or 'export';
  shapes(stage, student, opts)      optional: -> (student, stage), the
                                    compression on abstract params (run
                                    under jax.eval_shape), for the memory
                                    plan;
  distill_base(config)              optional: the config the rung's
                                    `distill` overrides apply to (default:
                                    config.distill for denoiser rungs,
                                    none for the others).
The default `run`, `distill_denoiser`, distils the compressed DiT from the
original teacher (trainer.train in ctx.rung_dir); a rung kind with its own
loss passes it on (`distill_denoiser(..., loss=...)`). The built-in kinds
live in compress_rungs.py, text_encoder_rung.py and export_rung.py; kinds.py
imports them. Any rung may be an `ablation`: it runs on the current stage
and is reported, but the rungs after it continue from the stage before it.
`Context` is what every rung reads and never writes: the config, the mesh,
the original teacher (and its pipeline, when there is one), the prompt
embedder and the rung's folder.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from nanoflux_jax import checkpoint
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import teacher as teacher_lib
from nanoflux_jax.distill import trainer
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import sharding
from nanoflux_jax.pipeline import FluxPipeline
from nanoflux_jax.shapes import teacher as shapes_teacher
from nanoflux_jax.shapes import world as shapes


Student = tuple[FluxConfig, Any]  # (config, unboxed params)


@dataclasses.dataclass(frozen=True)
class RungResult:
  """What a rung's `run` returns.

  finished: False when training stopped early (distill.stop_after); rerun
    the ladder to resume.
  fields: report-row fields (losses, steps, start_step, exports, ...).
  stage: the stage the rung ends with; None: the one it was given. A rung
    that changes the DiT's values saves them (nanoflux_jax.checkpoint) and
    names that folder as the stage's `dit`.
  student: the DiT the rung ends with, in memory (saves reloading it from
    stage.dit); None: load it from there when needed.
  """
  finished: bool
  fields: dict
  stage: Stage | None = None
  student: Student | None = None


# ---------------------------------------------------------------------------
# Rung registry.
# ---------------------------------------------------------------------------
ROLES = ('denoiser', 'text_encoder', 'export')


@dataclasses.dataclass(frozen=True)
class RungKind:
  """defaults: every option the kind takes besides 'kind', 'distill' and
  'ablation'. compress / run / check / role / shapes: see the module
  docstring."""
  name: str
  compress: Callable[..., tuple[Student, Stage]]
  defaults: Mapping[str, Any]
  run: Callable[..., RungResult]
  check: Callable[..., None] | None = None
  role: str = 'denoiser'
  shapes: Callable[..., tuple[Student, Stage]] | None = None
  distill_base: Callable[..., ml_collections.ConfigDict] | None = None

  @property
  def trains_denoiser(self) -> bool:
    """True for kinds whose run trains the compressed DiT (trainer.train in
    the rung's folder, resumable from its checkpoints)."""
    return self.role == 'denoiser'

  def base_distill(self, config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict | None:
    """A fresh copy of what the rung's `distill` overrides apply to; None
    for kinds that train nothing."""
    if self.distill_base is not None:
      return self.distill_base(config)
    if self.trains_denoiser:
      return ml_collections.ConfigDict(config.distill.to_dict())
    return None


RUNG_KINDS: dict[str, RungKind] = {}


def register_rung(name: str, defaults: Mapping[str, Any], *, check=None,
                  run=None, role: str = 'denoiser', shapes=None,
                  distill_base=None):
  """Decorator adding compress fn(ctx, stage, student, opts) to
  RUNG_KINDS[name], with `run` (default `distill_denoiser`), `check`,
  `role`, `shapes` and `distill_base` (see the module docstring)."""
  if role not in ROLES:
    raise ValueError(f'register_rung({name!r}): role={role!r}; expected one '
                     f'of {ROLES}')
  if name in RUNG_KINDS:
    raise ValueError(f'register_rung: {name!r} is already registered')

  def deco(fn):
    RUNG_KINDS[name] = RungKind(name, fn, dict(defaults),
                                run or distill_denoiser, check, role, shapes,
                                distill_base)
    return fn
  return deco


def unchanged(ctx, stage: Stage, student: Student, opts
              ) -> tuple[Student, Stage]:
  """The compress of kinds that keep the denoiser as it is."""
  del ctx, opts
  return student, stage


@dataclasses.dataclass(frozen=True)
class Context:
  """What rungs read: config, mesh, the original teacher, the embedder.

  Frozen: a rung gets `ctx.at(rung_dir)`, a copy that shares the loaded
  teacher (and its pipeline) with every other rung's.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  grid: tuple[int, int]
  workdir: str
  rung_dir: str = ''               # the folder of the rung being run.
  # The teacher, its pipeline and stage, loaded on first use; shared by
  # every copy `at` makes.
  _loaded: dict = dataclasses.field(default_factory=dict, repr=False,
                                    compare=False)

  def at(self, rung_dir: str) -> 'Context':
    """This context for the rung in rung_dir."""
    return dataclasses.replace(self, rung_dir=rung_dir)

  def _once(self, key: str, make: Callable[[], Any]):
    if key not in self._loaded:
      self._loaded[key] = make()
    return self._loaded[key]

  @property
  def pipeline(self):
    """The teacher's FluxPipeline: the shapes-world teacher (trained once,
    cached in workdir/teacher) or config.teacher.pipeline; None for a bare
    DiT teacher (then prompts get random stand-in embeddings)."""
    return self._once('pipeline', self._load_pipeline)

  def _load_pipeline(self):
    t = self.config.teacher
    if t.get('shapes'):
      return shapes_teacher.load_or_train(
          t.shapes, os.path.join(self.workdir, 'teacher'), mesh=self.mesh)
    if t.get('pipeline'):
      # The DiT and T5 stream tensor by tensor onto the mesh: no host holds
      # a whole 12B teacher (every host of a pod runs this).
      return FluxPipeline.from_pretrained(t.pipeline, mesh=self.mesh)
    return None

  def pipeline_for(self, student: Student, text_encoder: str | None = None):
    """The teacher pipeline with `student` as its DiT (host copies) and,
    if given, a distilled student T5 (a text_encoder rung's folder)."""
    p = self.pipeline
    pipe = FluxPipeline((student[0], jax.device_get(student[1])),
                        (p.clip_cfg, p.clip_params), (p.t5_cfg, p.t5_params),
                        (p.vae_cfg, p.vae_params), p.tokenizer, p.tokenizer_2)
    return pipe.with_text_encoder(text_encoder) if text_encoder else pipe

  @property
  def teacher_stage(self) -> Stage:
    """The ladder's first stage: the teacher, as config.distill samples it."""
    return Stage(self.teacher[0], self.config.distill.num_sampling_steps,
                 self.grid)

  @property
  def teacher(self) -> Student:
    """Loaded on first use: a resumed ladder may not need it at all."""
    return self._once('teacher', lambda: teacher_lib.load_teacher(
        self.config.teacher, self.mesh, self.pipeline))

  def embed(self, prompts, chunk: int = 64) -> dict:
    """{'txt', 'y'} of prompts: the pipeline's encoders, or else the random
    stand-in that trainer.train uses."""
    d = self.config.distill
    if self.pipeline is None:
      return data_lib.random_embedder(self.teacher[0], d.data.txt_len,
                                      d.seed)(prompts)
    parts = [self.pipeline.encode_prompt(prompts[i:i + chunk], d.data.txt_len)
             for i in range(0, len(prompts), chunk)]
    return {'txt': np.concatenate([np.asarray(p[0]) for p in parts]),
            'y': np.concatenate([np.asarray(p[1]) for p in parts])}

  def real_latents(self, prompts) -> np.ndarray:
    """Real latents [N, L, C] of the training prompts, for the
    rectified-flow term: the renderings of the shapes scenes whose captions
    config.distill.data.prompts ('shapes:N[:seed]') lists, encoded by the
    teacher pipeline's autoencoder."""
    source = self.config.distill.data.prompts
    parsed = shapes.parse_source(source)
    if self.pipeline is None or not parsed:
      raise ValueError(f'distill.loss.weights.rf > 0 needs real images: a '
                       f"teacher pipeline and data.prompts 'shapes:N[:seed]',"
                       f' got {source!r}')
    world = shapes.ShapesWorld(parsed[2], self.resolution, parsed[0])
    scenes = [world.scene(i) for i in range(len(prompts))]
    if [sc.caption for sc in scenes] != list(prompts):
      raise ValueError(f'real_latents: the prompts are not the captions of '
                       f'{source!r}')
    chunk = 256
    return np.concatenate([
        shapes_teacher.encode_images(self.pipeline, np.stack(
            [shapes.render(sc, self.resolution)
             for sc in scenes[i:i + chunk]]))
        for i in range(0, len(scenes), chunk)])

  @property
  def resolution(self) -> int:
    """Image side in pixels (pipelines only; square grids)."""
    return self.grid[0] * self.pipeline.latent_factor


def img_grid(cfg: FluxConfig, grid):
  return tuple(grid) if cfg.downsample_start is not None else None


def origin_pairs(stage: Stage, cfg: FluxConfig
                 ) -> tuple[tuple[int, int], ...]:
  """Feature-KD pairs (student block, the teacher block it descends from).

  Blocks on a down-sampler's coarse grid are left out: their tokens do not
  line up with the teacher's.
  """
  origin = stage.teacher_blocks or tuple(range(cfg.num_blocks))
  coarse = (range(cfg.downsample_start, cfg.downsample_end + 1)
            if cfg.downsample_start is not None else ())
  return tuple((i, t) for i, t in enumerate(origin) if i not in coarse)


def trained(rung_dir: str, state, history, num_steps: int
             ) -> tuple[bool, dict]:
  """(reached num_steps, report fields): the last logged losses (from
  rung_dir/metrics.jsonl, so a re-entered finished run has them too), the
  step this call started at (> 0: resumed) and num_steps."""
  step = int(jax.device_get(state.step))
  logged = loop.read_metrics(rung_dir)
  losses = {k: v for k, v in (logged[-1] if logged else {}).items()
            if k not in loop.RATE_KEYS}
  start = int(history[0]['step']) - 1 if history else step
  return step >= num_steps, dict(losses=losses, start_step=start,
                                 steps=num_steps)


def distill_config(ctx: Context, stage: Stage, opts
                   ) -> ml_collections.ConfigDict:
  """config.distill with the rung's overrides, a workdir-relative teacher
  cache, 'origin' feature pairs resolved and the stage's sampling steps."""
  tc = ml_collections.ConfigDict(ctx.config.distill.to_dict())
  override(tc, opts['distill'], 'distill')
  tc.num_sampling_steps = stage.num_steps
  if tc.data.get('cache_dir'):  # Relative: one cache inside the workdir.
    tc.data.cache_dir = os.path.join(ctx.workdir, tc.data.cache_dir)
  if tc.loss.feature_pairs == 'origin':
    with tc.ignore_type():
      tc.loss.feature_pairs = origin_pairs(stage, stage.dit_config)
  return tc


def distill_denoiser(ctx: Context, stage: Stage, student: Student, opts, *,
                     loss=None, teacher_steps: int | None = None
                     ) -> RungResult:
  """The default run: trainer.train of the compressed student from the
  original teacher in ctx.rung_dir (resuming its own checkpoints); the
  distilled student is saved to rung_dir/student and becomes the stage's DiT.

  `student` may carry params=None when its trainer checkpoint exists (the
  trainer restores the values; see runner.py). loss: trainer.train's `loss`
  (default its distillation loss); teacher_steps: the teacher's sampling
  steps when they differ from the stage's (e.g. step distillation).
  """
  tc = distill_config(ctx, stage, opts)
  if teacher_steps is not None:
    tc.teacher_num_sampling_steps = teacher_steps
  elif loss is None and stage.num_steps != ctx.teacher_stage.num_steps:
    raise ValueError(
        f'{ctx.rung_dir}: this student samples in {stage.num_steps} steps, '
        f'the teacher in {ctx.teacher_stage.num_steps}; the default '
        'distillation matches them step for step. Put the step-distillation '
        'rung after the last rung that distils the denoiser.')
  real = tc.loss.weights.get('rf', 0.0) > 0
  state, history = trainer.train(
      tc, ctx.rung_dir, teacher=ctx.teacher, student=student, mesh=ctx.mesh,
      embed_fn=None if ctx.pipeline is None else ctx.embed,
      latents_fn=ctx.real_latents if real else None, loss=loss)
  done, fields = trained(ctx.rung_dir, state, history, tc.num_steps)
  weights = {k: v for k, v in tc.loss.weights.items() if v}
  pairs = trainer.feature_pairs(tc.loss.feature_pairs, student[0],
                                ctx.teacher[0]) if weights.get(
                                    'feature_kd') else ()
  fields.update(loss_weights=weights, feature_pairs=[list(p) for p in pairs])
  if not done:
    return RungResult(False, fields)
  out_dir = os.path.join(ctx.rung_dir, 'student')
  out = checkpoint.load(out_dir, shardings=sharding.loading_shardings(ctx.mesh))
  return RungResult(True, fields, dataclasses.replace(stage, dit=out_dir),
                    student=out)


def override(base: ml_collections.ConfigDict, over: Mapping[str, Any],
             where: str) -> None:
  """base[k] = over[k] recursively; unknown keys raise."""
  for k, v in dict(over).items():
    if k not in base:
      raise ValueError(f'{where}: unknown distill option {k!r}; known: '
                       f'{sorted(base.keys())}')
    if isinstance(v, Mapping) and isinstance(base.get(k),
                                             ml_collections.ConfigDict):
      override(base[k], v, f'{where}.{k}')
    else:
      base[k] = v
