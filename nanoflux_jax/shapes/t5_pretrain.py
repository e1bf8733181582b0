"""Pretraining the shapes teacher's T5-style encoder on the world's captions.

FLUX.1's T5 is pretrained: each token's embedding already knows which phrase
it belongs to, so the DiT only has to read "the red thing is on the left"
from it. A randomly initialised, frozen toy T5 does not: its relative
position bias is random, so the embedding of "red" in the first object's
phrase and in the second's are nearly the same, and the DiT swaps colours
and drops objects (the random-encoder teacher's typical failure).

`pretrain_t5` gives the toy T5 that property with a supervised task on the
captions alone (no images): from every token's output embedding, a linear
probe predicts the attributes of the phrase the token is in (position or
"background", shape, colour, size). The encoder is then frozen, like FLUX's,
and the probe thrown away.
"""
from __future__ import annotations

import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanoflux_jax.configs import T5Config
from nanoflux_jax.shapes import world as shapes
from nanoflux_jax.models.t5 import T5Encoder



def _positions(world: str) -> tuple[str, ...]:
  """Per-token position classes: the world's positions, then one more for
  the background phrase."""
  return shapes.world_spec(world).position_names + ('background',)


def _heads(world: str) -> dict[str, int]:
  """Classes of each per-token target of `world`'s captions."""
  spec = shapes.world_spec(world)
  return {'position': len(_positions(world)), 'shape': len(shapes.SHAPES),
          'colour': len(shapes.COLOURS), 'size': len(spec.size_names)}


def token_labels(scene: shapes.Scene, num_tokens: int, length: int
                 ) -> dict[str, np.ndarray]:
  """Per-token attribute labels of a caption, int32 [length] each.

  Captions are '<phrase>, <phrase>, on a <colour> background' and the shapes
  T5 tokenizer is word-level (one token per word, then '</s>'), so token i is
  word i and phrase k is the k-th comma-separated part. Labels are -1 where
  nothing is predicted: '</s>', padding, shape and size of the background.

  Args:
    scene: the captioned scene.
    num_tokens: the caption's token count without '</s>' (checked against
      its word count: a tokenizer that splits words breaks this mapping).
    length: padded sequence length.
  """
  words = scene.caption.split()
  if num_tokens != len(words):
    raise ValueError(f'token_labels: {num_tokens} tokens for the '
                     f'{len(words)} words of {scene.caption!r}; the shapes T5 '
                     'tokenizer must be word-level')
  positions = _positions(scene.world)
  sizes = shapes.world_spec(scene.world).size_names
  out = {k: np.full(length, -1, np.int32) for k in _heads(scene.world)}
  phrase = 0
  for i, word in enumerate(words[:length]):
    if phrase < len(scene.objects):
      o = scene.objects[phrase]
      out['position'][i] = positions.index(o.position)
      out['shape'][i] = shapes.SHAPES.index(o.shape)
      out['size'][i] = sizes.index(o.size)
      colour = o.colour
    else:
      out['position'][i] = positions.index('background')
      colour = scene.background
    out['colour'][i] = list(shapes.COLOURS).index(colour)
    phrase += word.endswith(',')
  return out


class _Probe(nn.Module):
  """T5 embeddings [B, T, D] -> {attribute: logits [B, T, classes]}."""
  world: str = 'shapes'

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    return {k: nn.Dense(n, name=k)(x) for k, n in _heads(self.world).items()}


def _probe_loss(params, ids, labels, cfg: T5Config, world: str = 'shapes'):
  x = T5Encoder(cfg).apply({'params': params['t5']}, ids)
  logits = _Probe(world).apply({'params': params['probe']}, x)
  total, acc = 0.0, {}
  for k, lab in labels.items():
    mask = (lab >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[k], jnp.maximum(lab, 0))
    total = total + (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    acc[k] = ((logits[k].argmax(-1) == lab) * mask).sum() / jnp.maximum(
        mask.sum(), 1.0)
  return total, acc


def caption_batch(tokenizer, world: shapes.ShapesWorld, start: int, num: int,
                  length: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Scenes start..start+num-1 -> (ids int32 [num, length], labels)."""
  scenes = [world.scene(i) for i in range(start, start + num)]
  caps = [s.caption for s in scenes]
  ids = tokenizer(caps, padding='max_length', max_length=length,
                  truncation=True)['input_ids']
  counts = [len(f) - 1 for f in tokenizer(caps)['input_ids']]  # - '</s>'.
  labels = [token_labels(s, n, length) for s, n in zip(scenes, counts)]
  return (np.asarray(ids, np.int32),
          {k: np.stack([l[k] for l in labels]) for k in _heads(world.world)})


def pretrain_t5(cfg: T5Config, params, tokenizer, world: shapes.ShapesWorld,
                length: int, steps: int = 400, batch_size: int = 64,
                learning_rate: float = 3e-3, seed: int = 0,
                timings: list[float] | None = None
                ) -> tuple[dict, dict[str, float]]:
  """Trains the T5 encoder (and a throw-away probe) on caption structure.

  Args:
    cfg, params: the T5 encoder and its initial params.
    tokenizer: the word-level shapes T5 tokenizer.
    world: captions come from scenes 0.. of this world.
    length: padded token length (the pipeline's max_sequence_length).
    timings: if given, each step's wall seconds (batch preparation
      included; the step waited for) are appended to it (benchmarks).
  Returns:
    (trained T5 params, probe accuracy per attribute on 512 captions of a
    held-out world).
  """
  probe = _Probe(world.world).init(
      jax.random.PRNGKey(seed), jnp.zeros((1, length, cfg.d_model)))['params']
  p = {'t5': params, 'probe': probe}
  tx = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(steps // 10, 1), max(steps, 2)))
  opt = tx.init(p)

  @jax.jit
  def step(p, opt, ids, labels):
    (loss, acc), g = jax.value_and_grad(_probe_loss, has_aux=True)(
        p, ids, labels, cfg, world.world)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, loss, acc

  t0 = time.perf_counter()
  for i in range(steps):
    t_step = time.perf_counter()
    ids, labels = caption_batch(tokenizer, world, i * batch_size, batch_size,
                                length)
    p, opt, loss, acc = step(p, opt, ids, labels)
    if timings is not None:
      jax.block_until_ready(loss)
      timings.append(time.perf_counter() - t_step)
    if (i + 1) % max(steps // 5, 1) == 0:
      rate = (i + 1) / (time.perf_counter() - t0)
      logging.info('T5 caption pretraining step %d/%d loss %.4f (%.1f '
                   'steps/s, ETA %.0f s)', i + 1, steps, float(loss), rate,
                   (steps - i - 1) / rate)
  held_out = shapes.ShapesWorld(world.seed + 7919, world.resolution,
                                world.world)
  ids, labels = caption_batch(tokenizer, held_out, 0, 512, length)
  _, acc = jax.jit(_probe_loss, static_argnums=(3, 4))(p, ids, labels, cfg,
                                                       world.world)
  return p['t5'], {k: float(v) for k, v in acc.items()}
