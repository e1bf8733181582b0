"""The "shapes" world: an infinite, seedable captioned-image toy world.

Each scene has a background colour and one or two objects, each with a
shape, colour, position and size, e.g. "a small red circle on the left, a
large blue square on the right, on a yellow background". It is the built-in
default for running the whole NanoFLUX recipe on a laptop CPU: attributes
are known exactly, so generations can be scored (toy-GenEval) without a
learned judge of text-image agreement.

Scene i of a world with seed s is a pure function of (s, i).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'star', 'diamond')
COLOURS = {
    'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220),
    'yellow': (240, 210, 40), 'purple': (140, 60, 190),
    'orange': (245, 140, 30), 'white': (245, 245, 245),
    'black': (20, 20, 20),
}
POSITIONS = {  # centre of the object, as a fraction of the image size.
    'left': (0.25, 0.5), 'right': (0.75, 0.5), 'top': (0.5, 0.25),
    'bottom': (0.5, 0.75), 'centre': (0.5, 0.5)}
SIZES = {'small': 0.1, 'large': 0.18}  # half-extent / image size.
_POSITION_PHRASE = {'left': 'on the left', 'right': 'on the right',
                    'top': 'at the top', 'bottom': 'at the bottom',
                    'centre': 'in the centre'}
_SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges.


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  colour: str
  position: str
  size: str


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]
  background: str

  @property
  def caption(self) -> str:
    parts = [f'a {o.size} {o.colour} {o.shape} {_POSITION_PHRASE[o.position]}'
             for o in self.objects]
    article = 'an' if self.background[0] in 'aeiou' else 'a'
    return ', '.join(parts) + f', on {article} {self.background} background'

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def random_scene(rng: np.random.Generator) -> Scene:
  """Draws a scene: 1-2 objects at distinct positions, distinct colours."""
  n = int(rng.integers(1, 3))
  if n == 1:
    positions = [str(rng.choice(list(POSITIONS)))]
  else:  # The centre would overlap a second object, so pairs avoid it.
    positions = [str(p) for p in rng.choice(
        [p for p in POSITIONS if p != 'centre'], size=2, replace=False)]
  colours = [str(c) for c in rng.choice(list(COLOURS), size=n + 1,
                                         replace=False)]
  objects = tuple(
      Obj(str(rng.choice(SHAPES)), colours[i], positions[i],
          str(rng.choice(list(SIZES)))) for i in range(n))
  return Scene(objects, background=colours[n])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple]:
  if shape == 'square':
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == 'diamond':
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
  if shape == 'triangle':
    return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
  if shape == 'star':
    pts = []
    for k in range(10):
      rad = r if k % 2 == 0 else r * 0.45
      a = -np.pi / 2 + k * np.pi / 5
      pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts
  raise ValueError(f'shapes: unknown shape {shape!r}; known: {SHAPES}')


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
  """Draws a scene -> uint8 [resolution, resolution, 3]."""
  size = resolution * _SUPERSAMPLE
  img = Image.new('RGB', (size, size), COLOURS[scene.background])
  draw = ImageDraw.Draw(img)
  for o in scene.objects:
    fx, fy = POSITIONS[o.position]
    cx, cy, r = fx * size, fy * size, SIZES[o.size] * size
    if o.shape == 'circle':
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[o.colour])
    else:
      draw.polygon(_polygon(o.shape, cx, cy, r), fill=COLOURS[o.colour])
  img = img.resize((resolution, resolution), Image.LANCZOS)
  return np.asarray(img, np.uint8)


class ShapesWorld:
  """Deterministic, infinite stream of (image, caption, scene).

  Args:
    seed: world seed; scene i depends only on (seed, i).
    resolution: image side in pixels.
  """

  def __init__(self, seed: int = 0, resolution: int = 64):
    self.seed, self.resolution = int(seed), int(resolution)

  def scene(self, index: int) -> Scene:
    return random_scene(np.random.default_rng([self.seed, int(index)]))

  def example(self, index: int) -> tuple[np.ndarray, str, Scene]:
    s = self.scene(index)
    return render(s, self.resolution), s.caption, s

  def batch(self, start: int, size: int) -> tuple[np.ndarray, list[str],
                                                  list[Scene]]:
    """Scenes start..start+size-1 -> (uint8 [N, R, R, 3], captions, scenes)."""
    out = [self.example(i) for i in range(start, start + size)]
    return (np.stack([o[0] for o in out]), [o[1] for o in out],
            [o[2] for o in out])

  def captions(self, num: int, start: int = 0) -> list[str]:
    """Captions of scenes start..start+num-1 (nothing is rendered)."""
    return [self.scene(i).caption for i in range(start, start + num)]

  def __iter__(self) -> Iterator[tuple[np.ndarray, str, Scene]]:
    i = 0
    while True:
      yield self.example(i)
      i += 1


def vocabulary() -> list[str]:
  """Every word a caption can use (for fitting a tokenizer)."""
  words = set('a an on the at in of background'.split())
  words |= set(SHAPES) | set(COLOURS) | set(SIZES)
  for phrase in _POSITION_PHRASE.values():
    words |= set(phrase.split())
  return sorted(words)


# ---------------------------------------------------------------------------
# Trained artefacts shipped with the package (nanoflux_jax/data/assets).
# ---------------------------------------------------------------------------
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')


def _asset(name: str) -> str:
  path = os.path.join(_ASSETS, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: the shipped {name} is missing from this '
                            'installation (see its README in the repository)')
  return path


def teacher_path() -> str:
  """The shipped shapes-world teacher: a `FluxPipeline` folder (9.7 MB).

  Load it with `nf.FluxPipeline.from_pretrained(teacher_path())`. A FLUX DiT
  (hidden 128, 2 double + 4 single blocks, 2.3M parameters) over 8x8 tokens
  of a PCA patch autoencoder, a word-level T5 pretrained on the captions'
  structure (distill/shapes_encoders.py) and a random CLIP, both frozen.
  Trained with rectified flow for 6000 steps at batch 32 on 2 CPU cores
  (80 minutes) by

    python experiments/train_shapes_teacher.py \
        --config=experiments/configs/shapes.py:teacher \
        --workdir=/tmp/shapes_teacher \
        --out=nanoflux_jax/data/assets/shapes_teacher

  toy-GenEval on 512 held-out prompts (world 1000, 8 Euler steps): 0.984,
  95% CI [0.969, 0.992]; two-object prompts 0.977 [0.951, 0.990] (n=264).
  assets/shapes_teacher/README.md has the full record.
  """
  return _asset('shapes_teacher')


def classifier_path() -> str:
  """The shipped toy-GenEval judge (`evaluate.classifier.Classifier.load`).

  Reproduced by `python experiments/train_shapes_classifier.py` (1500 steps
  at batch 64 on scenes of world 10000, about a minute on 2 CPU cores); its
  accuracy on real renderings is in assets/shapes_classifier/README.md.
  """
  return _asset('shapes_classifier')
