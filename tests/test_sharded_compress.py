"""The ladder's compression rungs transform sharded params on their devices.

A FLUX.1-schnell-shaped DiT scaled down (hidden 256 = 2 heads x 128, RoPE
axes (16, 56, 56), 2 double + 4 single blocks) on a (data 2, fsdp 2,
tensor 2) mesh of 8 fake CPU devices goes through the prune, depth (merged),
static-modulation and down-sampler rungs inside
`jax.transfer_guard_device_to_host('disallow')` (no implicit copy to the
host), while every explicit `jax.device_get` is counted: none may fetch more
than one block's parameters. Outputs stay laid out by `parallel.RULES` and
equal the same transforms done on a host copy.
"""
import jax
import ml_collections
import numpy as np
import pytest

from nanoflux_jax import compress
from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.ladder import rungs
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import sharding

SCALED_SCHNELL = dict(hidden_size=256, num_heads=2, head_dim=128,
                      depth=2, depth_single_blocks=4, context_in_dim=64,
                      vec_in_dim=32, attention_impl='xla')
GRID = (4, 4)


def _context(mesh):
  c = ml_collections.ConfigDict()
  c.teacher = {'path': '', 'pipeline': '', 'preset': 'schnell', 'seed': 3,
               'overrides': dict(SCALED_SCHNELL)}
  c.distill = {'seed': 0, 'data': {'prompts': ['a red circle', 'a blue star',
                                               'a green square'],
                                   'txt_len': 4, 'grid': GRID}}
  return rungs.Context(c, mesh, GRID, '')


def _block_bytes(cfg, params):
  blocks = [v for k, v in params.items() if k.startswith(('double_blocks_',
                                                          'single_blocks_'))]
  return max(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(b))
             for b in blocks)


class _CountingDeviceGet:
  """Wraps jax.device_get; records the bytes of every explicit fetch."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def __call__(self, tree):
    self.calls.append(sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array)))
    return self.inner(tree)


def _assert_laid_out(cfg, params, mesh):
  want = sharding.param_shardings(cfg, mesh)
  got = jax.tree.map(lambda x: x.sharding, params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.mesh == mesh and g.spec == w.spec, (g, w)


def _run_rungs(ctx, student):
  out = []
  for kind, opts in (
      # scope='block': equal widths, so the depth rung can merge blocks.
      ('prune', dict(criterion='taylor', keep_heads=0.5, keep_mlp=0.75,
                     scope='block', calib_n=2)),
      ('depth', dict(keep_blocks=4, criterion='block_io', merge=True,
                     calib_n=2)),
      ('static_modulation', {}),
      ('downsample', dict(start=1, end=-2, factor=2))):
    rk = rungs.RUNG_KINDS[kind]
    student, _ = rk.compress(ctx, Stage(student[0], 4, GRID), student,
                             {**rk.defaults, **opts})
    out.append((kind, student))
  return out


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_rungs_never_copy_the_sharded_model_to_a_host(monkeypatch):
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  ctx = _context(mesh)
  cfg, params = ctx.teacher  # Sharded init on the mesh.
  _assert_laid_out(cfg, params, mesh)
  limit = _block_bytes(cfg, params)
  counter = _CountingDeviceGet(jax.device_get)
  monkeypatch.setattr(jax, 'device_get', counter)
  with jax.transfer_guard_device_to_host('disallow'):
    results = _run_rungs(ctx, (cfg, params))
  monkeypatch.undo()
  assert counter.calls, 'the scores are fetched explicitly'
  assert max(counter.calls) <= limit, (max(counter.calls), limit)
  kinds = [k for k, _ in results]
  assert kinds == ['prune', 'depth', 'static_modulation', 'downsample']
  for kind, (s_cfg, s_params) in results:
    _assert_laid_out(s_cfg, s_params, mesh)
  p_cfg = results[0][1][0]
  assert set(p_cfg.double_heads + p_cfg.single_heads) == {1}
  s_cfg = results[-1][1][0]
  assert (s_cfg.num_blocks, s_cfg.modulation, s_cfg.downsample_start,
          s_cfg.downsample_end) == (4, 'static', 1, 2)
  # The sharded FSDP axis really splits the big kernels (not replicated).
  qkv = results[-1][1][1]['single_blocks_0']['attn']['qkv']['kernel']
  assert qkv.sharding.spec[0] == 'fsdp'
  assert qkv.addressable_shards[0].data.shape[0] == qkv.shape[0] // 2


def _keep_n(rng, n, k):
  m = np.zeros(n, np.float32)
  m[rng.choice(n, k, replace=False)] = 1
  return m


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_sharded_transforms_equal_host_transforms():
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  cfg = FluxConfig.schnell(**SCALED_SCHNELL)
  params = sharding.init_flux(cfg, mesh, jax.random.PRNGKey(0))[0]
  host = jax.device_get(params)
  rng = np.random.default_rng(0)
  mask = compress.PruneMask.ones(cfg)
  mask = mask.replace(
      double_heads=tuple(np.array([0., 1.]) for _ in cfg.double_heads),
      single_mlp=tuple(_keep_n(rng, m, 600) for m in cfg.single_mlp))
  keep = np.array([True, False, True, False, True, True])
  pooled = rng.standard_normal((3, cfg.vec_in_dim)).astype(np.float32)

  def ladder(p):
    c, p = compress.prune(cfg, p, mask)
    c, p = compress.remove_blocks(c, p, keep, merge=True)
    c, p = compress.to_static_modulation(c, p, (1.0, 0.75, 0.5, 0.25), pooled)
    return compress.add_downsampler(c, p, 1, 2, jax.random.PRNGKey(1))

  with jax.transfer_guard_device_to_host('disallow'):
    s_cfg, s_params = ladder(params)
  h_cfg, h_params = ladder(host)
  assert s_cfg == h_cfg
  _assert_laid_out(s_cfg, s_params, mesh)
  assert parallel.mesh_of(h_params) is None or all(
      len(x.sharding.device_set) == 1 for x in jax.tree.leaves(h_params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), s_params, h_params)


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (fake) devices')
def test_pipeline_loads_dit_and_t5_straight_onto_the_mesh(tmp_path):
  pytest.importorskip('torch')
  # pylint: disable-next=g-import-not-at-top
  from nanoflux_jax.pipeline import FluxPipeline
  from nanoflux_jax.testing.tiny_flux import make_tiny_flux_pipeline
  make_tiny_flux_pipeline(tmp_path / 'pipe')
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  with jax.transfer_guard_device_to_host('disallow'):
    sharded = FluxPipeline.from_pretrained(str(tmp_path / 'pipe'), mesh=mesh)
  host = FluxPipeline.from_pretrained(str(tmp_path / 'pipe'))
  _assert_laid_out(sharded.flux_cfg, sharded.flux_params, mesh)
  t5_want = sharding.t5_loading_shardings(mesh)(sharded.t5_cfg, None)
  for x, w in zip(jax.tree.leaves(sharded.t5_params), jax.tree.leaves(t5_want)):
    assert x.sharding.mesh == mesh and x.sharding.spec == w.spec
  # T5's FFN kernels really are split (embed over fsdp, mlp over tensor).
  wi = [x for x in jax.tree.leaves(sharded.t5_params) if x.ndim == 2 and
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated]
  assert wi
  for a, b in ((sharded.flux_params, host.flux_params),
               (sharded.t5_params, host.t5_params)):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(
        np.asarray(x), np.asarray(y)), a, b)
  emb = sharded.encode_prompt(['a cat'], 8)
  ref = host.encode_prompt(['a cat'], 8)
  np.testing.assert_allclose(np.asarray(emb[0]), np.asarray(ref[0]),
                             rtol=1e-5, atol=1e-5)
