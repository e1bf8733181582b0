"""Scoring a text-to-image pipeline on the shapes world.

The same held-out prompts and the same packed noise go through every model
being compared (teacher, each compressed student, the exported TFLite
files), so differences come from the models alone:

  s = toy.eval_set(world_seed=1000, num=64, resolution=64, latent_shape=...)
  images = toy.generate(pipe, s, num_steps=8, txt_len=24)
  toy.scores(clf, images, s, teacher_images)   # geneval, fid, psnr
  toy.jax_ms_interleaved({'a': (pipe, 8)}, s, 24)   # {'a': {'total', ...}}
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
import numpy as np

from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.shapes import classifier as clf_lib
from nanoflux_jax.evaluate import metrics


@dataclasses.dataclass
class EvalSet:
  """Held-out prompts with their scenes, fixed noise, real renderings.

  noise: packed [N, L, C] float32, one per prompt.
  reference: uint8 [M, R, R, 3] real renderings (toy-FID's reference set).
  """
  prompts: list[str]
  scenes: list[shapes.Scene]
  noise: np.ndarray
  reference: np.ndarray
  resolution: int


def eval_set(world_seed: int, num: int, resolution: int,
             latent_shape: tuple[int, int], noise_seed: int = 0,
             num_reference: int = 512, world: str = 'shapes') -> EvalSet:
  """`num` scenes of world `world_seed` (disjoint from training worlds) with
  noise of packed shape latent_shape = (L, C); the FID reference comes from
  another world (world_seed + 1) so it shares no scene with the prompts.
  `world` names the geometry (data.shapes.WORLDS)."""
  _, prompts, scenes = shapes.ShapesWorld(world_seed, resolution,
                                          world).batch(0, num)
  noise = np.random.default_rng(noise_seed).standard_normal(
      (num,) + tuple(latent_shape)).astype(np.float32)
  reference = shapes.ShapesWorld(world_seed + 1, resolution, world).batch(
      0, num_reference)[0]
  return EvalSet(prompts, scenes, noise, reference, resolution)


def generate(pipe, s: EvalSet, num_steps: int, txt_len: int,
             batch: int = 16) -> np.ndarray:
  """uint8 [N, R, R, 3] from a FluxPipeline, `batch` prompts per call."""
  r = s.resolution
  return np.concatenate([
      pipe(s.prompts[i:i + batch], height=r, width=r, num_steps=num_steps,
           latents=s.noise[i:i + batch], max_sequence_length=txt_len)
      for i in range(0, len(s.prompts), batch)])


def generate_litert(tfl_pipe, s: EvalSet) -> np.ndarray:
  """uint8 [N, R, R, 3] from a TFLitePipeline (one prompt per call)."""
  return tfl_pipe(s.prompts, latents=s.noise)


def _median_ms(call, repeats: int) -> float:
  call()  # Warm-up (and compile).
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    call()
    times.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(times)


def jax_ms_interleaved(pipes: dict, s: EvalSet, txt_len: int,
                       repeats: int = 5, batch: int = 1
                       ) -> dict[str, dict[str, float]]:
  """Median ms per image of several pipelines, timed call by call in turn.

  Each call runs `batch` prompts at once and its time is divided by
  `batch` (a batch amortises the Python and tokenizer time that would
  otherwise hide the models' own cost on tiny models). A ratio of two
  pipelines' times is only as good as the load both saw: timed minutes
  apart on a shared machine, a busy minute lands on one of them.
  Interleaved, each round runs every pipeline once, so load hits them
  alike.

  Args:
    pipes: name -> (FluxPipeline, its Euler steps).
  Returns:
    name -> {'total': encode + denoise + decode, 'denoise': the Euler loop
    alone (the pipeline's own `last_timings`)}, median ms per image.
  """
  r = s.resolution
  calls = {k: functools.partial(
      p, s.prompts[:batch], height=r, width=r, num_steps=n,
      latents=s.noise[:batch], max_sequence_length=txt_len)
           for k, (p, n) in pipes.items()}
  for call in calls.values():
    call()  # Warm-up (and compile).
  times = {k: {'total': [], 'denoise': []} for k in pipes}
  for _ in range(max(1, repeats)):
    for k, call in calls.items():
      t0 = time.perf_counter()
      call()
      times[k]['total'].append(1e3 * (time.perf_counter() - t0))
      times[k]['denoise'].append(1e3 * pipes[k][0].last_timings['denoise'])
  return {k: {part: statistics.median(v) / batch for part, v in t.items()}
          for k, t in times.items()}


def litert_ms_per_image(tfl_pipe, s: EvalSet, repeats: int = 5) -> float:
  """Median ms of one image through the exported .tflite files."""
  return _median_ms(lambda: tfl_pipe(s.prompts[:1], latents=s.noise[:1]),
                    repeats)


def scores(clf: clf_lib.Classifier, images: np.ndarray, s: EvalSet,
           teacher_images: np.ndarray | None) -> dict:
  """{'geneval', 'geneval_ci', 'geneval_by_objects', 'fid', 'psnr'}.

  clf: a trained `Classifier` or any judge with its interface
  (`geometry.GeometryJudge`). geneval_ci is the 95% Wilson interval;
  geneval_by_objects splits the score by prompted object count
  ({'1_object' | '2_objects' | '3_objects': {'score', 'ci', 'n'}}, the
  counts that occur); psnr is None without teacher images.
  """
  ok = metrics.geneval_per_image(clf, images, s.scenes)
  summary = metrics.geneval_summary(ok, s.scenes)
  by_objects = {k: v for k, v in summary.items() if k != 'all'}
  # geneval_summary splits 1 and 2 objects (the classic world's counts);
  # the 'shapes9' world also has 3.
  counts = np.array([len(sc.objects) for sc in s.scenes])
  for n in range(3, int(counts.max(initial=0)) + 1):
    sel = counts == n
    if sel.any():
      k = int(np.asarray(ok)[sel].sum())
      by_objects[f'{n}_objects'] = {
          'score': k / int(sel.sum()),
          'ci': metrics.wilson_interval(k, int(sel.sum())), 'n': int(sel.sum())}
  return {'geneval': summary['all']['score'],
          'geneval_ci': summary['all']['ci'],
          'geneval_by_objects': by_objects,
          'fid': metrics.toy_fid(clf, images, s.reference),
          'psnr': None if teacher_images is None else metrics.psnr(
              images, teacher_images)}
