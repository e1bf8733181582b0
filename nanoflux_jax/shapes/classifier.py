"""A small CNN that reads a shapes-world image back into its attributes.

For every position (left, right, top, bottom, centre) it predicts the object
there (a shape or 'none'), its colour and size; plus the background colour.
Trained on ground-truth renderings, it is the judge behind toy-GenEval, and
its penultimate features are the embedding behind toy-FID.
"""
from __future__ import annotations

import os
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanoflux_jax import checkpoint
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.shapes import geometry
POSITIONS = tuple(shapes.POSITIONS)
SHAPE_CLASSES = ('none',) + shapes.SHAPES
COLOUR_CLASSES = tuple(shapes.COLOURS)
SIZE_CLASSES = tuple(shapes.SIZES)
_HEADS = {'shape': len(SHAPE_CLASSES), 'colour': len(COLOUR_CLASSES),
          'size': len(SIZE_CLASSES)}


def scene_labels(scene: shapes.Scene) -> dict[str, np.ndarray]:
  """Scene -> int labels: shape/colour/size [P], background []. Colour and
  size of an empty position are -1 (ignored by the loss and accuracy). P and
  the size classes are the scene's world's (POSITIONS, SIZE_CLASSES for the
  classic world)."""
  spec = shapes.world_spec(scene.world)
  positions, sizes = spec.position_names, spec.size_names
  p = len(positions)
  out = {'shape': np.zeros(p, np.int32), 'colour': np.full(p, -1, np.int32),
         'size': np.full(p, -1, np.int32),
         'background': np.int32(COLOUR_CLASSES.index(scene.background))}
  for o in scene.objects:
    i = positions.index(o.position)
    out['shape'][i] = SHAPE_CLASSES.index(o.shape)
    out['colour'][i] = COLOUR_CLASSES.index(o.colour)
    out['size'][i] = sizes.index(o.size)
  return out


def batch_labels(scenes) -> dict[str, np.ndarray]:
  worlds = sorted({s.world for s in scenes})
  if len(worlds) > 1:
    raise ValueError(f'batch_labels: scenes of several worlds {worlds}')
  labels = [scene_labels(s) for s in scenes]
  return {k: np.stack([l[k] for l in labels]) for k in labels[0]}


class AttributeCNN(nn.Module):
  """uint8 [B, R, R, 3] -> (logits dict, features [B, 4 * width]).

  Three stride-2 convs bring 64 px to an 8x8 map; flattening it (rather than
  pooling) keeps *where* things are, which the position heads need. Small on
  purpose: a training step at batch 64 costs ~2 GFLOP.
  """
  width: int = 16

  @nn.compact
  def __call__(self, images: jax.Array):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    for i, mult in enumerate((1, 2, 4)):
      x = nn.Conv(self.width * mult, (3, 3), strides=2, name=f'conv{i}')(x)
      x = nn.relu(nn.GroupNorm(min(8, self.width * mult), name=f'norm{i}')(x))
    x = nn.relu(nn.Conv(self.width * 4, (3, 3), name='conv3')(x))
    feats = nn.relu(nn.Dense(self.width * 8, name='embed')(
        x.reshape(x.shape[0], -1)))
    p = len(POSITIONS)
    logits = {k: nn.Dense(p * n, name=k)(feats).reshape(-1, p, n)
              for k, n in _HEADS.items()}
    logits['background'] = nn.Dense(len(COLOUR_CLASSES), name='background')(
        feats)
    return logits, feats


def _loss(logits, labels):
  total = 0.0
  for k in logits:
    lab = labels[k]
    mask = (lab >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[k], jnp.maximum(lab, 0))
    total = total + (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return total


def accuracy(predictions: dict, labels: dict) -> dict[str, float]:
  """Per-attribute accuracy over labelled entries (np arrays)."""
  out = {}
  for k, lab in labels.items():
    mask = lab >= 0
    out[k] = float((predictions[k] == lab)[mask].mean())
  return out


class Classifier:
  """A trained AttributeCNN with its params."""

  def __init__(self, params, width: int = 16, resolution: int = 64):
    self.params, self.width, self.resolution = params, width, resolution
    self._apply = jax.jit(AttributeCNN(width).apply)

  def __call__(self, images: np.ndarray):
    """-> (predictions {k: int [B, P] or [B]}, features [B, F])."""
    logits, feats = self._apply({'params': self.params}, jnp.asarray(images))
    return ({k: np.asarray(v.argmax(-1)) for k, v in logits.items()},
            np.asarray(feats))

  def save(self, path: str):
    checkpoint.save(path, {'width': self.width,
                           'resolution': self.resolution}, self.params)

  @classmethod
  def load(cls, path: str) -> 'Classifier':
    cfg, params = checkpoint.load(path)
    return cls(params, **cfg)


def train_classifier(steps: int = 1500, batch: int = 64, width: int = 16,
                     resolution: int = 64, seed: int = 0,
                     lr: float = 2e-3) -> Classifier:
  """Trains on fresh world scenes (seed-disjoint from evaluation worlds)."""
  world = shapes.ShapesWorld(seed=10_000 + seed, resolution=resolution)
  model = AttributeCNN(width)
  params = jax.jit(model.init)(jax.random.key(seed),
                               jnp.zeros((1, resolution, resolution, 3),
                                         jnp.uint8))['params']
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(
        lambda p: _loss(model.apply({'params': p}, images)[0], labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  for i in range(steps):
    images, _, scenes = world.batch(i * batch, batch)
    params, opt_state, loss = step(params, opt_state, images,
                                   batch_labels(scenes))
    if (i + 1) % max(steps // 10, 1) == 0:
      rate = (i + 1) / (time.perf_counter() - start)
      logging.info('classifier step %d/%d loss %.4f (%.1f steps/s, ETA %.0f s)',
                   i + 1, steps, float(loss), rate, (steps - i - 1) / rate)
  return Classifier(params, width, resolution)


def load_or_train(path: str, **kw) -> Classifier:
  """The cached classifier at `path`, training (and caching) it if absent."""
  if os.path.isdir(path):
    return Classifier.load(path)
  clf = train_classifier(**kw)
  clf.save(path)
  return clf


def load_judge(name: str = '', world: str = 'shapes',
               resolution: int | None = None):
  """The toy-GenEval judge config.evaluate.classifier names.

  Args:
    name: '' (the shipped classifier: classic world only), 'geometry'
      (`geometry.GeometryJudge`, any world, nothing trained) or a
      `Classifier.save` folder.
    world, resolution: the images' world and side (geometry only).
  Raises:
    ValueError: a trained classifier asked to judge another world.
  """
  if name == 'geometry':
    return geometry.GeometryJudge(world, resolution)
  if world != 'shapes':
    raise ValueError(f"classifier {name or 'shipped'!r} judges the classic "
                     f"'shapes' world only, not {world!r}; use 'geometry'")
  return Classifier.load(name or shapes.classifier_path())


def evaluate_on_world(clf, n: int = 512, seed: int = 777):
  """Attribute accuracy of a judge on real renderings of a held-out world
  (the judge's `world` attribute, else the classic one)."""
  images, _, scenes = shapes.ShapesWorld(
      seed, clf.resolution, getattr(clf, 'world', 'shapes')).batch(0, n)
  preds, _ = clf(images)
  return accuracy(preds, batch_labels(scenes))
