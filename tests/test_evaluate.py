"""The attribute classifier and the toy metrics built on it."""
import numpy as np
import pytest

from nanoflux_jax.data import shapes
from nanoflux_jax.evaluate import classifier, metrics


@pytest.fixture(scope='module')
def clf(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('clf') / 'classifier')
  trained = classifier.load_or_train(path, steps=500, batch=64)
  again = classifier.load_or_train(path)  # cached: loads, does not retrain.
  images = shapes.ShapesWorld(5).batch(0, 8)[0]
  np.testing.assert_array_equal(trained(images)[1], again(images)[1])
  return again


def test_classifier_reads_attributes_back(clf):
  acc = classifier.evaluate_on_world(clf, n=512)
  assert min(acc.values()) >= 0.95, acc


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
