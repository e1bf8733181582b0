"""Where every distillation gets its teacher: one resolver for all of them.

A teacher config (`config.teacher` of the trainer and the ladder,
`config.denoiser` of the text-encoder distillation) names its source, tried
in this order:
  a pipeline  the caller's FluxPipeline (the ladder's `teacher.shapes` or
              `teacher.pipeline`; the text encoder's `config.pipeline`);
  path        a FLUX transformer checkpoint (BFL file or diffusers folder);
  preset      a random FluxConfig preset (+ overrides, seed): toy runs, tests.
`load_teacher` returns that denoiser (cfg, params) sharded over the mesh.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from nanoflux_jax.compress import layout
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.convert import flux as convert_flux
from nanoflux_jax.models import sharding

PRESETS = ('schnell', 'dev', 'tiny', 'benchmark')


def flux_config(c: ml_collections.ConfigDict,
                where: str = 'student') -> FluxConfig:
  """FluxConfig.<c.preset>(**c.overrides); errors name config.<where>."""
  name = c.get('preset', 'tiny')
  if name not in PRESETS:
    raise ValueError(f'config.{where}.preset={name!r}; expected one of '
                     f'{PRESETS}')
  try:
    return getattr(FluxConfig, name)(**dict(c.get('overrides', {}) or {}))
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.{where}.overrides: {e}') from e


def load_teacher(tc: ml_collections.ConfigDict, mesh,
                 pipeline=None) -> tuple[FluxConfig | None, Any]:
  """The teacher denoiser (cfg, params) on the mesh: the DiT of `pipeline`
  (a FluxPipeline the caller loaded from tc.shapes / tc.pipeline), else
  tc.path, else a random tc.preset; (None, None) when tc names none
  (from-scratch rectified flow). tc.scan_blocks: in the scanned layout."""
  out = None, None
  if pipeline is not None:
    cfg = pipeline.flux_cfg
    out = cfg, sharding.place_flux(cfg, pipeline.flux_params, mesh)
  elif tc.get('path'):
    out = convert_flux.load_flux_transformer(
        tc.path, shardings=sharding.loading_shardings(mesh))
  elif tc.get('preset'):
    cfg = flux_config(tc, 'teacher')
    out = cfg, sharding.init_flux(cfg, mesh, jax.random.PRNGKey(
        tc.get('seed', 0)))[0]
  if out[0] is not None and tc.get('scan_blocks'):
    # Scanned on the mesh (no host copy); a ladder's students inherit it.
    out = layout.relayout(*out, True, mesh)
  return out

