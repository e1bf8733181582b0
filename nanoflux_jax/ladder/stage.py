"""What one rung of the ladder hands the next: a frozen `Stage`.

A stage names everything a rung may change besides the DiT's parameter
values: the DiT's config and the checkpoint that holds its values, the
teacher block each student block descends from, the student text encoder
and the number of sampling steps (the schedule follows from those, through
`sampling.schedule_for`). Rungs take a stage and return a new one
(`dataclasses.replace`); nothing else carries state between rungs.

A finished rung saves its stage as rung_dir/stage.json, and a rung that has
compressed but not finished training saves the compressed stage as
rung_dir/compressed.json, so a resumed ladder restores both. Paths are
stored relative to the workdir, so a workdir can be moved.
"""
from __future__ import annotations

import dataclasses
import json
import os

from nanoflux_jax import atomic
from nanoflux_jax import sampling
from nanoflux_jax.configs import FluxConfig

STAGE_FILE = 'stage.json'            # a finished rung's stage.
COMPRESSED_FILE = 'compressed.json'  # the stage right after compressing.


@dataclasses.dataclass(frozen=True)
class Stage:
  """A rung's input and output (see the module docstring).

  dit_config: the DiT's config (per-block widths, modulation, ...).
  dit: folder of the nanoflux checkpoint holding the DiT's values; None for
    the ladder's teacher (its values come from config.teacher).
  teacher_blocks: the teacher block each student block descends from
    (global indices, double blocks first); None while the student has the
    teacher's blocks.
  text_encoder: the student T5 folder the pipeline uses; None: the teacher's.
  num_steps: Euler steps the DiT samples with.
  grid: the packed-latent token grid (height, width).
  """
  dit_config: FluxConfig
  num_steps: int
  grid: tuple[int, int]
  dit: str | None = None
  teacher_blocks: tuple[int, ...] | None = None
  text_encoder: str | None = None

  @property
  def schedule(self) -> tuple[float, ...]:
    """num_steps + 1 timesteps from 1 to 0 (sampling.schedule_for)."""
    return tuple(float(t) for t in sampling.schedule_for(
        self.dit_config, self.num_steps, self.grid[0] * self.grid[1]))

  def to_dict(self, workdir: str) -> dict:
    """JSON-ready; paths relative to workdir."""
    rel = lambda p: None if p is None else os.path.relpath(p, workdir)
    return dict(dit_config=json.loads(self.dit_config.to_json()),
                num_steps=self.num_steps, grid=list(self.grid),
                dit=rel(self.dit), text_encoder=rel(self.text_encoder),
                teacher_blocks=None if self.teacher_blocks is None else list(
                    self.teacher_blocks))

  @classmethod
  def from_dict(cls, d: dict, workdir: str) -> 'Stage':
    path = lambda p: None if p is None else os.path.join(workdir, p)
    blocks = d['teacher_blocks']
    return cls(dit_config=FluxConfig.from_json(json.dumps(d['dit_config'])),
               num_steps=int(d['num_steps']), grid=tuple(d['grid']),
               dit=path(d['dit']), text_encoder=path(d['text_encoder']),
               teacher_blocks=None if blocks is None else tuple(blocks))


def save(path: str, stage: Stage, workdir: str, **extra) -> None:
  """Writes {'stage': ..., **extra} to path atomically."""
  text = json.dumps(dict(extra, stage=stage.to_dict(workdir)), indent=2)
  atomic.write_file(path, lambda f: f.write(text))


def load(path: str, workdir: str) -> tuple[Stage, dict] | None:
  """(stage, the file's other fields) from `save`; None if path is absent.

  Raises:
    ValueError: naming the file, when it is not a saved stage.
  """
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    d = json.load(f)
  try:
    return Stage.from_dict(d.pop('stage'), workdir), d
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}: not a ladder stage file ({e!r})') from e
