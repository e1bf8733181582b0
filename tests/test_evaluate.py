"""The attribute classifier and the toy metrics built on it."""
import numpy as np
import pytest

from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.evaluate import metrics
from nanoflux_jax.shapes import classifier


@pytest.fixture(scope='module')
def clf():
  """The judge shipped with the package (data/assets/shapes_classifier)."""
  return classifier.Classifier.load(shapes.classifier_path())


def test_shipped_classifier_reads_attributes_back(clf):
  acc = classifier.evaluate_on_world(clf, n=512)
  assert min(acc.values()) >= 0.99, acc


def test_classifier_training_is_cached(tmp_path):
  path = str(tmp_path / 'classifier')
  trained = classifier.load_or_train(path, steps=20, batch=16)
  again = classifier.load_or_train(path)  # cached: loads, does not retrain.
  images = shapes.ShapesWorld(5).batch(0, 8)[0]
  np.testing.assert_array_equal(trained(images)[1], again(images)[1])


def test_wilson_interval():
  lo, hi = metrics.wilson_interval(90, 100)
  assert lo < 0.9 < hi and 0.05 < hi - lo < 0.15
  # Stays inside [0, 1] and is not empty at the extremes.
  assert metrics.wilson_interval(0, 64)[0] == 0.0 < metrics.wilson_interval(
      0, 64)[1]
  assert metrics.wilson_interval(64, 64)[0] < 1.0 == metrics.wilson_interval(
      64, 64)[1]
  # Narrower with more samples.
  assert np.diff(metrics.wilson_interval(450, 500)) < np.diff(
      metrics.wilson_interval(45, 50))
  with pytest.raises(ValueError, match='n=0'):
    metrics.wilson_interval(0, 0)


def test_geneval_summary_by_object_count():
  scenes = shapes.ShapesWorld(3).batch(0, 40)[2]
  ok = np.array([len(s.objects) == 1 for s in scenes])  # only singles pass.
  out = metrics.geneval_summary(ok, scenes)
  n1 = sum(len(s.objects) == 1 for s in scenes)
  assert out['1_object'] == {'score': 1.0, 'ci': out['1_object']['ci'],
                             'n': n1}
  assert out['2_objects']['score'] == 0.0
  assert out['2_objects']['n'] == 40 - n1
  assert out['all']['score'] == pytest.approx(n1 / 40)


def test_geneval_fid_psnr(clf):
  world = shapes.ShapesWorld(seed=123)
  images, _, scenes = world.batch(0, 128)
  assert metrics.geneval(clf, images, scenes) >= 0.9
  # The same images judged against other prompts mostly fail.
  assert metrics.geneval(clf, images, scenes[1:] + scenes[:1]) < 0.2
  other = shapes.ShapesWorld(seed=321).batch(0, 128)[0]
  noise = np.random.default_rng(0).integers(0, 256, images.shape, np.uint8)
  assert (metrics.toy_fid(clf, other, images) * 2 <
          metrics.toy_fid(clf, noise, images))
  assert metrics.psnr(images, images) > 90
  shifted = np.clip(images.astype(int) + 10, 0, 255).astype(np.uint8)
  assert 25 < metrics.psnr(images, shifted) <= 20 * np.log10(255 / 8)
  with pytest.raises(ValueError, match='2 images for 3 scenes'):
    metrics.geneval(clf, images[:2], scenes[:3])
