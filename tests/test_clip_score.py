"""CLIP score and CLIP-space FID: against torch's CLIPModel and scipy."""
import jax
import numpy as np
import pytest
import scipy.linalg

from nanoflux_jax import parallel
from nanoflux_jax.evaluate import clip_fid
from nanoflux_jax.evaluate import clip_score
from nanoflux_jax.testing.tiny_clip import make_tiny_clip_model
from tests.refs import require

PROMPTS = ['a photo of a cat', 'a dog runs in the park with a ball',
           'a red circle', 'the sun sets over the mountains',
           'a bowl of fruit on a wooden table']


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
  """(torch CLIPModel, folder with tokenizer and processor config)."""
  require('torch')
  require('transformers')
  path = tmp_path_factory.mktemp('clip') / 'clip'
  return make_tiny_clip_model(path), str(path)


def _images(n=5):
  """uint8 images of mixed aspect: resize and crop both matter."""
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, (n, 40, 33, 3), dtype=np.uint8)


def _torch_score(model, path, imgs, prompts):
  """CLIP score the torchmetrics way: processor, tokenizer, CLIPModel."""
  torch = require('torch')
  transformers = require('transformers')
  proc = transformers.CLIPImageProcessor.from_pretrained(path)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  pixels = proc(images=list(imgs), return_tensors='pt')['pixel_values']
  text = tok(prompts, padding=True, return_tensors='pt')
  with torch.no_grad():
    a = model.get_image_features(pixel_values=pixels).pooler_output
    b = model.get_text_features(**text).pooler_output
  cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).double().numpy()
  return 100 * np.maximum(cos, 0)


def test_score_agrees_with_torch(tiny_clip):
  model, path = tiny_clip
  imgs = _images()
  scorer = clip_score.ClipScorer.load(path, batch_size=2)  # 3 batches.
  ours = scorer.score(imgs, PROMPTS)
  ref = _torch_score(model, path, imgs, PROMPTS)
  print('CLIP score ours', ours, 'torch', ref.mean())
  np.testing.assert_allclose(
      clip_score.clip_scores(scorer.image_embeds(imgs),
                             scorer.text_embeds(PROMPTS)), ref, atol=1e-4)
  assert ours['clip_score'] == pytest.approx(ref.mean(), abs=1e-4)
  assert ours['clip_score_se'] == pytest.approx(
      ref.std(ddof=1) / np.sqrt(len(ref)), abs=1e-4)
  assert ours['n'] == 5 and ref.std() > 1  # Scores differ per pair.
  with pytest.raises(ValueError, match='5 images for 4 prompts'):
    scorer.score(imgs, PROMPTS[:4])


def test_sharded_scorer_matches_single_device(tiny_clip):
  _, path = tiny_clip
  assert jax.device_count() == 8
  mesh = parallel.create_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  sharded = clip_score.ClipScorer.load(path, mesh=mesh, batch_size=3)
  assert sharded.batch_size == 8  # Rounded up to the 8 batch shards.
  kernel = sharded.params['vision']['layers_0']['mlp']['fc1']['kernel']
  assert len(kernel.sharding.device_set) == 8
  assert kernel.addressable_shards[0].data.shape == (6, 40)  # FSDP-split.
  single = clip_score.ClipScorer.load(path, batch_size=3)
  imgs = _images()
  np.testing.assert_allclose(sharded.image_embeds(imgs),
                             single.image_embeds(imgs), atol=1e-5)
  np.testing.assert_allclose(sharded.text_embeds(PROMPTS),
                             single.text_embeds(PROMPTS), atol=1e-5)


def test_clip_score_by_hand():
  """cos 1, 0.6, -0.8 (clamped to 0): mean 53.33, SE std(100, 60, 0)/sqrt 3."""
  a = np.array([[1.0, 0.0], [3.0, 4.0], [-4.0, 3.0]])
  b = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
  s = clip_score.clip_score(a, b)
  assert s['clip_score'] == pytest.approx(160 / 3)
  assert s['clip_score_se'] == pytest.approx(
      np.std([100, 60, 0], ddof=1) / np.sqrt(3))
  with pytest.raises(ValueError, match='same'):
    clip_score.clip_score(a, b[:2])


def _scipy_fid(mu_a, cov_a, mu_b, cov_b):
  """The textbook formula with scipy's (non-symmetric) sqrtm."""
  covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
  return float(np.sum((mu_a - mu_b) ** 2) +
               np.trace(cov_a + cov_b - 2 * covmean))


def test_frechet_distance_closed_form_and_scipy():
  rng = np.random.default_rng(0)
  f = 6
  # Diagonal covariances commute: d = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
  mu_a, mu_b = rng.standard_normal(f), rng.standard_normal(f)
  va, vb = rng.uniform(0.5, 2, f), rng.uniform(0.5, 2, f)
  want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
  got = clip_fid.frechet_distance_stats(mu_a, np.diag(va), mu_b, np.diag(vb))
  assert got == pytest.approx(want, rel=1e-10)
  # General (non-commuting) SPD covariances: scipy's direct computation.
  x, y = rng.standard_normal((f, f)), rng.standard_normal((f, f))
  cov_a, cov_b = x @ x.T + 0.1 * np.eye(f), y @ y.T + 0.1 * np.eye(f)
  got = clip_fid.frechet_distance_stats(mu_a, cov_a, mu_b, cov_b)
  assert got == pytest.approx(_scipy_fid(mu_a, cov_a, mu_b, cov_b), rel=1e-8)
  with pytest.raises(ValueError, match='two Gaussians'):
    clip_fid.frechet_distance_stats(mu_a, cov_a, mu_b[:3], cov_b)


def test_clip_fid_on_random_gaussians():
  """Samples of N(mu_a, A A^T) and N(mu_b, B B^T): the estimate is scipy's
  on the same sample statistics, and near the population's closed form."""
  rng = np.random.default_rng(1)
  f, n = 4, 20_000
  ma, mb = rng.standard_normal(f), rng.standard_normal(f)
  la, lb = rng.standard_normal((f, f)), rng.standard_normal((f, f))
  a = ma + rng.standard_normal((n, f)) @ la.T
  b = mb + rng.standard_normal((n, f)) @ lb.T
  got = clip_fid.clip_fid(a, b)
  sample = _scipy_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                      np.cov(b, rowvar=False))
  population = _scipy_fid(ma, la @ la.T, mb, lb @ lb.T)
  assert got == pytest.approx(sample, rel=1e-8)
  assert got == pytest.approx(population, rel=0.05)
  # Identical sets: zero; a shifted copy: exactly the squared shift.
  assert clip_fid.clip_fid(a, a) == pytest.approx(0.0, abs=1e-8)
  shift = np.arange(f, dtype=np.float64)
  assert clip_fid.clip_fid(a, a + shift) == pytest.approx(
      np.sum(shift ** 2), rel=1e-8)


def test_clip_fid_with_fewer_images_than_dimensions():
  """Rank-deficient covariances (N < F, as with a few hundred prompts in
  CLIP-L's 768 dims): finite, real, and equal to scipy where scipy's sqrtm
  converges."""
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((10, 32)), rng.standard_normal((12, 32)) + 0.5
  got = clip_fid.clip_fid(a, b)
  assert np.isfinite(got) and got > 0
  ref = _scipy_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                   np.cov(b, rowvar=False))
  assert got == pytest.approx(ref, rel=1e-4)
  with pytest.raises(ValueError, match='>= 2 images'):
    clip_fid.clip_fid(a[:1], b)
