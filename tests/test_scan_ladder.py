"""A scanned ladder: the rungs' transforms on a scan_blocks student give the
unrolled ladder's students (compress/layout.py converts at rung boundaries),
and the re-scanned students keep their runs stacked on the mesh."""
import jax
import ml_collections
import numpy as np

from nanoflux_jax import checkpoint
from nanoflux_jax import compress
from nanoflux_jax import parallel
from nanoflux_jax.compress import layout
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.ladder import rungs
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.distill import trainer
from nanoflux_jax.models import flux
from nanoflux_jax.models import scan_blocks
from nanoflux_jax.models import sharding

# FLUX's structure (AdaLN, no guidance, schnell's 4-step schedule), tiny.
TEACHER = FluxConfig.tiny(depth=3, depth_single_blocks=4, attention_impl='xla')
GRID = (4, 4)
RUNGS = (  # The ladder_schnell rungs, scaled: block-scoped prune, depth
           # with merging, static modulation, the down-sampler.
    ('prune', dict(criterion='_test_param_hash', keep_heads=0.5,
                   keep_mlp=0.5, scope='block', calib_n=1)),
    ('depth', dict(keep=(0, 1, 3, 4, 6), merge=True)),
    ('static_modulation', {}),
    ('downsample', dict(start=1, end=-2, factor=2)),
)


@compress.register('_test_param_hash')
def _param_hash_scores(cfg, params, calib, *, img_grid=None):
  """Uneven unit scores that depend on the params' values (so both layouts
  must hand the transform the same params), without compiling a gradient:
  this test is about layouts; test_compress covers the real criteria."""
  del calib, img_grid
  seed = int(abs(float(sum(np.asarray(x, np.float64).sum()
                          for x in jax.tree.leaves(params)))) * 1e6)
  rng = np.random.default_rng(seed % 2**32)
  return jax.tree.map(lambda m: rng.random(np.shape(m)).astype(np.float32),
                      compress.PruneMask.ones(cfg))


def _rel(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def _context(mesh, teacher):
  config = ml_collections.ConfigDict()
  config.distill = trainer.default_config()
  config.distill.data.grid = GRID
  config.distill.data.txt_len = 8
  config.teacher = {'path': '', 'preset': 'tiny', 'seed': 1}
  ctx = rungs.Context(config, mesh, GRID, '/nonexistent')
  ctx._loaded['teacher'] = teacher  # pylint: disable=protected-access
  return ctx


def _check_placed(student, mesh):
  """Every leaf sits on the rules' sharding of the student's own layout."""
  want = sharding.param_shardings(student[0], mesh)
  jax.tree.map(lambda x, sh: np.testing.assert_equal(
      x.sharding.is_equivalent_to(sh, x.ndim), True), student[1], want)


def test_scanned_ladder_gives_the_unrolled_students():
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  teacher = (TEACHER, sharding.init_flux(TEACHER, mesh,
                                         jax.random.PRNGKey(0))[0])
  scanned = layout.relayout(*teacher, True, mesh)
  assert set(scanned[1]) >= {'double_blocks_0_to_2', 'single_blocks_0_to_3'}
  _check_placed(scanned, mesh)
  ctx_u, ctx_s = _context(mesh, teacher), _context(mesh, scanned)
  u, s = teacher, scanned
  runs = {}
  for kind, opts in RUNGS:
    opts = {**rungs.RUNG_KINDS[kind].defaults, **opts}
    fn = rungs.RUNG_KINDS[kind].compress
    stage_u, stage_s = Stage(u[0], 4, GRID), Stage(s[0], 4, GRID)
    u = layout.compress_unrolled(lambda x: fn(ctx_u, stage_u, x, opts)[0], u,
                                 mesh)
    s = layout.compress_unrolled(lambda x: fn(ctx_s, stage_s, x, opts)[0], s,
                                 mesh)
    assert not u[0].scan_blocks and s[0] == u[0].replace(scan_blocks=True)
    _check_placed(s, mesh)
    back = layout.unrolled(s, mesh)[1]
    assert jax.tree.structure(back) == jax.tree.structure(u[1]), kind
    jax.tree.map(lambda a, b: np.testing.assert_array_less(
        _rel(a, b), 1e-5 + 1e-30), back, u[1])
    runs[kind] = scan_blocks.block_runs(s[0])
    # The scanned student's params are exactly its config's stacked layout.
    assert (jax.tree.map(np.shape, s[1]) ==
            jax.tree.map(np.shape, flux.param_shapes(s[0]))), kind
  # Block-scoped pruning keeps equal widths: one run per kind still.
  assert runs['prune'] == [('double', 0, 3), ('single', 0, 4)]
  # Depth: the kept blocks (doubles 0, 1; singles 0, 1, 3) re-stacked.
  assert [b - a for _, a, b in runs['depth']] == [2, 3]
  # The down-sampler's coarse range [1, 3] is its own runs.
  assert runs['downsample'] == [('double', 0, 1), ('double', 1, 2),
                                ('single', 0, 2), ('single', 2, 3)]
  assert s[0].downsample_start == 1 and s[0].downsample_end == 3
  # And the scanned student runs as the unrolled one does (the runs
  # resample at the coarse range's edges).
  rng = np.random.default_rng(0)
  x = {k: v if isinstance(v, tuple) else
       np.asarray(rng.standard_normal(v.shape), np.float32)
       for k, v in flux.dummy_inputs(u[0], 2, 16, 8).items()}
  x['timesteps'] = np.asarray([1.0, 0.5], np.float32)
  fwd = lambda st: jax.jit(lambda p: flux.Flux(st[0]).apply(
      {'params': p}, **x).velocity)(st[1])
  assert _rel(fwd(s), fwd(u)) <= 1e-5


def test_relayout_of_shapes_and_none():
  """The memory plan converts abstract params; a resuming rung has none."""
  shapes = flux.param_shapes(TEACHER)
  cfg, out = layout.relayout(TEACHER, shapes, True)
  assert cfg.scan_blocks
  assert jax.tree.map(np.shape, out) == jax.tree.map(
      np.shape, flux.param_shapes(cfg))
  assert layout.relayout(TEACHER, None, True) == (cfg, None)
  assert layout.relayout(cfg, out, True)[1] is out  # Already scanned.


def test_scanned_downsampler_student_checkpoints_both_ways(tmp_path):
  """A scanned student with the coarse range as its own runs saves and
  loads back in either layout (what a resumed ladder reads)."""
  cfg = FluxConfig.tiny(depth=2, depth_single_blocks=4, downsample_start=1,
                        downsample_end=4, scan_blocks=True)
  assert scan_blocks.block_runs(cfg) == [
      ('double', 0, 1), ('double', 1, 2), ('single', 0, 3), ('single', 3, 4)]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(
      s.dtype), flux.param_shapes(cfg))
  checkpoint.save(str(tmp_path / 's'), cfg, params)
  got_cfg, got = checkpoint.load(str(tmp_path / 's'))
  assert got_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, got, params)
  u_cfg, u = checkpoint.load(str(tmp_path / 's'), scan_blocks=False)
  assert u_cfg == cfg.replace(scan_blocks=False)
  jax.tree.map(np.testing.assert_array_equal, u,
               layout.unrolled((cfg, params))[1])
