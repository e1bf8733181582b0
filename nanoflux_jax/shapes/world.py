"""The "shapes" world: an infinite, seedable captioned-image toy world.

Each scene has a background colour and one or two objects, each with a
shape, colour, position and size, e.g. "a small red circle on the left, a
large blue square on the right, on a yellow background". It is the built-in
default for running the whole NanoFLUX recipe on a laptop CPU: attributes
are known exactly, so generations can be scored (toy-GenEval) without a
learned judge of text-image agreement.

Two worlds (`WORLDS`): 'shapes', the classic one above (64 px, 8x8 image
tokens, 1-2 objects at 5 positions), and 'shapes9', a harder one with room
for token down-sampling (128 px, 16x16 tokens, 1-3 objects on a 3x3 grid of
9 positions, "a small red circle at the top left, ..."). A prompt source
'<world>:N[:seed]' names the captions of a world's first N scenes.

Scene i of a world with seed s is a pure function of (world, s, i).
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
# The classic world's geometry (world 'shapes'); kept as module constants
# because the shipped teacher, classifier and reports are built on it.
POSITIONS = {  # centre of the object, as a fraction of the image size.
    'left': (0.25, 0.5), 'right': (0.75, 0.5), 'top': (0.5, 0.25),
    'bottom': (0.5, 0.75), 'centre': (0.5, 0.5)}
SIZES = {'small': 0.1, 'large': 0.18}  # half-extent / image size.
_POSITION_PHRASE = {'left': 'on the left', 'right': 'on the right',
                    'top': 'at the top', 'bottom': 'at the bottom',
                    'centre': 'in the centre',
                    'top left': 'at the top left',
                    'top right': 'at the top right',
                    'bottom left': 'at the bottom left',
                    'bottom right': 'at the bottom right'}
_SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges.


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """The geometry of a shapes world.

  Attributes:
    name: the world's name (Scene.world, prompt sources '<name>:N[:seed]').
    positions: ((name, (fx, fy)), ...) object centres as fractions of the
      image side, in label order (classifier / judge heads).
    sizes: ((name, half-extent / image side), ...).
    max_objects: objects per scene are drawn from 1..max_objects.
    resolution: the default image side in pixels.
  """
  name: str
  positions: tuple[tuple[str, tuple[float, float]], ...]
  sizes: tuple[tuple[str, float], ...]
  max_objects: int
  resolution: int

  @property
  def position_names(self) -> tuple[str, ...]:
    return tuple(p for p, _ in self.positions)

  @property
  def size_names(self) -> tuple[str, ...]:
    return tuple(s for s, _ in self.sizes)

  def centre(self, position: str) -> tuple[float, float]:
    return dict(self.positions)[position]

  def half_extent(self, size: str) -> float:
    return dict(self.sizes)[size]


# 'shapes': today's world (64 px, 8x8 tokens): 1-2 objects, 5 positions.
# 'shapes9': the harder world for 16x16 tokens (128 px with the 4x4-patch
# codec and 2x2 packing): 1-3 objects on a 3x3 grid of 9 positions ("at the
# top left", ...). Its centres are 0.32 apart and its large objects 0.26
# wide, so neighbours never touch; small objects are 18 px wide at 128 px
# (2.3 tokens), about what the classic world's small ones are at 64 px
# (13 px, 1.6 tokens).
_THIRDS = (0.18, 0.5, 0.82)
WORLDS = {
    'shapes': WorldSpec('shapes', tuple(POSITIONS.items()),
                        tuple(SIZES.items()), max_objects=2, resolution=64),
    'shapes9': WorldSpec(
        'shapes9',
        tuple((f'{row} {col}'.strip() if (row or col) else 'centre', (fx, fy))
              for row, fy in zip(('top', '', 'bottom'), _THIRDS)
              for col, fx in zip(('left', '', 'right'), _THIRDS)),
        (('small', 0.07), ('large', 0.13)), max_objects=3, resolution=128),
}


def world_spec(world: str | WorldSpec) -> WorldSpec:
  """The WorldSpec named `world` (a WorldSpec passes through)."""
  if isinstance(world, WorldSpec):
    return world
  if world not in WORLDS:
    raise ValueError(f'shapes: unknown world {world!r}; known: '
                     f'{sorted(WORLDS)}')
  return WORLDS[world]


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
  world: str = 'shapes'   # the WORLDS entry whose geometry renders it.

  @property
  def caption(self) -> str:
    parts = [f'a {o.size} {o.colour} {o.shape} {_POSITION_PHRASE[o.position]}'
             for o in self.objects]
    article = 'an' if self.background[0] in 'aeiou' else 'a'
    return ', '.join(parts) + f', on {article} {self.background} background'

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def random_scene(rng: np.random.Generator, world: str = 'shapes') -> Scene:
  """Draws a scene of `world`: objects at distinct positions, distinct
  colours (objects and background)."""
  spec = world_spec(world)
  if spec.name == 'shapes':
    return _random_classic_scene(rng)
  n = int(rng.integers(1, spec.max_objects + 1))
  positions = [str(p) for p in rng.choice(list(spec.position_names), size=n,
                                          replace=False)]
  colours = [str(c) for c in rng.choice(list(COLOURS), size=n + 1,
                                         replace=False)]
  objects = tuple(
      Obj(str(rng.choice(SHAPES)), colours[i], positions[i],
          str(rng.choice(list(spec.size_names)))) for i in range(n))
  return Scene(objects, background=colours[n], world=spec.name)


def _random_classic_scene(rng: np.random.Generator) -> Scene:
  """The classic world's draw (unchanged: scene i of seed s is what the
  shipped teacher and reports were made from)."""
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


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple]:
  """The outline of a non-circle shape of half-extent r centred at (cx, cy)."""
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


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float,
               r: float, fill) -> None:
  if shape == 'circle':
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  else:
    draw.polygon(polygon(shape, cx, cy, r), fill=fill)


def render(scene: Scene, resolution: int | None = None) -> np.ndarray:
  """Draws a scene -> uint8 [resolution, resolution, 3] (default: its
  world's resolution)."""
  spec = world_spec(scene.world)
  resolution = resolution or spec.resolution
  size = resolution * _SUPERSAMPLE
  img = Image.new('RGB', (size, size), COLOURS[scene.background])
  draw = ImageDraw.Draw(img)
  for o in scene.objects:
    fx, fy = spec.centre(o.position)
    draw_shape(draw, o.shape, fx * size, fy * size,
               spec.half_extent(o.size) * size, COLOURS[o.colour])
  img = img.resize((resolution, resolution), Image.LANCZOS)
  return np.asarray(img, np.uint8)


class ShapesWorld:
  """Deterministic, infinite stream of (image, caption, scene).

  Args:
    seed: world seed; scene i depends only on (seed, i) (and the world).
    resolution: image side in pixels; None: the world's (64 for 'shapes',
      128 for 'shapes9').
    world: a `WORLDS` name.
  """

  def __init__(self, seed: int = 0, resolution: int | None = None,
               world: str = 'shapes'):
    self.spec = world_spec(world)
    self.world = self.spec.name
    self.seed = int(seed)
    self.resolution = int(resolution or self.spec.resolution)

  def scene(self, index: int) -> Scene:
    return random_scene(np.random.default_rng([self.seed, int(index)]),
                        self.world)

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


def parse_source(source) -> tuple[str, int, int] | None:
  """A prompt source '<world>:N[:seed]' ('shapes:4096', 'shapes9:16:1') ->
  (world, N, seed); None when `source` names no shapes world.

  Raises:
    ValueError: a shapes source with a malformed N or seed (names it).
  """
  if (not isinstance(source, str) or ':' not in source or
      source.split(':')[0] not in WORLDS):
    return None
  world, *parts = source.split(':')
  try:
    num, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
  except (ValueError, IndexError):
    num = seed = -1
  if len(parts) > 2 or num < 1 or seed < 0:
    raise ValueError(f'prompt source {source!r}: expected {world}:N or '
                     f'{world}:N:seed with N >= 1 (shapes:N for the classic '
                     'world)')
  return world, num, seed


def vocabulary(world: str = 'shapes') -> list[str]:
  """Every word a caption of `world` can use (for fitting a tokenizer)."""
  spec = world_spec(world)
  words = set('a an on the at in of background'.split())
  words |= set(SHAPES) | set(COLOURS) | set(spec.size_names)
  for p in spec.position_names:
    words |= set(_POSITION_PHRASE[p].split())
  return sorted(words)


# ---------------------------------------------------------------------------
# Trained artefacts shipped with the package (nanoflux_jax/shapes/assets).
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
  structure (shapes/t5_pretrain.py) and a random CLIP, both frozen.
  Trained with rectified flow for 6000 steps at batch 32 on 2 CPU cores
  (80 minutes) by

    python experiments/train_shapes_teacher.py \
        --config=experiments/configs/shapes.py:teacher \
        --workdir=/tmp/shapes_teacher \
        --out=nanoflux_jax/shapes/assets/shapes_teacher

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
