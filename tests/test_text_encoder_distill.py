"""Text-encoder distillation: block-wise init, gradients, learning, binary."""
import os
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax import checkpoint
from nanoflux_jax import parallel
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig, T5Config
from nanoflux_jax.compress import student_t5 as te_student
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.distill import t5_distill as te
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models.t5 import T5Encoder

jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'nanoflux_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 8          # text tokens
GRID = (2, 4)  # packed image-token grid


def _teacher(num_layers=2, seed=1):
  cfg = T5Config.tiny(num_layers=num_layers)
  params = jax.jit(lambda r: nn.meta.unbox(T5Encoder(cfg).init(
      r, jnp.zeros((1, T), jnp.int32))['params']))(jax.random.PRNGKey(seed))
  return cfg, params


@pytest.fixture(scope='module')
def models():
  """(teacher T5 (cfg, params), tiny FLUX (cfg, params))."""
  t5 = _teacher()
  # One single block instead of two: less to compile; the vis term reads
  # the two double blocks.
  f_cfg = FluxConfig.tiny(context_in_dim=t5[0].d_model, depth_single_blocks=1,
                          attention_impl='xla')
  return t5, (f_cfg, flux_lib.init_params(f_cfg, jax.random.PRNGKey(2)))


def _ids(n=4, seed=0):
  return data_lib.random_tokens(n, T, T5Config.tiny().vocab_size, seed)


def _encode(cfg, params, ids):
  return T5Encoder(cfg).apply({'params': params}, ids)


# ---------------------------------------------------------------------------
# Student config and block-wise init.
# ---------------------------------------------------------------------------
def test_student_config_derives_narrow_sizes():
  xxl = T5Config.xxl()
  s = te_student.student_t5_config(xxl, num_layers=6, d_model=1024)
  assert (s.num_layers, s.d_model, s.d_kv, s.num_heads, s.d_ff) == (
      6, 1024, 64, 16, 2560)
  assert te_student.student_t5_config(xxl) == xxl
  with pytest.raises(ValueError, match='multiple of d_kv'):
    te_student.student_t5_config(xxl, d_model=1000)
  with pytest.raises(ValueError, match='num_layers'):
    te_student.student_t5_config(xxl, num_layers=0)


def test_default_layer_map_is_evenly_spaced():
  assert te_student.default_layer_map(24, 6) == (0, 5, 9, 14, 18, 23)
  assert te_student.default_layer_map(4, 4) == (0, 1, 2, 3)
  assert te_student.default_layer_map(4, 1) == (0,)


def test_full_student_reproduces_teacher():
  t_cfg, t_params = _teacher(num_layers=3)
  s_cfg = te_student.student_t5_config(t_cfg)
  params = te_student.init_from_teacher(t_cfg, t_params, s_cfg)
  ids, _ = _ids()
  want = _encode(t_cfg, t_params, ids)
  got = te.StudentTextEncoder(s_cfg, t_cfg.d_model).apply({'params': params},
                                                          ids)
  assert got.shape == (4, T, t_cfg.d_model)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Fresh buffers: the donated train state must not alias the teacher.
  a = params['t5']['layers_0']['ffn']['wo']['kernel']
  b = t_params['layers_0']['ffn']['wo']['kernel']
  assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()


def test_init_copies_the_mapped_layers():
  t_cfg, t_params = _teacher(num_layers=4)
  s_cfg = te_student.student_t5_config(t_cfg, num_layers=2)
  for layer_map, want in ((None, (0, 3)), ((2, 1), (2, 1))):
    params = te_student.init_from_teacher(t_cfg, t_params, s_cfg, layer_map)
    assert sorted(params['t5']) == ['final_norm', 'layers_0', 'layers_1',
                                    'relative_attention_bias', 'token_embed']
    for i, j in enumerate(want):
      jax.tree.map(np.testing.assert_array_equal, params['t5'][f'layers_{i}'],
                   t_params[f'layers_{j}'])
    for k in ('token_embed', 'relative_attention_bias', 'final_norm'):
      jax.tree.map(np.testing.assert_array_equal, params['t5'][k], t_params[k])
  # Teacher layers 0 and 3 only: equal to the teacher with layers 1, 2 cut.
  params = te_student.init_from_teacher(t_cfg, t_params, s_cfg)
  cut = dict(t_params)
  cut['layers_1'] = cut.pop('layers_3')
  del cut['layers_2']
  ids, _ = _ids()
  np.testing.assert_allclose(
      te.StudentTextEncoder(s_cfg, t_cfg.d_model).apply({'params': params},
                                                        ids),
      _encode(s_cfg, cut, ids), rtol=1e-6, atol=1e-6)


def test_init_rejects_bad_input():
  t_cfg, t_params = _teacher(num_layers=2)
  narrow = te_student.student_t5_config(t_cfg, num_layers=1, d_model=16)
  with pytest.raises(ValueError, match=r"different width.*'d_model': \(32, 16"):
    te_student.init_from_teacher(t_cfg, t_params, narrow)
  s_cfg = te_student.student_t5_config(t_cfg, num_layers=2)
  with pytest.raises(ValueError, match=r'indices \[2\] outside .*\[0, 1\]'):
    te_student.init_from_teacher(t_cfg, t_params, s_cfg, layer_map=(0, 2))
  with pytest.raises(ValueError, match=r'indices \[-1\]'):
    te_student.init_from_teacher(t_cfg, t_params, s_cfg, layer_map=(-1, 0))
  with pytest.raises(ValueError, match='has 1 entries but the student has 2'):
    te_student.init_from_teacher(t_cfg, t_params, s_cfg, layer_map=(0,))
  broken = {k: v for k, v in t_params.items() if k != 'final_norm'}
  with pytest.raises(KeyError, match='final_norm'):
    te_student.init_from_teacher(t_cfg, broken, s_cfg)


def test_spec_rejects_bad_blocks_and_widths(models):
  (t_cfg, _), (f_cfg, _) = models
  kw = dict(student=t_cfg, teacher=t_cfg, out_dim=t_cfg.d_model,
            denoiser=f_cfg, schedule=(1.0, 0.5, 0.0), grid=GRID)
  with pytest.raises(ValueError, match=r'vis_blocks \(0, 4\) has \[4\]'):
    te.TextDistillSpec(vis_blocks=(0, 4), **kw)
  with pytest.raises(ValueError, match='reads 24-wide text'):
    te.TextDistillSpec(**dict(kw, denoiser=f_cfg.replace(context_in_dim=24)))


# ---------------------------------------------------------------------------
# The loss: gradients reach only the student.
# ---------------------------------------------------------------------------
def test_gradient_reaches_only_the_student(models):
  (t_cfg, t_params), (f_cfg, f_params) = models
  s_cfg = te_student.student_t5_config(t_cfg, num_layers=1, d_model=16)
  params = te_student.init_student(s_cfg, t_cfg.d_model, jax.random.PRNGKey(3))
  ids, mask = _ids()
  # A cached trajectory (random states) skips compiling the teacher sampler;
  # the training test below runs the uncached path.
  batch = {'ids': ids, 'mask': mask,
           'y': data_lib.random_pooled(4, f_cfg.vec_in_dim),
           'noise': np.zeros((4, 8, f_cfg.in_channels), np.float32),
           'traj_x': np.random.default_rng(0).standard_normal(
               (4, 2, 8, f_cfg.in_channels)).astype(np.float32)}
  frozen = {'t5': t_params, 'flux': f_params}
  before = jax.tree.map(np.array, frozen)
  spec = te.TextDistillSpec(
      student=s_cfg, teacher=t_cfg, out_dim=t_cfg.d_model, denoiser=f_cfg,
      schedule=tuple(sampling.schedule_for(f_cfg, 2, 8)), grid=GRID,
      vis_blocks=(0, 1), lambda_emb=0.0, lambda_vis=1.0)  # vis term only.
  rng = jax.random.PRNGKey(0)

  @jax.jit
  def grads(params, frozen):
    f = lambda p, fz: te.text_distill_loss(p, fz, batch, rng, spec=spec)
    (loss, metrics), (g_student, g_frozen) = jax.value_and_grad(
        f, argnums=(0, 1), has_aux=True)(params, frozen)
    return loss, metrics, g_student, g_frozen

  loss, metrics, g_student, g_frozen = grads(params, frozen)
  assert float(metrics['vis']) > 0 and float(loss) == float(metrics['vis'])
  # The vis term alone moves every part of the student ...
  norms = {k: float(jnp.sqrt(sum(jnp.sum(jnp.square(x))
                                 for x in jax.tree.leaves(v))))
           for k, v in (('proj', g_student['proj']),
                        ('layers_0', g_student['t5']['layers_0']),
                        ('token_embed', g_student['t5']['token_embed']))}
  assert all(v > 0 for v in norms.values()), norms
  # ... and nothing flows into the teacher T5 or the denoiser.
  assert all(not np.any(x) for x in jax.tree.leaves(g_frozen))
  jax.tree.map(np.testing.assert_array_equal, frozen, before)


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------
def _config(**kw):
  c = te.default_config()
  c.compute_dtype = 'float32'
  c.num_steps = 60
  c.batch_size = 8
  c.learning_rate = 3e-3
  c.warmup_steps = 5
  c.num_sampling_steps = 2
  c.log_every = 1
  c.checkpoint_every = 1000
  c.async_checkpoint = False
  c.student.num_layers = 1
  c.loss.vis_blocks = (0, 1)
  c.data.txt_len = T
  c.data.grid = GRID
  c.data.num_prompts = 32
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_distillation_reduces_both_terms(tmp_path, models):
  (t_cfg, t_params), (f_cfg, f_params) = models
  frozen_before = jax.tree.map(np.array, (t_params, f_params))
  mesh = parallel.create_mesh((1, 1, 1), jax.devices()[:1])
  # Student: teacher layer 0 of 2 (block-wise init; exercises the donated
  # state not aliasing the teacher's buffers).
  state, hist = te.train_text_encoder(
      _config(), str(tmp_path), teacher_t5=(t_cfg, t_params),
      denoiser=(f_cfg, f_params), mesh=mesh)
  assert int(state.step) == 60 and len(hist) == 60
  assert {'emb', 'vis', 'loss', 'grad_norm'} <= set(hist[0])
  first = {k: np.mean([h[k] for h in hist[:5]]) for k in ('emb', 'vis')}
  last = {k: np.mean([h[k] for h in hist[-5:]]) for k in ('emb', 'vis')}
  assert last['emb'] < 0.7 * first['emb'], (first, last)
  assert last['vis'] < 0.7 * first['vis'], (first, last)
  # The frozen teacher T5 and denoiser are untouched (bit-identical).
  jax.tree.map(np.testing.assert_array_equal, (t_params, f_params),
               frozen_before)
  # The student checkpoint round-trips.
  cfg, out_dim, params = te_student.load_student(str(tmp_path / te.STUDENT_DIR))
  assert (cfg.num_layers, cfg.d_model, out_dim) == (1, 32, 32)
  jax.tree.map(np.testing.assert_array_equal, params, state.params)


def test_binary_writes_student_checkpoint(tmp_path):
  """The ablation variant: lambda_vis=0, so loss == emb; vis still logged."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '',
         'JAX_COMPILATION_CACHE_DIR': os.path.join(
             tempfile.gettempdir(), 'nanoflux_jax_test_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments',
                                    'distill_text_encoder.py'),
       '--config=' + os.path.join(
           ROOT, 'experiments/configs/distill_text_encoder_tiny.py') +
       ':runlocal,ablation',
       f'--workdir={tmp_path}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  logged = [dict(kv.split('=') for kv in line.split(' | ')[1].split())
            for line in out.stderr.splitlines() if '] step ' in line]
  assert len(logged) == 4, out.stderr[-3000:]
  assert all(m['loss'] == m['emb'] and float(m['vis']) > 0 for m in logged)
  path = str(tmp_path / te.STUDENT_DIR)
  assert checkpoint.is_checkpoint(path)
  cfg, out_dim, params = te_student.load_student(path)
  assert (cfg.num_layers, cfg.d_model, out_dim) == (1, 16, 32)
  assert params['proj']['kernel'].shape == (16, 32)
