"""The 16x16-token shapes world ('shapes9'), its geometric judge, the
teacher16 / full16 configs, the DistillT5 velocity loss and progressive
token down-sampling."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from nanoflux_jax import sampling
from nanoflux_jax.compress import student_t5 as te_student
from nanoflux_jax.compress import token_downsample
from nanoflux_jax.configs import FluxConfig, T5Config
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.distill import data as data_lib
from nanoflux_jax.ladder import runner as ladder
from nanoflux_jax.distill import losses
from nanoflux_jax.ladder import rungs
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.shapes import t5_pretrain as shapes_encoders
from nanoflux_jax.distill import t5_distill as te
from nanoflux_jax.shapes import classifier
from nanoflux_jax.evaluate import metrics
from nanoflux_jax.shapes import scoring as toy
from nanoflux_jax.models import flux as flux_lib
from nanoflux_jax.models.t5 import StudentTextEncoder
from nanoflux_jax.models.t5 import T5Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shapes_config():
  spec = importlib.util.spec_from_file_location(
      'shapes_cfg16', os.path.join(ROOT, 'experiments/configs/shapes.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# ---------------------------------------------------------------------------
# The world.
# ---------------------------------------------------------------------------
def test_shapes9_world_has_room_for_the_method():
  w = shapes.ShapesWorld(0, world='shapes9')
  assert w.resolution == 128
  scenes = [w.scene(i) for i in range(300)]
  assert {len(s.objects) for s in scenes} == {1, 2, 3}
  spec = shapes.WORLDS['shapes9']
  assert len(spec.position_names) == 9
  assert {o.position for s in scenes for o in s.objects} == set(
      spec.position_names)
  for s in scenes:
    assert s.world == 'shapes9'
    assert len({o.position for o in s.objects}) == len(s.objects)
    colours = [o.colour for o in s.objects] + [s.background]
    assert len(set(colours)) == len(colours)
  # Deterministic, and another world than the classic one.
  assert shapes.ShapesWorld(0, world='shapes9').captions(5) == w.captions(5)
  assert w.captions(5) != shapes.ShapesWorld(0).captions(5)
  assert 'at the top left' in ' '.join(w.captions(300))
  words = set(shapes.vocabulary('shapes9'))
  assert all(set(c.replace(',', '').split()) <= words
             for c in w.captions(300))
  # Neighbouring large objects never touch: centres further apart than a
  # large object is wide.
  xs = sorted({fx for _, (fx, _) in spec.positions})
  assert min(np.diff(xs)) > 2 * spec.half_extent('large')
  img = shapes.render(scenes[0])
  assert img.shape == (128, 128, 3)
  with pytest.raises(ValueError, match='unknown world'):
    shapes.ShapesWorld(0, world='shapes7')


def test_prompt_sources_name_the_world():
  assert data_lib.load_prompts('shapes9:3:5') == shapes.ShapesWorld(
      5, world='shapes9').captions(3)
  assert shapes.parse_source('shapes:4') == ('shapes', 4, 0)
  assert shapes.parse_source('prompts.txt') is None
  assert shapes.parse_source('shapes') is None   # a file name, not a source.
  with pytest.raises(ValueError, match='shapes9:N'):
    data_lib.load_prompts('shapes9:0')


def test_token_labels_in_the_shapes9_world():
  scene = shapes.Scene((shapes.Obj('star', 'red', 'top left', 'small'),
                        shapes.Obj('circle', 'blue', 'centre', 'large')),
                       background='green', world='shapes9')
  # 'a small red star at the top left, a large blue circle in the centre,
  # on a green background' -> 8 + 7 + 4 words.
  assert len(scene.caption.split()) == 19
  lab = shapes_encoders.token_labels(scene, 19, 20)
  positions = shapes.WORLDS['shapes9'].position_names + ('background',)
  assert [positions[i] for i in lab['position'][:19]] == (
      ['top left'] * 8 + ['centre'] * 7 + ['background'] * 4)
  assert lab['position'][19] == -1


# ---------------------------------------------------------------------------
# The geometric judge.
# ---------------------------------------------------------------------------
def _perturb(images, seed=0):
  """Generated-looking renderings: blurred, noisy, moved by up to 2 px."""
  rng = np.random.default_rng(seed)
  out = []
  for img in images.astype(np.float32):
    dy, dx = rng.integers(-2, 3, 2)
    img = np.roll(img, (dy, dx), axis=(0, 1))
    img = ndimage.gaussian_filter(img, (0.8, 0.8, 0))
    img = img + rng.normal(0, 8, img.shape)
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return np.stack(out)


@pytest.mark.parametrize('world', ['shapes', 'shapes9'])
def test_geometry_judge_reads_renderings(world):
  judge = classifier.load_judge('geometry', world)
  images, _, scenes = shapes.ShapesWorld(77, world=world).batch(0, 48)
  labels = classifier.batch_labels(scenes)
  for imgs in (images, _perturb(images)):
    preds, feats = judge(imgs)
    acc = classifier.accuracy(preds, labels)
    assert min(acc.values()) >= (1.0 if imgs is images else 0.95), acc
  assert feats.shape[0] == 48 and np.isfinite(feats).all()
  # Every prompted object is read back from its own rendering, and not from
  # another scene's.
  assert metrics.geneval(judge, images, scenes) == 1.0
  assert metrics.geneval(judge, images[::-1], scenes) < 0.2


def test_judges_refuse_what_they_cannot_judge():
  with pytest.raises(ValueError, match="'shapes9'.*geometry"):
    classifier.load_judge('', 'shapes9')
  judge = classifier.load_judge('geometry', 'shapes9')
  with pytest.raises(ValueError, match=r'not \[B, 128, 128, 3\]'):
    judge(np.zeros((1, 64, 64, 3), np.uint8))


def test_scores_split_three_object_prompts():
  s = toy.eval_set(5, 24, 128, (256, 48), num_reference=24, world='shapes9')
  images = np.stack([shapes.render(sc) for sc in s.scenes])
  out = toy.scores(classifier.load_judge('geometry', 'shapes9'), images, s,
                   images)
  by = out['geneval_by_objects']
  assert out['geneval'] == 1.0 and sorted(by) == [
      '1_object', '2_objects', '3_objects']
  assert sum(v['n'] for v in by.values()) == 24


# ---------------------------------------------------------------------------
# The configs.
# ---------------------------------------------------------------------------
def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_teacher16_t5_is_sized_like_flux():
  """>= 4 layers and >= 30% of the DiT's parameters (FLUX: 4.7B beside
  12B); the full16 student T5 has <= 1/4 of the teacher T5's."""
  mod = _shapes_config()
  t = mod.teacher_config('teacher16')
  assert (t.world, t.resolution, t.resolution // (2 * t.pixel_factor)) == (
      'shapes9', 128, 16)
  vocab = 64   # the tokenizer's, about (the world has 28 words).
  t5_cfg = T5Config.tiny(**{**dict(t.t5), 'vocab_size': vocab})
  assert t5_cfg.num_layers >= 4
  ids = jnp.zeros((1, 8), jnp.int32)
  t5 = _count(jax.eval_shape(lambda: T5Encoder(t5_cfg).init(
      jax.random.PRNGKey(0), ids)))
  f_cfg = FluxConfig(in_channels=4 * t.latent_channels,
                     context_in_dim=t5_cfg.d_model,
                     vec_in_dim=t.clip.hidden_size, **dict(t.flux))
  dit = _count(jax.eval_shape(lambda: flux_lib.init_params(
      f_cfg, jax.random.PRNGKey(0))))
  assert t5 >= 0.3 * dit, (t5, dit)
  c = mod.get_config('full16')
  student = [r for r in c.rungs if r['kind'] == 'text_encoder'
             and not r.get('ablation')][0]['distill']['student']
  s_cfg = te_student.student_t5_config(
      t5_cfg, num_layers=student['num_layers'], d_model=student['d_model'],
      d_ff=student['d_ff'])
  s = _count(jax.eval_shape(lambda: StudentTextEncoder(
      s_cfg, t5_cfg.d_model).init(jax.random.PRNGKey(0), ids)))
  assert s <= t5 / 4, (s, t5)


@pytest.mark.parametrize('variant', ['full16', 'micro16'])
def test_full16_final_student_carries_downsampler_and_t5(variant):
  c = _shapes_config().get_config(variant)
  rows = ladder.check_config(c)
  main = [r for r in c.rungs if not r.get('ablation')]
  ds = [r for r in main if r['kind'] == 'downsample']
  # Progressive: one block first, then a wider range containing it.
  assert [(r['start'], r['end']) for r in ds] == [(1, 1), (1, -2)]
  assert [r['kind'] for r in main][-2:] == ['text_encoder', 'export']
  te_losses = [r['distill']['loss'] for r in c.rungs
               if r['kind'] == 'text_encoder']
  assert [(l['lambda_vis'] > 0, l.get('lambda_vel', 0) > 0)
          for l in te_losses] == [(True, False), (False, False),
                                  (False, True)]
  assert c.distill.data.prompts == 'shapes9:4096'
  assert (c.evaluate[0]['world'], c.evaluate[0]['classifier']) == (
      'shapes9', 'geometry')
  assert c.teacher.shapes.world == 'shapes9' and not c.teacher.pipeline
  assert len(rows) == len(c.rungs)


# ---------------------------------------------------------------------------
# The DistillT5 velocity term.
# ---------------------------------------------------------------------------
def _random_params(init, seed):
  """Random N(0, 0.2) params of init's shapes: no init to compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype),
                      nn.meta.unbox(jax.eval_shape(init)))


def test_velocity_loss_matches_a_hand_computation():
  """vel = MSE of the frozen denoiser's velocity with student vs teacher
  embeddings, at a state of the teacher's own Euler trajectory."""
  t_cfg = T5Config.tiny(num_layers=1)
  ids, mask = data_lib.random_tokens(3, 6, t_cfg.vocab_size, 0)
  t_params = _random_params(lambda: T5Encoder(t_cfg).init(
      jax.random.PRNGKey(0), jnp.asarray(ids))['params'], 1)
  f_cfg = FluxConfig.tiny(context_in_dim=t_cfg.d_model, depth=1,
                          depth_single_blocks=1, attention_impl='xla')
  f_params = _random_params(lambda: flux_lib.init_params(
      f_cfg, jax.random.PRNGKey(0)), 2)
  s_cfg = te_student.student_t5_config(t_cfg, d_model=16)
  s_params = _random_params(lambda: StudentTextEncoder(
      s_cfg, t_cfg.d_model).init(jax.random.PRNGKey(0), jnp.asarray(ids))[
          'params'], 3)
  grid, schedule = (2, 2), (1.0, 0.6, 0.0)
  rng_np = np.random.default_rng(0)
  batch = {'ids': ids, 'mask': mask,
           'y': rng_np.standard_normal((3, f_cfg.vec_in_dim)).astype(
               np.float32),
           'noise': rng_np.standard_normal((3, 4, f_cfg.in_channels)).astype(
               np.float32)}
  spec = te.TextDistillSpec(
      student=s_cfg, teacher=t_cfg, out_dim=t_cfg.d_model, denoiser=f_cfg,
      schedule=schedule, grid=grid, lambda_emb=0.5, lambda_vis=0.0,
      monitor_vis=False, lambda_vel=2.0)
  rng = jax.random.PRNGKey(5)
  frozen = {'t5': t_params, 'flux': f_params}
  loss, terms = jax.jit(lambda p: te.text_distill_loss(
      p, frozen, batch, rng, spec=spec))(s_params)

  # By hand: the embeddings, the teacher's Euler trajectory, the picked
  # state, both velocities.
  s_txt = jax.jit(StudentTextEncoder(s_cfg, t_cfg.d_model).apply)(
      {'params': s_params}, ids)
  t_txt = jax.jit(T5Encoder(t_cfg).apply)({'params': t_params}, ids)

  @jax.jit
  def v(x, t, txt):
    return flux_lib.Flux(f_cfg).apply(
        {'params': f_params}, img=x, img_ids=sampling.image_ids(3, *grid),
        txt=txt, txt_ids=sampling.text_ids(3, 6), timesteps=t,
        y=batch['y']).velocity

  xs, x = [], batch['noise']
  for k in range(len(schedule) - 1):
    xs.append(x)
    x = x + (schedule[k + 1] - schedule[k]) * np.asarray(
        v(x, np.full(3, schedule[k], np.float32), t_txt))
  t, idx, _ = losses.sample_timesteps(rng, 3, schedule)
  x_t = np.stack([xs[int(i)][b] for b, i in enumerate(idx)])
  want_vel = np.mean((np.asarray(v(x_t, t, s_txt)) -
                      np.asarray(v(x_t, t, t_txt))) ** 2)
  m = np.asarray(mask, np.float32)[..., None]
  want_emb = ((np.asarray(s_txt) - np.asarray(t_txt)) ** 2 * m).sum() / (
      m.sum() * t_cfg.d_model)
  assert sorted(terms) == ['emb', 'loss', 'vel']
  np.testing.assert_allclose(terms['vel'], want_vel, rtol=1e-4)
  np.testing.assert_allclose(terms['emb'], want_emb, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * want_emb + 2.0 * want_vel,
                             rtol=1e-4)
  assert want_vel > 0


# ---------------------------------------------------------------------------
# Progressive token down-sampling.
# ---------------------------------------------------------------------------
def test_downsample_rung_widens_an_existing_range():
  """A downsample rung on a student that already down-samples widens its
  coarse range and keeps the trained down-sampler (shapes only: nothing
  here needs values)."""
  cfg = FluxConfig.tiny(attention_impl='xla').replace(
      downsample_start=1, downsample_end=1, downsample_factor=2)
  params = {'trained': np.ones(3)}      # passed on untouched.
  down = rungs.RUNG_KINDS['downsample'].compress
  (c2, p2), _ = down(None, Stage(cfg, 8, (4, 4)), (cfg, params),
                     dict(start=1, end=-2, factor=2, channels=0, seed=0))
  assert (c2.num_blocks, c2.downsample_start, c2.downsample_end) == (4, 1, 2)
  assert p2 is params
  with pytest.raises(ValueError, match='do not contain'):
    token_downsample.widen_downsampler(c2, p2, 2, 3)
  with pytest.raises(ValueError, match='factor'):
    token_downsample.widen_downsampler(c2, p2, 0, 3, factor=4)
  with pytest.raises(ValueError, match='no down-sampler'):
    token_downsample.widen_downsampler(
        cfg.replace(downsample_start=None, downsample_end=None), p2, 0, 3)
  # The widened model runs blocks 1-2 on the coarse grid: the params of
  # the one-block model fit it unchanged.
  abstract = jax.eval_shape(lambda: flux_lib.init_params(
      cfg, jax.random.PRNGKey(0)))
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(
      lambda x: x.shape, jax.eval_shape(lambda: flux_lib.init_params(
          c2, jax.random.PRNGKey(0))))
  out = jax.eval_shape(lambda p, x: flux_lib.Flux(c2).apply(
      {'params': p}, img=x, img_ids=sampling.image_ids(1, 4, 4),
      txt=jnp.zeros((1, 3, cfg.context_in_dim)),
      txt_ids=sampling.text_ids(1, 3), timesteps=jnp.full((1,), 0.5),
      y=jnp.zeros((1, cfg.vec_in_dim)), img_grid=(4, 4),
      return_intermediates=True), abstract,
      jax.ShapeDtypeStruct((1, 16, cfg.in_channels), jnp.float32))
  assert [f.shape[1] for f in out.intermediates['img']] == [16, 4, 4, 16]
