"""The step_distill rung (ladder/step_rung.py): targets, tables, ladder, export.

The targets are checked on a hand-made trajectory with exact numbers; the
table re-indexing against the model's own outputs; one tiny ladder (a
4-step teacher, step distillation to 2 on its cached trajectories)
runs in-process and is rerun to show the finished rung is skipped.
"""
import dataclasses
import functools
import importlib.util
import json
import os
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax import compress
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import trainer
from nanoflux_jax.ladder import export_rung
from nanoflux_jax.ladder import rungs as rungs_lib
from nanoflux_jax.ladder import runner as ladder
from nanoflux_jax.ladder import step_rung
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import flux as flux_lib

# The ladder compiles the programs of test_trainer's tiny models: share its
# persistent cache.
jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'nanoflux_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'experiments', 'configs', 'ladder_tiny.py')
GRID = (2, 2)


def _cfg(**kw):
  return FluxConfig.tiny(depth=1, depth_single_blocks=1,
                         attention_impl='xla', **kw)


def _init(cfg, seed):
  """Random params of cfg's shapes (numpy: nothing to compile)."""
  r = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.2 * r.standard_normal(s.shape)).astype(s.dtype),
      flux_lib.param_shapes(cfg))


def _inputs(cfg, b, t=0.5, seed=0):
  r = np.random.default_rng(seed)
  n = GRID[0] * GRID[1]
  return dict(img=jnp.asarray(r.standard_normal((b, n, cfg.in_channels)),
                              jnp.float32),
              img_ids=sampling.image_ids(b, *GRID),
              txt=jnp.asarray(r.standard_normal((b, 3, cfg.context_in_dim)),
                              jnp.float32),
              txt_ids=sampling.text_ids(b, 3),
              timesteps=jnp.full((b,), t, jnp.float32),
              y=jnp.asarray(r.standard_normal((b, cfg.vec_in_dim)),
                            jnp.float32))


@functools.lru_cache
def _apply(cfg):
  return jax.jit(lambda p, x: flux_lib.Flux(cfg).apply({'params': p},
                                                       **x).velocity)


def _v(cfg, params, x):
  """The model's velocity (one jitted program per config)."""
  return np.asarray(_apply(cfg)(params, x))


# ---------------------------------------------------------------------------
# Targets.
# ---------------------------------------------------------------------------
def test_target_is_the_teachers_two_step_displacement():
  # Teacher: 4 steps on [1, .75, .5, .25, 0], states 10, 7, 3, 2 and a last
  # velocity 4, so its sample is 2 + (0 - .25) * 4 = 1. Student: 2 steps.
  xs = np.array([10., 7., 3., 2.], np.float32).reshape(1, 4, 1, 1)
  vs = np.array([0., 0., 0., 4.], np.float32).reshape(1, 4, 1, 1)
  teacher = (1.0, 0.75, 0.5, 0.25, 0.0)
  student = (1.0, 0.5, 0.0)
  assert step_rung.landing_indices(student, teacher) == (0, 2, 4)
  starts, targets = step_rung.step_targets(xs, vs, student, teacher)
  np.testing.assert_array_equal(np.asarray(starts).ravel(), [10., 3.])
  # (3 - 10) / (.5 - 1) = 14; (1 - 3) / (0 - .5) = 4.
  np.testing.assert_array_equal(np.asarray(targets).ravel(), [14., 4.])
  # The student's Euler steps land on the teacher's states.
  assert 10. + (0.5 - 1.0) * 14. == 3. and 3. + (0. - 0.5) * 4. == 1.
  with pytest.raises(ValueError, match=r'not a subset .*\(t=0\.6'):
    step_rung.landing_indices((1.0, 0.6, 0.0), teacher)


def test_loss_matches_the_target_cached_or_not():
  """One student step over a 2-step teacher: the loss is MSE(student
  velocity at the noise, x_teacher_final - noise over -1), the same with the
  trajectory from the cache or computed in the loss."""
  s_cfg, t_cfg = _cfg(), _cfg()
  sp, tp = _init(s_cfg, 0), _init(t_cfg, 1)
  x = _inputs(t_cfg, 2)
  teacher = (1.0, 0.5, 0.0)
  spec = trainer.DistillSpec(
      student=s_cfg, teacher=t_cfg, schedule=(1.0, 0.0), grid=GRID,
      weights=(('output_kd', 2.0),), teacher_schedule=teacher)
  batch = dict(txt=x['txt'], y=x['y'], noise=x['img'])
  xs, vs, final = data_lib.teacher_trajectory(
      t_cfg, tp, x['img'], x['txt'], x['y'], teacher, GRID)
  v = _v(s_cfg, sp, dict(x, timesteps=jnp.ones((2,))))
  want = np.mean((v - (np.asarray(final) - np.asarray(x['img'])) / -1.0)**2)
  loss = jax.jit(lambda b: step_rung.step_distill_loss(
      {'student': sp}, {'teacher': tp}, b, jax.random.PRNGKey(0), spec=spec))
  for b in (batch, dict(batch, traj_x=xs, traj_v=vs)):
    total, m = loss(b)
    np.testing.assert_allclose(float(m['output_kd']), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), 2 * want, rtol=1e-5)


# ---------------------------------------------------------------------------
# Static-modulation tables.
# ---------------------------------------------------------------------------
def test_tables_keep_the_rows_of_the_new_schedule():
  cfg = _cfg()
  params = _init(cfg, 0)
  x = _inputs(cfg, 1)
  ts = (1.0, 0.75, 0.5, 0.25)
  scfg, sparams = compress.to_static_modulation(cfg, params, ts, x['y'])
  # The rung's compress: 4 steps -> 2 on a 4-step teacher.
  ctx = types.SimpleNamespace(teacher_stage=Stage(cfg, 4, GRID))
  (ncfg, nparams), stage = rungs_lib.RUNG_KINDS['step_distill'].compress(
      ctx, Stage(scfg, 4, GRID), (scfg, sparams), {'factor': 2})
  assert stage.num_steps == 2 and ncfg.static_timesteps == (1.0, 0.5)
  assert nparams['double_blocks_0']['img_mod']['table'].shape == (2, 6, 64)
  assert nparams['final_mod']['table'].shape == (2, 2, 64)
  assert sampling.schedule_for(ncfg, 2, 4) == [1.0, 0.5, 0.0]
  for t in (1.0, 0.5):
    xt = dict(x, timesteps=jnp.full((1,), t))
    np.testing.assert_array_equal(_v(ncfg, nparams, xt), _v(scfg, sparams, xt))
  # Everything but the tables is untouched.
  same = jax.tree.map(lambda a, b: a.shape == b.shape, nparams['img_in'],
                      sparams['img_in'])
  assert all(jax.tree.leaves(same))
  # A schedule the tables were not built for is refused, not approximated.
  with pytest.raises(ValueError, match=r'timestep 0\.6 .* no static'):
    step_rung.keep_table_rows(scfg, sparams, (1.0, 0.6))
  with pytest.raises(ValueError, match='3 steps, not divisible by factor=2'):
    rungs_lib.RUNG_KINDS['step_distill'].compress(
        ctx, Stage(scfg, 3, GRID), (scfg, sparams), {'factor': 2})
  # The memory plan's shapes: the same tables, abstractly.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          sparams)
  (c2, p2), st2 = rungs_lib.RUNG_KINDS['step_distill'].shapes(
      Stage(scfg, 4, GRID), (scfg, abstract), {'factor': 2})
  assert c2 == ncfg and st2.num_steps == 2
  shape = lambda t: jax.tree.map(lambda a: a.shape, t)
  assert shape(p2) == shape(nparams)
  # ... and traced, as the memory plan runs it (under jax.eval_shape).
  assert shape(jax.eval_shape(lambda p: rungs_lib.RUNG_KINDS[
      'step_distill'].shapes(Stage(scfg, 4, GRID), (scfg, p),
                             {'factor': 2})[0][1], abstract)) == shape(nparams)


# ---------------------------------------------------------------------------
# The ladder.
# ---------------------------------------------------------------------------
def _config():
  spec = importlib.util.spec_from_file_location('ladder_tiny', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.distill.num_sampling_steps = 4
  c.distill.num_steps = 2
  c.distill.checkpoint_every = 2
  c.distill.data.cache_dir = 'teacher_cache'  # Shared by both rungs.
  c.distill.data.cache_shards = 2
  c.timing.repeats = 1
  c.samples.num = 2
  c.rungs = [{'kind': 'step_distill'}]
  return c


@pytest.mark.parametrize('rungs, distill, match', [
    ([{'kind': 'step_distill', 'factor': 1}], {}, 'integer >= 2, got 1'),
    ([{'kind': 'step_distill', 'factor': 3}], {},
     'num_sampling_steps=4 is not divisible by factor=3'),
    ([{'kind': 'step_distill'}, {'kind': 'step_distill', 'factor': 4}], {},
     'multiply to 8'),
    ([{'kind': 'step_distill'}], {'loss': {'weights': {'rf': 1.0}}},
     r"no \['rf'\] term"),
    ([{'kind': 'step_distill'}], {'timesteps': {'mode': 'mixed'}},
     "mode='schedule'"),
])
def test_bad_step_rungs_fail_before_any_work(tmp_path, rungs, distill, match):
  c = _config()
  c.rungs = [dict(r, distill=distill) for r in rungs]
  with pytest.raises(ValueError, match=match):
    ladder.run_ladder(c, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()
  # Two halvings of 4 steps are fine; an ablation does not compound.
  c.rungs = [{'kind': 'step_distill', 'ablation': True, 'factor': 4},
             {'kind': 'step_distill'}, {'kind': 'step_distill'}]
  assert len(ladder.check_config(c)) == 3


def test_ladder_halves_the_steps_and_resumes(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'wd')
  # One device: the tiny batch of 4 does not split over the 8 fake ones.
  mesh = parallel.create_mesh((1, 1, 1), jax.devices()[:1])
  report = ladder.run_ladder(_config(), workdir, mesh=mesh)
  assert report['complete']
  row = report['rungs'][0]
  assert row['kind'] == 'step_distill' and row['steps'] == 2
  assert (row['sampling_steps'], row['teacher_sampling_steps']) == (2, 4)
  assert np.isfinite(row['losses']['output_kd'])
  assert row['loss_weights'] == {'output_kd': 1.0}
  rung = os.path.join(workdir, 'rung_0_step_distill')
  stage = json.load(open(os.path.join(rung, 'stage.json')))['stage']
  assert stage['num_steps'] == 2
  assert stage['dit'] == os.path.join('rung_0_step_distill', 'student')
  # The distilled student samples on the 2-step schedule the stage names.
  assert Stage.from_dict(stage, workdir).schedule == (1.0, 0.5, 0.0)
  # The teacher cache holds the 4-step teacher's trajectories.
  meta = json.load(open(os.path.join(workdir, 'teacher_cache',
                                     'cache_meta.json')))
  assert meta['schedule'] == [1.0, 0.75, 0.5, 0.25, 0.0]
  # The rerun skips the finished rung: it neither compresses nor trains.
  def boom(*a, **k):
    raise AssertionError('a finished rung ran again')
  monkeypatch.setitem(rungs_lib.RUNG_KINDS, 'step_distill', dataclasses.replace(
      rungs_lib.RUNG_KINDS['step_distill'], compress=boom, run=boom))
  again = ladder.run_ladder(_config(), workdir, mesh=mesh)
  assert again['complete'] and again['rungs'][0]['sampling_steps'] == 2


def test_export_rung_writes_the_stages_step_count(tmp_path, monkeypatch):
  """The export rung's call defaults and .tflite bundle take the stage's
  num_steps (a step-distilled stage samples in fewer)."""
  seen = {}

  class Pipe:
    def with_call_defaults(self, **kw):
      seen['defaults'] = kw
      return self

    def save(self, path):
      seen['saved'] = path

  def export_pipeline(pipe, path, h, w, **kw):
    seen['export'] = kw
    return {'sizes': {'total_bytes': 1}, 'export': {'seconds': 0.0}}

  monkeypatch.setattr(export_rung.bundle, 'export_pipeline', export_pipeline)
  cfg = _cfg()
  c = _config()
  ctx = types.SimpleNamespace(
      pipeline_for=lambda student, te: Pipe(), resolution=16, mesh=None,
      workdir=str(tmp_path), config=c)
  stage = Stage(cfg, 2, GRID)
  out = rungs_lib.RUNG_KINDS['export'].run(ctx, stage, (cfg, None),
                                           {'quantize': ('none',)})
  assert out.finished
  assert seen['defaults']['num_steps'] == 2 and seen['export']['num_steps'] == 2
