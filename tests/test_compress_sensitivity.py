"""Sensitivity criteria, calibration data and mask selection."""
import jax
import numpy as np
import pytest

from nanoflux_jax import compress
from nanoflux_jax.models import flux

from test_compress import _cfg, _params

USELESS_HEAD = (0, 1)   # (double block, head) whose proj rows are zeroed.
IDENTITY_BLOCK = 1      # single block whose gates are zeroed.


@pytest.fixture(scope='module')
def planted():
  cfg = _cfg()
  params = _params(cfg)
  b, h = USELESS_HEAD
  for s in ('img', 'txt'):
    proj = params[f'double_blocks_{b}'][f'{s}_attn']['proj']
    proj['kernel'] = proj['kernel'].at[h].set(0)
  lin = params[f'single_blocks_{IDENTITY_BLOCK}']['modulation']['lin']
  lin['kernel'] = lin['kernel'].at[:, 2].set(0)
  lin['bias'] = lin['bias'].at[2].set(0)
  calib = compress.calibration_set(cfg, params, jax.random.key(0), n=2,
                                   num_steps=2, img_grid=(4, 4), txt_len=5)
  return cfg, params, calib


def test_calibration_set_shapes(planted):
  cfg, params, calib = planted
  assert calib['img'].shape == (4, 16, cfg.in_channels)
  assert calib['target'].shape == (4, 16, cfg.in_channels)
  np.testing.assert_allclose(calib['timesteps'], [1, 1, .5, .5])
  # Step 0 is the noise itself: x_1 - target = x_0 of the trajectory.
  assert not np.allclose(calib['img'][:2], calib['img'][2:])
  # Against a hand-written Euler loop of the teacher (t: 1 -> 0.5 -> 0): the
  # second rows are the state at t=0.5, the target is noise - x_0.
  model = flux.Flux(cfg)
  noise = np.asarray(calib['img'][:2])
  x = noise.astype(np.float64)
  states = []
  for t, t_next in ((1.0, 0.5), (0.5, 0.0)):
    states.append(x)
    v = model.apply({'params': params}, img=x.astype(np.float32),
                    img_ids=calib['img_ids'][:2], txt=calib['txt'][:2],
                    txt_ids=calib['txt_ids'][:2],
                    timesteps=np.full((2,), t, np.float32),
                    y=calib['y'][:2] if 'y' in calib else None).velocity
    x = x + (t_next - t) * np.asarray(v, np.float64)
  np.testing.assert_allclose(calib['img'][2:], states[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(calib['target'][:2], noise - x, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(calib['target'][2:], noise - x, rtol=1e-5,
                             atol=1e-5)
  assert np.abs(x).max() > 0.1 and not np.allclose(x, noise, atol=0.1)


def _heads(scores):
  return np.concatenate([np.asarray(v) for v in
                         scores.double_heads + scores.single_heads])


def test_loss_finds_useless_head(planted):
  cfg, params, calib = planted
  scores = compress.sensitivity(cfg, params, calib, 'loss', mlp_groups=4)
  heads = _heads(scores)
  b, h = USELESS_HEAD
  assert np.argmin(heads) == b * cfg.num_heads + h
  # Every other head of a live block matters (the identity block's heads
  # score 0 too: nothing they do reaches the output).
  live = np.concatenate([np.asarray(v) for v in scores.double_heads])
  assert live[b * cfg.num_heads + h] < 1e-10 < np.sort(live)[1]
  # Zero up to fp32 rounding (how XLA fuses the block decides the last bit).
  np.testing.assert_array_less(np.abs(scores.single_heads[IDENTITY_BLOCK]),
                               1e-10)
  # The identity block costs nothing either; every other block does.
  blocks = np.concatenate([scores.double_blocks, scores.single_blocks])
  assert np.argmin(blocks) == cfg.depth + IDENTITY_BLOCK
  # MLP groups: 4 distinct scores per MLP, shared by each group's channels.
  assert len(np.unique(np.asarray(scores.single_mlp[0]))) == 4


def test_taylor_scores(planted):
  cfg, params, calib = planted
  scores = compress.sensitivity(cfg, params, calib, 'taylor')
  assert jax.tree.structure(scores) == jax.tree.structure(
      compress.PruneMask.ones(cfg))
  heads = _heads(scores)
  assert np.all(np.isfinite(heads)) and np.all(heads >= 0)
  b, h = USELESS_HEAD
  assert np.argmin(heads) == b * cfg.num_heads + h


def test_block_io_finds_identity_block(planted):
  cfg, params, calib = planted
  scores = compress.sensitivity(cfg, params, calib, 'block_io')
  blocks = np.concatenate([scores.double_blocks, scores.single_blocks])
  assert np.argmin(blocks) == cfg.depth + IDENTITY_BLOCK
  assert blocks.min() < 1e-6
  with pytest.raises(ValueError, match='NaN'):
    compress.select(cfg, scores, keep_heads=0.5)
  mask = compress.select(cfg, scores, keep_blocks=3)
  assert mask.single_blocks[IDENTITY_BLOCK] == 0 and (
      mask.double_blocks.sum() + mask.single_blocks.sum()) == 3


def test_select_ratios_and_target():
  cfg = _cfg()
  rng = np.random.default_rng(0)
  scores = jax.tree.map(lambda x: rng.random(x.shape),
                        compress.PruneMask.ones(cfg))
  # One block's heads all score lowest: global ranking must still keep one.
  scores = scores.replace(double_heads=(np.full(4, -1.0),) +
                          scores.double_heads[1:])
  mask = compress.select(cfg, scores, keep_heads=0.5, keep_mlp=0.25)
  assert mask.double_heads[0].sum() == 1
  assert sum(v.sum() for v in mask.double_heads + mask.single_heads) == 9
  per_block = compress.select(cfg, scores, keep_heads=0.5, scope='block')
  assert all(v.sum() == 2 for v in per_block.double_heads)
  full = compress.count_params(cfg)
  target = int(0.7 * full)
  mask = compress.select(cfg, scores, target_params=target)
  small_cfg, _ = compress.prune(cfg, _params(cfg), mask)
  assert compress.count_params(small_cfg) <= target
  assert compress.count_params(small_cfg) > 0.6 * full
  with pytest.raises(ValueError, match='keep_mlp=1.5'):
    compress.select(cfg, scores, keep_mlp=1.5)
  with pytest.raises(ValueError, match='unreachable'):
    compress.select(cfg, scores, target_params=1000)
  with pytest.raises(ValueError, match="'nope'"):
    compress.sensitivity(cfg, {}, {}, 'nope')


def test_select_keeps_the_units_a_hand_ranking_keeps():
  """Which units survive, not only how many: hand-set scores, hand-ranked."""
  cfg = _cfg()  # 2 double + 2 single blocks, 4 heads each.
  scores = compress.PruneMask.ones(cfg).replace(
      double_heads=(np.array([.3, .9, .1, .5]), np.array([.8, .2, .7, .4])),
      single_heads=(np.array([.05, .6, .95, .15]),
                    np.array([.02, .03, .01, .04])),
      double_blocks=np.array([.2, .9]), single_blocks=np.array([.5, .1]))
  kept = lambda m: [np.nonzero(v)[0].tolist()
                    for v in m.double_heads + m.single_heads]
  # Per block: the top 2 of each block's 4 heads.
  assert kept(compress.select(cfg, scores, keep_heads=0.5, scope='block')) == [
      [1, 3], [0, 2], [1, 2], [1, 3]]
  # Globally: the top 8 of 16 are .95 .9 .8 .7 .6 .5 .4 .3; the last single
  # block has none of them and keeps its best head (index 3).
  assert kept(compress.select(cfg, scores, keep_heads=0.5)) == [
      [0, 1, 3], [0, 2, 3], [1, 2], [3]]
  # Blocks ranked over double and single together: .9 and .5 survive.
  blocks = compress.select(cfg, scores, keep_blocks=2)
  assert blocks.double_blocks.tolist() == [0, 1]
  assert blocks.single_blocks.tolist() == [1, 0]
