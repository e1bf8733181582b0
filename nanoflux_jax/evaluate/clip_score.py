"""CLIP score of generated images against their prompts, in JAX.

  scorer = ClipScorer.load('/ckpt/clip-vit-large-patch14', mesh=mesh)
  img = scorer.image_embeds(images)        # uint8 [N, H, W, 3] -> [N, P]
  txt = scorer.text_embeds(prompts)        # N prompts -> [N, P]
  s = clip_score(img, txt)                 # {'clip_score', 'clip_score_se'}

CLIP score as commonly reported (torchmetrics' CLIPScore, the NanoFLUX
paper): 100 * max(cos(image_i, text_i), 0), averaged over the N pairs; its
standard error is the sample standard deviation / sqrt(N). The CLIP folder is
a transformers CLIPModel save with its tokenizer and preprocessor_config.json
(a local snapshot of openai/clip-vit-large-patch14 has all three).

`preprocess` is CLIPImageProcessor's path in numpy: resize the shortest side
(PIL bicubic, on uint8, as transformers' PIL backend does), centre crop,
rescale by 1/255, normalise with the CLIP mean / std; channels last.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from nanoflux_jax import parallel
from nanoflux_jax.configs import ClipModelConfig
from nanoflux_jax.convert.clip_model import load_clip_model
from nanoflux_jax.errors import CheckpointError
from nanoflux_jax.models import clip_vision

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers 4.x saves the image processor's settings alone; 5.x's
# CLIPProcessor.save_pretrained nests them under 'image_processor'.
PROCESSOR_FILE = 'preprocessor_config.json'
PROCESSOR_FILE_V5 = 'processor_config.json'


# ---------------------------------------------------------------------------
# Image preprocessing (CLIPImageProcessor).
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preprocess:
  """CLIPImageProcessor's settings (its defaults are openai CLIP's).

  shortest_edge: the resize target of the shorter side (None: no resize).
  crop: (height, width) of the centre crop (None: no crop).
  resample: PIL filter id (3: bicubic).
  """
  shortest_edge: int | None = 224
  crop: tuple[int, int] | None = (224, 224)
  rescale_factor: float = 1 / 255
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  resample: int = 3

  @classmethod
  def from_folder(cls, path: str) -> 'Preprocess':
    """Reads path/preprocessor_config.json (or processor_config.json's
    'image_processor'); CLIP's defaults when neither exists."""
    fname = os.path.join(path, PROCESSOR_FILE)
    if not os.path.isfile(fname):
      fname = os.path.join(path, PROCESSOR_FILE_V5)
      if not os.path.isfile(fname):
        return cls()
    with open(fname) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise CheckpointError(f'{fname}: not valid JSON ({e})') from e
    if os.path.basename(fname) == PROCESSOR_FILE_V5:
      d = d.get('image_processor')
      if not isinstance(d, dict):
        raise CheckpointError(f'{fname}: no image_processor settings')
    size = d.get('size', {'shortest_edge': 224})
    if isinstance(size, int):
      size = {'shortest_edge': size}
    if set(size) != {'shortest_edge'}:
      raise CheckpointError(f'{fname}: size={size!r}; only '
                            "{'shortest_edge': N} (CLIP's resize) is supported")
    crop = d.get('crop_size', {'height': 224, 'width': 224})
    if isinstance(crop, int):
      crop = {'height': crop, 'width': crop}
    if set(crop) != {'height', 'width'}:
      raise CheckpointError(f'{fname}: crop_size={crop!r}; expected height '
                            'and width')
    return cls(
        shortest_edge=(size['shortest_edge'] if d.get('do_resize', True)
                       else None),
        crop=((crop['height'], crop['width'])
              if d.get('do_center_crop', True) else None),
        rescale_factor=(d.get('rescale_factor', 1 / 255)
                        if d.get('do_rescale', True) else 1.0),
        mean=tuple(d.get('image_mean', CLIP_MEAN)) if d.get(
            'do_normalize', True) else (0.0, 0.0, 0.0),
        std=tuple(d.get('image_std', CLIP_STD)) if d.get(
            'do_normalize', True) else (1.0, 1.0, 1.0),
        resample=int(d.get('resample', 3)))


def _resize_shortest(img: np.ndarray, size: int, resample: int) -> np.ndarray:
  """uint8 [H, W, 3] with its shorter side resized to `size` (PIL)."""
  h, w = img.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  # transformers' get_resize_output_image_size: int(), not round().
  new_long = int(size * long / short)
  new_h, new_w = (new_long, size) if w <= h else (size, new_long)
  return np.asarray(Image.fromarray(img).resize((new_w, new_h),
                                                resample=resample))


def preprocess(images: np.ndarray, pp: Preprocess = Preprocess()
               ) -> np.ndarray:
  """CLIPImageProcessor in numpy: uint8 [N, H, W, 3] -> float32 [N, h, w, 3].

  Raises:
    ValueError: images not uint8 [N, H, W, 3], or smaller than the crop.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'clip preprocess: images of dtype {images.dtype} and '
                     f'shape {images.shape}; expected uint8 [N, H, W, 3]')
  out = []
  for img in images:
    if pp.shortest_edge is not None:
      img = _resize_shortest(img, pp.shortest_edge, pp.resample)
    if pp.crop is not None:
      (h, w), (ch, cw) = img.shape[:2], pp.crop
      if ch > h or cw > w:
        raise ValueError(f'clip preprocess: crop {pp.crop} is larger than the '
                         f'resized image {(h, w)}')
      top, left = (h - ch) // 2, (w - cw) // 2
      img = img[top:top + ch, left:left + cw]
    out.append(img)
  x = np.stack(out).astype(np.float32) * np.float32(pp.rescale_factor)
  return ((x - np.asarray(pp.mean, np.float32)) /
          np.asarray(pp.std, np.float32)).astype(np.float32)


# ---------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------
def clip_scores(image_embeds: np.ndarray, text_embeds: np.ndarray
                ) -> np.ndarray:
  """Per-pair CLIP scores [N]: 100 * max(cos(image_i, text_i), 0).

  Args:
    image_embeds: [N, P] image embeddings (normalised here again).
    text_embeds: [N, P] embeddings of the N prompts, in the same order.
  """
  a = np.asarray(image_embeds, np.float64)
  b = np.asarray(text_embeds, np.float64)
  if a.shape != b.shape or a.ndim != 2 or not len(a):
    raise ValueError(f'clip_score: image embeddings {a.shape} and text '
                     f'embeddings {b.shape}; expected the same [N, P], N > 0')
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) *
                             np.linalg.norm(b, axis=-1))
  return 100.0 * np.maximum(cos, 0.0)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> dict:
  """CLIP score of matched pairs, with its standard error.

  Returns:
    {'clip_score': the mean of `clip_scores`, 'clip_score_se': its standard
    error, std (ddof 1) / sqrt(N) (0 for N = 1), 'n': N}.
  """
  s = clip_scores(image_embeds, text_embeds)
  se = float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else 0.0
  return dict(clip_score=float(s.mean()), clip_score_se=se, n=len(s))


def to_host(x) -> np.ndarray:
  """`x` as one numpy array on this host. A batch split over a multi-host
  mesh is not addressable here as a whole: it is all-gathered first."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


@functools.partial(jax.jit, static_argnums=0)
def _image_embeds(cfg: ClipModelConfig, params, pixels):
  return clip_vision.image_embeddings(cfg, params, pixels)


@functools.partial(jax.jit, static_argnums=0)
def _text_embeds(cfg: ClipModelConfig, params, ids):
  return clip_vision.text_embeddings(cfg, params, ids)


class ClipScorer:
  """A CLIPModel in JAX with its tokenizer and image preprocessing.

  Inputs go through in fixed batches of `batch_size` (the last one padded)
  so that one program is compiled per input kind; with a mesh the params
  are sharded by the logical-axis rules and each batch is split over the
  data-parallel axes.
  """

  def __init__(self, cfg: ClipModelConfig, params, tokenizer,
               pp: Preprocess = Preprocess(), *, mesh=None,
               batch_size: int = 32):
    self.cfg, self.params, self.tokenizer, self.pp = cfg, params, tokenizer, pp
    self.mesh = mesh
    shards = 1 if mesh is None else parallel.num_batch_shards(mesh)
    # A multiple of the data-parallel shards, so a batch splits evenly.
    self.batch_size = -(-max(1, int(batch_size)) // shards) * shards
    s = cfg.vision.image_size
    if pp.crop is not None and tuple(pp.crop) != (s, s):
      raise ValueError(f'ClipScorer: the image processor crops to {pp.crop} '
                       f'but the vision tower takes {s} x {s} images')

  @classmethod
  def load(cls, path: str, *, mesh=None, dtype=None,
           batch_size: int = 32) -> 'ClipScorer':
    """From a transformers CLIPModel folder with its tokenizer files.

    Raises:
      CheckpointError / FileNotFoundError naming the folder or file.
    """
    path = os.fspath(path)
    shardings = None if mesh is None else clip_vision.loading_shardings(mesh)
    cfg, params = load_clip_model(path, dtype, shardings)
    return cls(cfg, params, load_tokenizer(path), Preprocess.from_folder(path),
               mesh=mesh, batch_size=batch_size)

  def _batches(self, x: np.ndarray, fn) -> np.ndarray:
    """fn over x [N, ...] in padded batches -> [N, P] numpy."""
    n, b, out = len(x), self.batch_size, []
    for i in range(0, n, b):
      chunk = x[i:i + b]
      pad = b - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      if self.mesh is not None:
        chunk = jax.device_put(chunk, parallel.batch_sharding(
            self.mesh, chunk.ndim))
      out.append(to_host(fn(self.cfg, self.params, chunk))[:b - pad])
    return np.concatenate(out)

  def image_embeds(self, images: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> unit-norm float32 embeddings [N, P]."""
    return self._batches(preprocess(images, self.pp), _image_embeds)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """int32 ids [N, T]: padded to T = the text tower's positions, truncated
    there (long prompts keep their first T - 1 tokens and the EOS)."""
    if isinstance(prompts, str) or not len(prompts):
      raise ValueError(f'ClipScorer: prompts={prompts!r}; expected a '
                       'non-empty list of strings')
    t = self.cfg.text.max_position_embeddings
    ids = self.tokenizer(list(prompts), padding='max_length', max_length=t,
                         truncation=True, return_tensors='np')['input_ids']
    return np.asarray(ids, np.int32)

  def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
    """N prompts -> unit-norm float32 embeddings [N, P]."""
    return self._batches(self.tokenize(prompts), _text_embeds)

  def score(self, images: np.ndarray, prompts: Sequence[str]) -> dict:
    """clip_score(image_embeds(images), text_embeds(prompts))."""
    if len(images) != len(prompts):
      raise ValueError(f'ClipScorer.score: {len(images)} images for '
                       f'{len(prompts)} prompts')
    return clip_score(self.image_embeds(images), self.text_embeds(prompts))


def load_tokenizer(path: str):
  """The CLIP tokenizer saved in the CLIP folder `path`."""
  # Deferred: transformers (tokenizers only) is heavy to import.
  import transformers  # pylint: disable=g-import-not-at-top
  if not any(os.path.isfile(os.path.join(path, f))
             for f in ('tokenizer.json', 'vocab.json')):
    raise FileNotFoundError(
        f'{path}: no CLIP tokenizer (tokenizer.json or vocab.json + '
        'merges.txt); save the CLIPProcessor / tokenizer into the CLIP folder '
        '(a snapshot of openai/clip-vit-large-patch14 has them)')
  return transformers.AutoTokenizer.from_pretrained(path)
