"""Device mesh, the one table of logical-axis rules, and sharded init.

Models name their parameter and activation axes logically (embed, heads, kv,
mlp, vocab, conv_in, conv_out; act_batch, act_len, act_embed). `RULES` below is
the only place that maps those names onto the mesh axes:

  data    pure data parallelism: the batch is split, params are replicated;
  fsdp    data parallelism whose params/optimizer state are also split (ZeRO-3
          style, gathered per layer by XLA);
  tensor  Megatron-style model parallelism over attention heads / MLP channels.

Sharded init follows MaxText: eval_shape -> partition specs ->
jit(init, out_shardings), so a full model never sits on one device first.
This module knows no model: it shards any linen module from its example
inputs. The Flux / T5 helpers (`init_flux`, `param_shardings`, ...) live in
`models/sharding.py`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or axes, or None = replicated). A mesh axis is
# used at most once per array: flax skips a rule whose mesh axis is taken.
RULES: tuple[tuple[str, Any], ...] = (
    # Activations: batch over both data-parallel axes; length/embed whole.
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_embed', None),
    # Parameters: the model dim is FSDP-split, heads / MLP channels are
    # tensor-parallel, the per-head dim stays whole (RoPE / QK-norm act on it).
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('conv_in', None),
    ('conv_out', 'tensor'),
    # The stacked-blocks axis of scanned params (FluxConfig.scan_blocks):
    # every device holds every layer's slice of its shard.
    ('layers', None),
)




def rules_from(overrides) -> tuple[tuple[str, Any], ...]:
  """RULES with some logical axes mapped elsewhere (a config's
  `sharding_rules`: {logical axis: mesh axis, tuple of them, or None}).

  Raises:
    ValueError: naming an unknown logical axis or mesh axis.
  """
  overrides = dict(overrides or {})
  known = [name for name, _ in RULES]
  for name, target in overrides.items():
    if name not in known:
      raise ValueError(f'sharding_rules: unknown logical axis {name!r}; '
                       f'known: {known}')
    targets = target if isinstance(target, (tuple, list)) else (target,)
    bad = [t for t in targets if t is not None and t not in MESH_AXES]
    if bad:
      raise ValueError(f'sharding_rules.{name}={target!r}: unknown mesh axes '
                       f'{bad}; expected {MESH_AXES} or None')
  norm = lambda t: tuple(t) if isinstance(t, list) else t
  return tuple((name, norm(overrides.get(name, target)))
               for name, target in RULES)


# ---------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------
def mesh_shape(spec: Mapping[str, int] | Sequence[int],
               num_devices: int) -> tuple[int, int, int]:
  """Resolves a (data, fsdp, tensor) spec with at most one -1 ("the rest").

  Args:
    spec: {'data': d, 'fsdp': f, 'tensor': t} (missing axes are 1) or a
      3-sequence in MESH_AXES order.
    num_devices: devices the mesh must cover exactly.
  Raises:
    ValueError: unknown axes, several -1, or sizes that do not multiply to
      (or divide) num_devices; the message names the sizes.
  """
  if isinstance(spec, Mapping):
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
      raise ValueError(f'mesh: unknown axes {unknown}; expected {MESH_AXES}')
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in spec]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f'mesh: {sizes} must have one size per axis {MESH_AXES}')
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {sizes}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh: axis sizes must be positive or -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f'mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} '
          f'devices) do not divide the device count {num_devices}')
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {known} '
                     f'devices but there are {num_devices}')
  return tuple(sizes)


def create_mesh(spec: Mapping[str, int] | Sequence[int] = (-1, 1, 1),
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) Mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  try:  # Topology-aware ordering on TPU/GPU; plain reshape elsewhere.
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim over (data, fsdp); the other `ndim - 1` replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp'), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


# ---------------------------------------------------------------------------
# Logical specs -> shardings.
# ---------------------------------------------------------------------------
def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (pruned, odd widths).

  A pruned student may keep e.g. 5 heads on a 2-way tensor axis; that dim is
  replicated instead of failing, the rest of the array stays sharded.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`nn.with_logical_constraint` whose spec is `_fit` to x's shape.

  A no-op unless a mesh is set (`jax.set_mesh`) and logical rules are active
  (`nn.logical_axis_rules`), exactly when flax's constraint is active. Mesh
  axes that do not divide a dim are dropped from it (odd pruned widths,
  small micro-batches) instead of padding it.
  """
  spec = activation_spec(logical_axes, x.shape, 'constrain')
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def activation_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    caller: str = 'activation_spec') -> P | None:
  """The mesh PartitionSpec of an array of `shape` named `logical_axes`.

  None unless a mesh is set (`jax.set_mesh`) and logical rules are active
  (`nn.logical_axis_rules`). Mesh axes that do not divide a dim are dropped
  from it (`_fit`). `constrain` and shard_map'd kernels (splash attention)
  both read their specs from here, so `RULES` stays the one table.
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  if len(logical_axes) != len(shape):
    raise ValueError(f'{caller}: {len(logical_axes)} logical axes '
                     f'{tuple(logical_axes)} for an array of shape '
                     f'{tuple(shape)}')
  return _fit(nn.logical_to_mesh_axes(tuple(logical_axes), rules), shape,
              mesh)


def logical_shardings(abstract_boxed, mesh: Mesh, rules=RULES):
  """Boxed (nn.Partitioned) abstract tree -> unboxed tree of NamedShardings."""
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)), mesh_specs,
      shapes, is_leaf=lambda x: isinstance(x, P))


def _abstract_init(module: nn.Module, rng, *inputs, **kw):
  return jax.eval_shape(lambda r: module.init(r, *inputs, **kw), rng)


def variable_shardings(module: nn.Module, mesh: Mesh, rules=RULES, *inputs,
                       rng=None, **kw):
  """Shardings of every variable collection of `module.init(rng, *inputs)`."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return logical_shardings(_abstract_init(module, rng, *inputs, **kw), mesh,
                           rules)


def sharded_init(module: nn.Module, mesh: Mesh, rules, rng, *inputs, **kw):
  """Initialises `module` directly into its shardings (no host copy).

  Args:
    module: a linen module whose params use nn.with_logical_partitioning.
    mesh, rules: where logical axes go (rules=None: `RULES`).
    rng: init PRNG key; *inputs, **kw: example inputs of `module.__call__`.
  Returns:
    (variables, shardings): unboxed variables dict (e.g. {'params': ...})
    and the matching tree of NamedShardings.
  """
  rules = RULES if rules is None else rules
  shardings = variable_shardings(module, mesh, rules, *inputs, rng=rng, **kw)
  init = jax.jit(lambda r: nn.meta.unbox(module.init(r, *inputs, **kw)),
                 out_shardings=shardings)
  return init(rng), shardings


def shard_like(tree, shardings):
  """device_put every leaf of `tree` onto the matching sharding."""
  return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), tree,
                      shardings)


def mesh_of(tree) -> Mesh | None:
  """The Mesh the leaves of `tree` are laid out on (their NamedSharding's);
  None when no leaf is a jax.Array with a NamedSharding (host arrays)."""
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
      continue
    sh = x.sharding
    if isinstance(sh, NamedSharding):
      return sh.mesh
  return None


def describe(tree) -> dict[str, str]:
  """{'a/b/kernel': 'PartitionSpec(...)'} for logging and tests."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k, simple=True, separator='/'):
          str(getattr(v.sharding, 'spec', v.sharding)) for k, v in flat}


# Environment variables set by multi-process launchers (TPU pods, SLURM,
# MPI, an explicit coordinator).
_MULTI_HOST_ENV = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS',
                   'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_NTASKS',
                   'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES')


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() under a multi-process launcher; else no-op.

  Binaries call this first, so the same command runs on a laptop and on
  every host of a pod slice.
  """
  if any(os.environ.get(k) for k in _MULTI_HOST_ENV):
    if os.environ.get('SLURM_NTASKS', '2') != '1' and os.environ.get(
        'OMPI_COMM_WORLD_SIZE', '2') != '1':
      jax.distributed.initialize()
