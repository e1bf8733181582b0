r"""Self-contained reproducer: XLA's SPMD partitioner miscompiles one dot layout.

Pure JAX (no nanoflux_jax). On a 2x2x2 (data, fsdp, tensor) mesh of fake CPU
devices,

  y[b, d] = sum_m x[b, m] w[m, d]
  x: [B, M]  sharded P(('data', 'fsdp'), 'tensor')
  w: [M, D]  sharded P('tensor', 'fsdp')
  y: [B, D]  constrained to P(('data', 'fsdp'), 'tensor')

returns wrong rows: the rows of batch shards (data, fsdp) = (0, 1) and (1, 0)
are swapped. The partitioned HLO shows why: the partitioner inserts

  collective-permute(x), source_target_pairs={{0,0},{2,4},{4,2},{6,6},
                                              {1,1},{3,5},{5,3},{7,7}}

i.e. it re-orders x's batch shards from (data, fsdp) to (fsdp, data), then
all-gathers w over 'fsdp', multiplies, all-reduces over 'tensor' and slices
D by 'tensor', but never permutes the result back, so y is labelled
(data, fsdp) while holding (fsdp, data) rows. Shardy and GSPMD both fail
(propagation differs, the dot partitioning is shared). Every other layout of
the same dot tried (y's D replicated or unconstrained, w sharded on one axis,
w P('fsdp', 'tensor'), x's M replicated) is exact; so is every 2-axis mesh.

Run:  python experiments/repro_xla_sharding.py [--gspmd] [--hlo]
Exit status 1 when the bug reproduces.

In nanoflux_jax this layout arose in the backward pass (and, through the
final modulation, the forward pass) of Flux on a (2, 2, 2) mesh when the
activation constraints were inactive: propagation split the model dim of
activations / cotangents over 'tensor'. `layers.Dense` now constrains every
projection's input and output, and the trainer traces under the mesh, so
the model never asks XLA for this layout.
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top


def main(argv):
  if '--gspmd' in argv:
    jax.config.update('jax_use_shardy_partitioner', False)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2),
              ('data', 'fsdp', 'tensor'))
  sh = lambda *spec: NamedSharding(mesh, P(*spec))
  batch = ('data', 'fsdp')
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 16)).astype(np.float32)
  w = rng.standard_normal((16, 8)).astype(np.float32)

  @jax.jit
  def f(x, w):
    return jax.lax.with_sharding_constraint(x @ w, sh(batch, 'tensor'))

  xs, ws = jax.device_put(x, sh(batch, 'tensor')), jax.device_put(
      w, sh('tensor', 'fsdp'))
  got = np.asarray(f(xs, ws))
  want = x.astype(np.float64) @ w.astype(np.float64)
  err = np.abs(got - want).max(axis=1)
  print(f'jax {jax.__version__}, shardy={jax.config.jax_use_shardy_partitioner}')
  print('max |error| per row:', np.array2string(err, precision=2))
  if '--hlo' in argv:
    hlo = f.lower(xs, ws).compile().as_text()
    print('\n'.join(l for l in hlo.splitlines()
                    if 'collective-permute(' in l or 'all-gather(' in l
                    or 'all-reduce(' in l))
  bad = bool(err.max() > 1e-4)
  print('BUG REPRODUCED: wrong rows', np.flatnonzero(err > 1e-4).tolist()
        if bad else 'exact')
  # A layout that avoids it: y's model dim not split over 'tensor'.
  ok = jax.jit(lambda x, w: jax.lax.with_sharding_constraint(
      x @ w, sh(batch, None)))(xs, ws)
  print('workaround P((data, fsdp), None) max |error|:',
        float(np.abs(np.asarray(ok) - want).max()))
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
