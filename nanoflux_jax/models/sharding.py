"""Sharded init, placement and loading shardings of the Flux DiT and T5.

The model-specific side of `parallel`: `parallel` knows meshes and the rule
table and shards any linen module from its example inputs; this module
supplies the Flux / T5 modules and their inputs (`flux.dummy_inputs`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.models import flux
from nanoflux_jax.models.t5 import T5Encoder

RULES = parallel.RULES


def _flux_module_and_inputs(cfg_or_module: FluxConfig | nn.Module):
  """(Flux module, its example inputs) for a config or a Flux module."""
  module = (cfg_or_module if isinstance(cfg_or_module, nn.Module)
            else flux.Flux(cfg_or_module))
  return module, flux.dummy_inputs(module.config)


def param_shardings(cfg_or_module: FluxConfig | nn.Module, mesh: Mesh,
                    rules=RULES):
  """NamedShardings of a Flux model's params (unboxed tree), no allocation.

  The tree matches `load_flux_transformer`'s params, so it can be passed as
  `load_flux_transformer(path, shardings=param_shardings(cfg, mesh))` when
  the config is known, or use `loading_shardings(mesh)` when it is not.
  """
  module, inputs = _flux_module_and_inputs(cfg_or_module)
  return parallel.variable_shardings(module, mesh, rules, **inputs)['params']


def loading_shardings(mesh: Mesh, rules=RULES
                      ) -> Callable[[FluxConfig, Any], Any]:
  """A (config, param_shapes) -> shardings callable for checkpoint loaders.

  `load_flux_transformer(path, shardings=loading_shardings(mesh))` places
  each converted tensor straight onto its shard while streaming the file.
  """
  return lambda cfg, shapes: param_shardings(cfg, mesh, rules)


def t5_loading_shardings(mesh: Mesh, rules=RULES
                         ) -> Callable[[Any, Any], Any]:
  """`load_t5_encoder(path, shardings=t5_loading_shardings(mesh))`: each
  T5 tensor goes straight onto its shard (T5-XXL: FSDP over the mesh)."""
  def shardings(cfg, shapes):
    del shapes
    return parallel.variable_shardings(T5Encoder(cfg), mesh, rules,
                                       jnp.zeros((1, 4), jnp.int32))['params']
  return shardings


def init_flux(cfg: FluxConfig, mesh: Mesh, rng, rules=RULES):
  """Sharded random Flux params; returns (params, shardings)."""
  module, inputs = _flux_module_and_inputs(cfg)
  variables, shardings = parallel.sharded_init(module, mesh, rules, rng,
                                               **inputs)
  return variables['params'], shardings['params']


def place_flux(cfg: FluxConfig, params, mesh: Mesh | None):
  """`params` of `cfg` laid out by the rules on `mesh` (None: unchanged).

  Device-to-device only: leaves already on their sharding stay put, the
  others are resharded by XLA, never gathered on a host. The compression
  transforms call this on their output so a sharded student stays sharded.
  """
  if mesh is None:
    return params
  return jax.device_put(params, param_shardings(cfg, mesh))
