"""Distillation losses and timestep sampling, against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflux_jax.distill import losses


def test_mse_and_masked_mse():
  a = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])   # [1, 2, 2]
  b = jnp.array([[[0.0, 0.0], [3.0, 2.0]]])
  # Squared diffs 1, 4, 0, 4 -> mean 9/4.
  assert float(losses.mse(a, b)) == pytest.approx(2.25)
  # Mask out the second token: (1 + 4) / 2 elements.
  mask = jnp.array([[1, 0]])
  assert float(losses.mse(a, b, mask)) == pytest.approx(2.5)
  assert float(losses.output_kd(a, b)) == pytest.approx(2.25)
  # Two examples: the mean runs over the batch (data) axis too; a sum over
  # it (or over data shards) would double this.
  a2, b2 = jnp.concatenate([a, a + 1.0]), jnp.concatenate([b, b])
  # Second example's squared diffs 4, 9, 1, 9: (9 + 23) / 8 elements.
  assert float(losses.mse(a2, b2)) == pytest.approx(4.0)
  assert float(losses.mse(a2, b2, jnp.array([[1, 0], [1, 0]]))) == (
      pytest.approx((5 + 13) / 4))


def test_normalized_feature_loss():
  t = jnp.array([[[3.0, 4.0]], [[1.0, 0.0]]])   # ||t||^2 = 25 and 1.
  s = jnp.array([[[3.0, 0.0]], [[0.0, 0.0]]])   # ||s-t||^2 = 16 and 1.
  want = (16 / 25 + 1 / 1) / 2
  assert float(losses.normalized_feature_loss(s, t)) == pytest.approx(
      want, rel=1e-5)


def test_feature_kd_pairs_and_projection():
  s_feats = [jnp.ones((1, 1, 2)), 2 * jnp.ones((1, 1, 2))]
  t_feats = [jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2)), 4 * jnp.ones((1, 1, 2))]
  # Pair (0, 0): exact, 0. Pair (1, 2): ||2 - 4||^2 / ||4||^2 = 8 / 32.
  got = losses.feature_kd(s_feats, t_feats, [(0, 0), (1, 2)])
  assert float(got) == pytest.approx((0 + 0.25) / 2)
  # A projection doubling the features: pair (1, 2) becomes exact, pair
  # (0, 0) gives ||2 - 1||^2 / ||1||^2 = 1.
  got = losses.feature_kd(s_feats, t_feats, [(0, 0), (1, 2)],
                          project=lambda fs: [2 * f for f in fs])
  assert float(got) == pytest.approx(0.5)
  assert float(losses.feature_kd(s_feats, t_feats, [])) == 0.0
  with pytest.raises(ValueError, match=r'pair \(5, 0\)'):
    losses.feature_kd(s_feats, t_feats, [(5, 0)])


def test_feature_projection_only_where_widths_differ():
  pairs = ((0, 1), (1, 3))
  same = losses.FeatureProjection(pairs, 8, 8)
  assert same.init(jax.random.PRNGKey(0), [jnp.ones((1, 2, 8))] * 2) == {}
  proj = losses.FeatureProjection(pairs, 4, 8)
  v = proj.init(jax.random.PRNGKey(0), [jnp.ones((1, 2, 4))] * 2)
  assert set(v['params']) == {'proj_0_1', 'proj_1_3'}
  out = proj.apply(v, [jnp.ones((1, 2, 4))] * 2)
  assert [o.shape for o in out] == [(1, 2, 8)] * 2


def test_rectified_flow_hand_computed():
  x0 = jnp.array([[[1.0, -1.0]]])
  noise = jnp.array([[[3.0, 1.0]]])
  t = jnp.array([0.25])
  # x_t = 0.75 * x0 + 0.25 * noise.
  np.testing.assert_allclose(losses.interpolate(x0, noise, t),
                             [[[1.5, -0.5]]])
  np.testing.assert_allclose(losses.rf_target(x0, noise), [[[2.0, 2.0]]])
  # Predict (2, 0): squared error (0, 4) -> mean 2.
  assert float(losses.rectified_flow(jnp.array([[[2.0, 0.0]]]), x0,
                                     noise)) == pytest.approx(2.0)
  # Following the target velocity from x_t reaches x0 at t = 0.
  x_t = losses.interpolate(x0, noise, t)
  np.testing.assert_allclose(x_t - 0.25 * losses.rf_target(x0, noise), x0)


def test_weighted_total():
  terms = {'output_kd': jnp.array(2.0), 'feature_kd': jnp.array(3.0),
           'rf': jnp.array(5.0)}
  got = losses.weighted_total(terms, {'output_kd': 1.0, 'feature_kd': 0.5})
  assert float(got) == pytest.approx(3.5)


def test_sample_timesteps_modes():
  schedule = (1.0, 0.75, 0.5, 0.25, 0.0)
  rng = jax.random.PRNGKey(0)
  t, idx, on = losses.sample_timesteps(rng, 256, schedule, 'schedule')
  assert set(np.unique(np.asarray(t)).tolist()) == {1.0, 0.75, 0.5, 0.25}
  np.testing.assert_array_equal(np.asarray(schedule)[np.asarray(idx)], t)
  assert bool(on.all())
  t, idx, on = losses.sample_timesteps(rng, 4096, schedule, 'logit_normal',
                                       logit_mean=0.0, logit_std=1.0)
  t = np.asarray(t)
  assert not bool(on.any()) and ((t > 0) & (t < 1)).all()
  assert abs(np.median(t) - 0.5) < 0.03  # sigmoid(N(0, 1)) has median 0.5.
  # idx is the nearest schedule point.
  pts = np.asarray(schedule[:-1])
  np.testing.assert_array_equal(
      idx, np.abs(t[:, None] - pts[None]).argmin(-1))
  t, _, on = losses.sample_timesteps(rng, 4096, schedule, 'mixed',
                                     schedule_prob=0.25)
  assert abs(float(on.mean()) - 0.25) < 0.03
  np.testing.assert_array_equal(
      np.isin(np.asarray(t)[np.asarray(on)], pts), True)
  with pytest.raises(ValueError, match='bogus'):
    losses.sample_timesteps(rng, 2, schedule, 'bogus')
