"""Schedules, packing and the Euler loop against diffusers' scheduler/model."""
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig

from flux_utils import make_diffusers_flux, random_inputs, run_diffusers
from refs import max_rel_err, require


def _diffusers_sigmas(num_steps, seq_len, dynamic):
  diffusers = require('diffusers')
  sched = diffusers.FlowMatchEulerDiscreteScheduler(
      num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=dynamic,
      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
      max_image_seq_len=4096)
  sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
  mu = sampling.shift_mu(seq_len) if dynamic else None
  sched.set_timesteps(sigmas=sigmas, mu=mu)
  return sched.sigmas.numpy()


SCHNELL_LIKE = FluxConfig.tiny()                     # no guidance embedder
DEV_LIKE = FluxConfig.tiny(guidance_embed=True)      # guidance-distilled


@pytest.mark.parametrize('steps,seq_len', [(4, 1024), (28, 4096), (1, 256)])
def test_schnell_schedule_is_linspace(steps, seq_len):
  got = sampling.schedule_for(SCHNELL_LIKE, steps, seq_len)
  np.testing.assert_allclose(got, np.linspace(1, 0, steps + 1), atol=1e-12)
  np.testing.assert_allclose(got, _diffusers_sigmas(steps, seq_len, False),
                             atol=1e-6)


@pytest.mark.parametrize('steps,seq_len', [(4, 1024), (28, 4096), (50, 300)])
def test_dev_schedule_matches_bfl_formula_and_diffusers(steps, seq_len):
  got = np.asarray(sampling.schedule_for(DEV_LIKE, steps, seq_len))
  # BFL: mu = lin(256 -> 0.5, 4096 -> 1.15); t' = e^mu / (e^mu + 1/t - 1).
  mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
  t = np.linspace(1, 0, steps + 1)[:-1]
  want = np.exp(mu) / (np.exp(mu) + (1 / t - 1))
  np.testing.assert_allclose(got[:-1], want, rtol=1e-12)
  assert got[-1] == 0.0
  np.testing.assert_allclose(got, _diffusers_sigmas(steps, seq_len, True),
                             atol=1e-6)


def test_schedule_rule_on_hand_computed_numbers():
  """Shift iff guidance_embed, on numbers worked out by hand: at 256 tokens
  mu = 0.5 and at 4096 mu = 1.15; e^mu / (e^mu + 1/t - 1) is
  sigmoid(mu - log(1/t - 1)), so t = 3/4, 1/2, 1/4 go to sigmoid(mu + ln 3),
  sigmoid(mu), sigmoid(mu - ln 3)."""
  assert sampling.schedule_for(SCHNELL_LIKE, 4, 256) == [1.0, .75, .5, .25, 0.]
  assert sampling.schedule_for(SCHNELL_LIKE, 2, 4096) == [1.0, 0.5, 0.0]
  np.testing.assert_allclose(
      sampling.schedule_for(DEV_LIKE, 4, 256),
      [1.0, 0.8318243439635804, 0.6224593312018546, 0.3546612443924434, 0.0],
      rtol=1e-12, atol=0)
  np.testing.assert_allclose(sampling.schedule_for(DEV_LIKE, 2, 4096),
                             [1.0, 0.7595109169491110, 0.0], rtol=1e-12)
  # Only guidance_embed picks the rule: FLUX.1-dev's and schnell's sizes
  # give the tiny configs' schedules.
  assert (sampling.schedule_for(FluxConfig.schnell(), 4, 1024) ==
          sampling.schedule_for(SCHNELL_LIKE, 4, 1024))
  assert (sampling.schedule_for(FluxConfig.dev(), 4, 1024) ==
          sampling.schedule_for(DEV_LIKE, 4, 1024))
  with pytest.raises(ValueError, match='num_steps=0'):
    sampling.schedule_for(SCHNELL_LIKE, 0, 256)


def test_static_model_samples_its_tables_timesteps():
  """`to_static_modulation` bakes guidance in (guidance_embed=False), so a
  dev-derived static student must keep its shifted table's timesteps, not
  fall back to schnell's linspace; fewer steps take every k-th row."""
  dev8 = sampling.schedule_for(DEV_LIKE, 8, 1024)
  static = DEV_LIKE.replace(modulation='static', guidance_embed=False,
                            static_timesteps=tuple(dev8[:-1]))
  assert sampling.schedule_for(static, 8, 1024) == dev8
  np.testing.assert_allclose(sampling.schedule_for(static, 4, 1024),
                             sampling.schedule_for(DEV_LIKE, 4, 1024),
                             rtol=1e-12)
  np.testing.assert_allclose(sampling.schedule_for(static, 1, 1024), [1, 0])
  # A count that does not divide the table: the rule (nearest rows).
  assert (sampling.schedule_for(static, 3, 1024) ==
          sampling.schedule_for(SCHNELL_LIKE, 3, 1024))


def test_pack_matches_diffusers_and_roundtrips():
  diffusers = require('diffusers')
  torch = require('torch')
  x = np.random.default_rng(0).standard_normal((2, 16, 6, 10)).astype(np.float32)
  packed = sampling.pack(jnp.asarray(x))
  ref = diffusers.FluxPipeline._pack_latents(torch.from_numpy(x), 2, 16, 6, 10)
  np.testing.assert_array_equal(np.asarray(packed), ref.numpy())
  np.testing.assert_array_equal(np.asarray(sampling.unpack(packed, 6, 10)), x)
  ids = sampling.image_ids(2, 3, 5)
  ref_ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 3, 5, 'cpu',
                                                             torch.float32)
  np.testing.assert_array_equal(np.asarray(ids[1]), ref_ids.numpy())
  with pytest.raises(ValueError, match='even'):
    sampling.pack(jnp.zeros((1, 16, 5, 4)))


@pytest.mark.parametrize('guidance', [False, True])
def test_denoise_matches_diffusers_loop(tmp_path, guidance):
  torch = require('torch')
  from nanoflux_jax.convert import flux as convert_flux
  ref = make_diffusers_flux(guidance=guidance, seed=1)
  ref.save_pretrained(tmp_path / 't')
  cfg, params = convert_flux.load_flux_transformer(str(tmp_path / 't'))
  inputs = random_inputs(cfg, 2, 4, 6, txt_len=5, seed=1)
  ts = sampling.schedule_for(cfg, 4, 24)
  ours = sampling.denoise(cfg, params, inputs['img'], inputs['img_ids'],
                          inputs['txt'], inputs['txt_ids'], inputs['y'],
                          jnp.asarray(ts), inputs.get('guidance'))
  x = inputs['img']
  for t, t_next in zip(ts[:-1], ts[1:]):  # diffusers' scheduler step.
    v = run_diffusers(ref, {**inputs, 'img': x,
                            'timesteps': np.full((2,), t, np.float32)})
    x = (torch.from_numpy(x) + (t_next - t) * torch.from_numpy(v)).numpy()
  assert max_rel_err(ours, x) < 1e-4


def test_trajectory_records_the_sampler_it_runs():
  """The one rollout: its states and velocities are the Euler steps, its
  final sample is `denoise`'s, and record=False keeps only that."""
  import jax  # pylint: disable=g-import-not-at-top
  from nanoflux_jax.models import flux  # pylint: disable=g-import-not-at-top
  cfg = flux.FluxConfig.tiny(attention_impl='xla')
  params = flux.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((2, 8, cfg.in_channels)).astype(np.float32)
  txt = rng.standard_normal((2, 3, cfg.context_in_dim)).astype(np.float32)
  y = rng.standard_normal((2, cfg.vec_in_dim)).astype(np.float32)
  ts = jnp.asarray([1.0, 0.6, 0.0])
  xs, vs, final = sampling.trajectory(cfg, params, noise, txt, y, ts,
                                      img_grid=(2, 4))
  assert xs.shape == vs.shape == (2, 2, 8, cfg.in_channels)
  np.testing.assert_array_equal(xs[:, 0], noise)
  np.testing.assert_allclose(xs[:, 1], noise - 0.4 * vs[:, 0], rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(final, xs[:, 1] - 0.6 * vs[:, 1], rtol=1e-6,
                             atol=1e-6)
  v0 = flux.Flux(cfg).apply(
      {'params': params}, img=noise, img_ids=sampling.image_ids(2, 2, 4),
      txt=txt, txt_ids=sampling.text_ids(2, 3), timesteps=jnp.ones((2,)),
      y=y).velocity
  np.testing.assert_allclose(vs[:, 0], v0, rtol=1e-5, atol=1e-6)
  none = sampling.trajectory(cfg, params, noise, txt, y, ts, img_grid=(2, 4),
                             record=False)
  assert none[0] is None and none[1] is None
  np.testing.assert_array_equal(none[2], final)
  np.testing.assert_array_equal(final, sampling.denoise(
      cfg, params, noise, sampling.image_ids(2, 2, 4), txt,
      sampling.text_ids(2, 3), y, ts))
  with pytest.raises(ValueError, match='img_grid or img_ids'):
    sampling.trajectory(cfg, params, noise, txt, y, ts)
