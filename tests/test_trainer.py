"""The sharded trainer: sharded == single device, exact resume, learning."""
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nanoflux_jax import checkpoint
from nanoflux_jax import parallel
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import loop
from nanoflux_jax.distill import teacher as teacher_lib
from nanoflux_jax.distill import trainer

# Several train() calls compile identical programs; the persistent cache
# lets them share one compilation.
jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'nanoflux_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

TINY = {'depth': 1, 'depth_single_blocks': 1, 'attention_impl': 'xla'}


def _config(**kw):
  c = trainer.default_config()
  c.teacher.overrides = dict(TINY)
  c.student.overrides = dict(TINY)
  c.compute_dtype = 'float32'
  c.num_steps = 6
  c.batch_size = 8
  c.num_sampling_steps = 2
  c.log_every = 1
  c.checkpoint_every = 3
  c.loss.weights.feature_kd = 0.5
  c.loss.feature_pairs = ((0, 1), (1, 0))
  c.data.grid = (2, 4)
  c.data.txt_len = 4
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _single_device_mesh():
  return parallel.create_mesh((1, 1, 1), jax.devices()[:1])


def _mesh8():
  return parallel.create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})


# (2, 2, 2) used to be wrong (max |diff| ~2.4): without a mesh at trace time
# the activation constraints were off, XLA's propagation split the residual
# stream over 'tensor', and XLA's SPMD partitioner then miscompiles the
# [B(data,fsdp), L, M(tensor)] x [M(tensor), D(fsdp)] -> D(tensor) dot
# (experiments/repro_xla_sharding.py). The trainer now traces under the mesh.
@pytest.mark.parametrize('shape', [(2, 2, 2), (2, 1, 4), (1, 4, 2)])
def test_sharded_step_matches_single_device(tmp_path, shape):
  # A larger Adam eps: with eps=1e-8 Adam turns float-rounding-sized gradients
  # (e.g. of QK-norm scales) into +-lr steps, so a sharded reduction order
  # would flip them; the comparison is about sharding, not Adam's conditioning.
  # No warmup and a large lr, so every step moves the params and the loss:
  # a scale error in the sharded loss or gradient (a missing mean over data
  # shards) shows in the loss and grad-norm histories, which Adam and
  # clipping would otherwise hide from the params.
  assert jax.device_count() == 8
  c = _config(stop_after=3, adam_eps=1e-3, warmup_steps=0,
              learning_rate=1e-2)
  mesh = parallel.create_mesh(shape)
  sharded, hist = trainer.train(c, str(tmp_path / 'a'), mesh=mesh)
  single, hist1 = trainer.train(c, str(tmp_path / 'b'),
                                mesh=_single_device_mesh())
  assert int(sharded.step) == 3 and len(hist) == 3
  assert [h['step'] for h in hist] == [h['step'] for h in hist1] == [1, 2, 3]
  for k in ('loss', 'output_kd', 'feature_kd', 'grad_norm'):
    np.testing.assert_allclose([h[k] for h in hist], [h[k] for h in hist1],
                               rtol=1e-5, err_msg=k)
  losses = [h['loss'] for h in hist]
  assert abs(losses[2] - losses[0]) > 1e-3 * losses[0], losses  # It moved.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               sharded.params, single.params)
  # Params and Adam moments really are sharded by the rules.
  qkv = sharded.params['student']['double_blocks_0']['img_attn']['qkv']
  want = P('fsdp', None, 'tensor', None)  # Size-1 axes stay in the spec.
  assert qkv['kernel'].sharding.spec == want
  mu = sharded.opt_state[1][0].mu['student']['double_blocks_0']['img_attn']
  assert mu['qkv']['kernel'].sharding.spec == want
  assert len(qkv['kernel'].addressable_shards[0].data.flatten()) * (
      shape[1] * shape[2]) == qkv['kernel'].size
  for h in hist:
    assert {'loss', 'output_kd', 'feature_kd', 'grad_norm', 'steps_per_s',
            'tokens_per_s'} <= set(h)


def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
  c = _config()
  full, _ = trainer.train(c, str(tmp_path / 'full'), mesh=_mesh8())
  c.stop_after = 3  # "Killed" after step 3 (the checkpoint at 3 survives).
  part, _ = trainer.train(c, str(tmp_path / 'resumed'), mesh=_mesh8())
  assert int(part.step) == 3
  c.stop_after = None
  resumed, hist = trainer.train(c, str(tmp_path / 'resumed'), mesh=_mesh8())
  assert [h['step'] for h in hist] == [4, 5, 6]  # log_every=1.
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # metrics.jsonl: every logged step once, across the kill, as uninterrupted.
  want = loop.read_metrics(str(tmp_path / 'full'))
  got = loop.read_metrics(str(tmp_path / 'resumed'))
  assert [m['step'] for m in got] == [m['step'] for m in want] == list(
      range(1, 7))
  np.testing.assert_allclose([m['loss'] for m in got],
                             [m['loss'] for m in want], rtol=1e-6)
  assert all(m['eta_s'] >= 0 and m['steps_per_s'] > 0 for m in got)
  # The finished run leaves a loadable student checkpoint.
  cfg, params = checkpoint.load(str(tmp_path / 'resumed' / 'student'))
  assert cfg.depth == 1
  jax.tree.map(np.testing.assert_array_equal, params,
               resumed.params['student'])


def test_sharding_rules_from_config_and_a_profiled_step(tmp_path):
  c = _config(stop_after=2, profile_steps=(2, 2))
  c.sharding_rules.heads = None  # Heads replicated instead of 'tensor'.
  state, _ = trainer.train(c, str(tmp_path), mesh=_mesh8())
  qkv = state.params['student']['double_blocks_0']['img_attn']['qkv']
  assert qkv['kernel'].sharding.spec == P('fsdp', None, None, None)
  traces = [f for _, _, files in os.walk(tmp_path / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces
  # Lines logged after the restored step are dropped on resume.
  with open(tmp_path / loop.METRICS_FILE, 'a') as f:
    f.write('{"step": 5, "loss": 1.0}\n')
  c.stop_after = 3
  trainer.train(c, str(tmp_path), mesh=_mesh8())
  assert [m['step'] for m in loop.read_metrics(str(tmp_path))] == [1, 2, 3]


@pytest.mark.parametrize('field, value, match', [
    ('profile_steps', (3, 2), 'profile_steps'),
    ('sharding_rules', {'mlpx': None}, "unknown logical axis 'mlpx'"),
    ('sharding_rules', {'mlp': 'model'}, r"unknown mesh axes \['model'\]")])
def test_bad_loop_fields_are_named(field, value, match):
  c = _config()
  with c.ignore_type():
    setattr(c, field, value)
  with pytest.raises(ValueError, match=match):
    trainer.check_config(c)


def test_distillation_reduces_output_kd_10x(tmp_path):
  c = _config(num_steps=300, log_every=50, checkpoint_every=1000,
              learning_rate=3e-3, warmup_steps=20, batch_size=16)
  c.loss.weights.feature_kd = 0.0
  c.loss.feature_pairs = ()
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(f'{{"caption": "{p}"}}\n'
                             for p in data_lib.BUILTIN_PROMPTS[:4]))
  c.data.prompts = str(prompts)
  _, hist = trainer.train(c, str(tmp_path / 'wd'), mesh=_single_device_mesh())
  assert hist[0]['step'] == 1  # The first step is always logged.
  first, last = hist[0]['output_kd'], hist[-1]['output_kd']
  assert last < first / 10, [h['output_kd'] for h in hist]


class _Quadratic:
  """Batches for a toy loss ||w - target||^2, to test the generic loop."""

  def batch(self, step, process_index=0, process_count=1):
    return {'target': np.full((8, 2), 1.0, np.float32)}


def _quadratic_loss(params, frozen, batch, rng):
  loss = jnp.mean(jnp.square(params['w'][None] - batch['target']))
  return loss, {'loss': loss}


def _fit_quadratic(tmp_path, **kw):
  c = _config(num_steps=4, checkpoint_every=100, **kw)
  mesh = _single_device_mesh()
  rep = parallel.replicated(mesh)
  params = {'w': jnp.zeros((2,))}
  return loop.fit(c, str(tmp_path), loss_fn=_quadratic_loss, params=params,
                     param_sh={'w': rep}, frozen={}, frozen_sh={},
                     data=_Quadratic(), mesh=mesh,
                     sample_fn=lambda step, p: np.full((3, 4, 4, 3), step,
                                                       np.uint8))


class _StepTargets:
  """Batches whose target depends on the step: a resume that reads the
  wrong step's batch ends elsewhere."""

  def batch(self, step, process_index=0, process_count=1):
    return {'target': np.full((8, 2), float(step * step), np.float32)}


def test_fit_resume_reads_the_step_it_stopped_at(tmp_path):
  """The generic loop resumed from its checkpoint at step 2 takes the batch
  of step 2 next and ends bit-identical to an uninterrupted run."""
  mesh = _single_device_mesh()
  rep = parallel.replicated(mesh)

  def run(workdir, **kw):
    c = _config(num_steps=4, checkpoint_every=2, learning_rate=0.1,
                warmup_steps=0, **kw)
    return loop.fit(c, str(workdir), loss_fn=_quadratic_loss,
                       params={'w': jnp.zeros((2,))}, param_sh={'w': rep},
                       frozen={}, frozen_sh={}, data=_StepTargets(), mesh=mesh)
  full, full_hist = run(tmp_path / 'full')
  part, _ = run(tmp_path / 'resumed', stop_after=2)
  assert int(part.step) == 2
  resumed, hist = run(tmp_path / 'resumed')
  assert [h['step'] for h in hist] == [3, 4]
  assert [h['loss'] for h in hist] == [h['loss'] for h in full_hist][2:]
  np.testing.assert_array_equal(resumed.params['w'], full.params['w'])


def test_nan_fails_fast_naming_the_step(tmp_path):
  # A NaN learning rate is now refused by the config check; an absurd one
  # overflows the loss at step 2 instead.
  with pytest.raises(FloatingPointError, match='step 2'):
    _fit_quadratic(tmp_path, learning_rate=1e30, warmup_steps=0)


def test_sample_hook_writes_png_grids(tmp_path):
  from PIL import Image
  c_kw = dict(sample_every=2)
  _fit_quadratic(tmp_path, **c_kw)
  files = sorted(os.listdir(tmp_path / 'samples'))
  assert files == ['step_0000002.png', 'step_0000004.png']
  im = np.asarray(Image.open(tmp_path / 'samples' / files[0]))
  assert im.shape == (2 + 2 * (4 + 2), 2 + 2 * (4 + 2), 3)  # 3 4x4 in 2x2.


def test_grad_accumulation_matches_one_big_batch():
  mesh = _single_device_mesh()
  c = _config(learning_rate=0.1, warmup_steps=0)
  tx = loop.make_optimizer(c)
  params = {'w': jnp.zeros((2,))}
  state = loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(0))
  batch = {'target': jnp.arange(16.0).reshape(8, 2)}
  one, m1 = loop.train_step(state, batch, {}, loss_fn=_quadratic_loss,
                               tx=tx, grad_accum=1)
  four, m4 = loop.train_step(state, batch, {}, loss_fn=_quadratic_loss,
                                tx=tx, grad_accum=4)
  np.testing.assert_allclose(one.params['w'], four.params['w'], rtol=1e-6)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-6)
  # Adam's first step is scale-free: the gradient's scale shows only here.
  np.testing.assert_allclose(m1['grad_norm'], m4['grad_norm'], rtol=1e-6)
  del mesh


def test_from_scratch_rectified_flow_mode(tmp_path):
  c = _config(num_steps=2, checkpoint_every=100)
  c.teacher.preset = ''
  # The default weights give rf 0: without a teacher the loss would be
  # identically 0 and nothing would train.
  c.loss.weights = {'output_kd': 0.0, 'feature_kd': 0.0, 'rf': 1.0}
  c.loss.feature_pairs = ()
  cfg = teacher_lib.flux_config(c.student)
  prompts = data_lib.load_prompts('builtin')[:4]
  lat = np.random.default_rng(0).standard_normal(
      (4, 8, cfg.in_channels)).astype(np.float32)
  data = data_lib.PromptData(prompts, data_lib.random_embedder(cfg, 4), cfg,
                             (2, 4), 8, latents=lat)
  from nanoflux_jax import sampling  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.distill import losses  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.models import flux  # pylint: disable=g-import-not-at-top
  params = flux.init_params(cfg, jax.random.PRNGKey(3))
  state, hist = trainer.train(c, str(tmp_path), data=data,
                              # A copy: the step donates the state.
                              student=(cfg, jax.tree.map(jnp.copy, params)),
                              mesh=_single_device_mesh())
  assert int(state.step) == 2
  assert set(hist[-1]) >= {'rf', 'loss'} and 'output_kd' not in hist[-1]
  # Step 1's loss by hand: x_t = (1 - t) x0 + t noise at the t the step's
  # rng draws, target noise - x0, the mean of the squared error.
  batch = data.batch(0)
  b = len(batch['noise'])
  k_t, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(c.seed), 0))
  schedule = sampling.schedule_for(cfg, c.num_sampling_steps, 8)
  t = np.asarray(losses.sample_timesteps(
      k_t, b, schedule, c.timesteps.mode, c.timesteps.logit_mean,
      c.timesteps.logit_std, c.timesteps.schedule_prob)[0], np.float64)
  x0, noise = batch['latents'].astype(np.float64), batch['noise']
  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
  v = flux.Flux(cfg).apply(
      {'params': params}, img=x_t.astype(np.float32),
      img_ids=sampling.image_ids(b, 2, 4), txt=batch['txt'],
      txt_ids=sampling.text_ids(b, batch['txt'].shape[1]),
      timesteps=t.astype(np.float32), y=batch['y'],
      guidance=(np.full((b,), trainer.DEFAULT_GUIDANCE, np.float32)
                if cfg.guidance_embed else None)).velocity
  want = np.mean(np.square(np.asarray(v, np.float64) - (noise - x0)))
  np.testing.assert_allclose(hist[0]['rf'], want, rtol=1e-5)
  np.testing.assert_allclose(hist[0]['loss'], want, rtol=1e-5)


def test_prompt_sources_and_bad_files(tmp_path):
  txt = tmp_path / 'p.txt'
  txt.write_text('a cat\n\n  a dog  \n')
  assert data_lib.load_prompts(str(txt)) == ['a cat', 'a dog']
  jl = tmp_path / 'p.jsonl'
  jl.write_text('{"prompt": "x"}\n{"caption": "y"}\n')
  assert data_lib.load_prompts(str(jl)) == ['x', 'y']
  assert len(data_lib.load_prompts('builtin')) >= 8
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    data_lib.load_prompts(str(tmp_path / 'nope.txt'))
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n  \n')
  with pytest.raises(ValueError, match='empty.txt.*no prompts'):
    data_lib.load_prompts(str(empty))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "z"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: no 'prompt'"):
    data_lib.load_prompts(str(bad))
  c = _config()
  c.data.prompts = str(empty)
  with pytest.raises(ValueError, match='empty.txt'):
    trainer.train(c, str(tmp_path / 'wd'), mesh=_single_device_mesh())


def test_teacher_cache_is_built_once_and_reused(tmp_path):
  cfg = teacher_lib.flux_config(_config().teacher)
  from nanoflux_jax.models import flux
  params = flux.init_params(cfg, jax.random.PRNGKey(0))
  d = data_lib.PromptData(data_lib.load_prompts('builtin'),
                          data_lib.random_embedder(cfg, 4), cfg, (2, 4), 4)
  sched = (1.0, 0.5, 0.0)
  cache = data_lib.build_cache(str(tmp_path / 'c'), d, cfg, params, sched, 2)
  b = cache.batch(3, process_index=1, process_count=2)  # shard 1, rows 2:4.
  assert b['traj_x'].shape == (2, 2, 8, cfg.in_channels)
  np.testing.assert_array_equal(b['noise'], d.batch(1)['noise'][2:])
  np.testing.assert_allclose(b['traj_x'][:, 0], b['noise'])
  # Every cached point against the plain sampler: the state at t=0.5 is
  # sampling.denoise over (1, 0.5), the last velocity steps to the sample.
  from nanoflux_jax import sampling  # pylint: disable=g-import-not-at-top
  guidance = (np.full((2,), 3.5, np.float32) if cfg.guidance_embed else None)
  run = lambda ts: np.asarray(sampling.denoise(
      cfg, params, b['noise'], sampling.image_ids(2, 2, 4), b['txt'],
      sampling.text_ids(2, b['txt'].shape[1]), b['y'], jnp.asarray(ts),
      guidance))
  np.testing.assert_allclose(b['traj_x'][:, 1], run(sched[:2]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(b['traj_x'][:, 0] - 0.5 * b['traj_v'][:, 0],
                             run(sched[:2]), rtol=1e-5, atol=1e-5)
  final = run(sched)
  np.testing.assert_allclose(b['traj_x'][:, 1] - 0.5 * b['traj_v'][:, 1],
                             final, rtol=1e-5, atol=1e-5)
  assert not np.allclose(final, b['noise'], atol=0.1)
  mtime = os.path.getmtime(tmp_path / 'c' / 'shard-00000.npz')
  data_lib.build_cache(str(tmp_path / 'c'), d, cfg, params, sched, 2)
  assert os.path.getmtime(tmp_path / 'c' / 'shard-00000.npz') == mtime
  with pytest.raises(ValueError, match='other settings'):
    data_lib.build_cache(str(tmp_path / 'c'), d, cfg, params, (1.0, 0.0), 2)


def test_identity_feature_pairs():
  """'identity' maps block i to block i, and only for the teacher's depth."""
  from nanoflux_jax.configs import FluxConfig  # pylint: disable=g-import-not-at-top
  teacher = FluxConfig.tiny(depth=2, depth_single_blocks=2)
  pruned = teacher.replace(double_heads=(2, 2), single_mlp=(32, 32))
  assert trainer.feature_pairs('identity', pruned, teacher) == (
      (0, 0), (1, 1), (2, 2), (3, 3))
  assert trainer.feature_pairs([[0, 1], [2, 3]], pruned, teacher) == (
      (0, 1), (2, 3))
  shallow = FluxConfig.tiny(depth=1, depth_single_blocks=2)
  with pytest.raises(ValueError, match="'identity' needs a teacher"):
    trainer.feature_pairs('identity', shallow, teacher)
  with pytest.raises(ValueError, match="'identity' needs a teacher"):
    trainer.feature_pairs('identity', teacher, None)


def test_bf16_distillation_step_matches_fp32(tmp_path):
  """compute_dtype='bfloat16' (the default): the first step's losses and
  gradient norm are the fp32 ones within bf16 rounding, the params and Adam
  moments stay fp32 (master weights), and bf16 really ran."""
  got = {}
  for dtype in ('float32', 'bfloat16'):
    c = _config(num_steps=1, compute_dtype=dtype, checkpoint_every=100)
    state, hist = trainer.train(c, str(tmp_path / dtype),
                                mesh=_single_device_mesh())
    for x in jax.tree.leaves((state.params, state.opt_state)):
      if jnp.issubdtype(x.dtype, jnp.floating):
        assert x.dtype == jnp.float32, x.dtype
    got[dtype] = hist[0]
  a, b = got['float32'], got['bfloat16']
  rel = {k: abs(b[k] - a[k]) / abs(a[k])
         for k in ('loss', 'output_kd', 'feature_kd', 'grad_norm')}
  print('bf16 vs fp32 first-step relative differences:',
        {k: f'{v:.2e}' for k, v in rel.items()})
  # Measured: loss 3.3e-4, output KD 7.8e-5, feature KD 9.5e-4, grad norm
  # 4.5e-4.
  assert max(rel.values()) <= 1e-2, rel
  assert rel['loss'] > 0, rel  # Not the fp32 program again.
