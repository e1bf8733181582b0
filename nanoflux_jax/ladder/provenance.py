"""What a ladder rung trained with, and the refusal to resume it otherwise.

A rung's `RungSettings` is the full set of effective settings that define
its result:
  options   the rung's own options (kind, ablation and the kind's options,
            defaults filled in);
  distill   the effective distillation config after the rung's overrides
            (config.distill for DiT rungs, text_encoder.default_config() for
            text-encoder rungs), less the run controls (RUN_CONTROLS:
            stop_after, logging, checkpoint cadence, sharding: they change
            how a run goes, not what it trains);
  context   the base config.distill fields every rung's compression reads
            (grid, text length, sampling steps, prompts);
  teacher   the teacher's identity: config.teacher plus a content hash of
            the files it names (`teacher_identity`).
The ladder writes it to rung_dir/settings.json before the rung's first
piece of work. A resume, of a finished rung or of one stopped mid-training,
compares the record with what the config now gives (`reconcile`) and
raises `SettingsChanged` naming every differing key (old -> new), unless
the ladder config says `accept_changed_settings=True`: then the rung goes on
under the new settings and the change (with the step it came at) is kept in
the record's `changes`, which report.md shows. A rung that saved no training
step yet just records the new settings: nothing was trained under the old.

The record is a frozen value with a JSON form (`to_dict` / `from_dict`), so
that it can become one field of a rung's saved state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections

from nanoflux_jax import atomic
from nanoflux_jax.distill import loop
from nanoflux_jax.ladder import rungs as rungs_lib
SETTINGS_FILE = 'settings.json'
# Cache of the teacher files' hashes, keyed by their sizes and mtimes.
HASH_CACHE_FILE = 'teacher_hash.json'
ACCEPT_FLAG = '--config.accept_changed_settings=True'
# Distill fields that change how a run goes, not what it trains: never
# recorded, never compared (a resume may stop elsewhere, log or checkpoint
# more often, or run on another mesh).
RUN_CONTROLS = ('stop_after', 'profile_steps', 'log_every', 'checkpoint_every',
                'keep_checkpoints', 'async_checkpoint', 'sample_every',
                'sharding_rules', 'mesh', 'data.cache_dir',
                'data.cache_shards')
# The base config.distill fields that the ladder's Context reads for every
# rung (the sampling schedule, the grid, calibration and table prompts).
CONTEXT_FIELDS = ('data.grid', 'data.txt_len', 'num_sampling_steps',
                  'data.prompts')
_ABSENT = '<absent>'


class SettingsChanged(ValueError):
  """A resumed rung was trained under other settings than the config's."""


def _plain(x):
  """A JSON-normal form (tuples -> lists, ConfigDicts -> dicts)."""
  if isinstance(x, ml_collections.ConfigDict):
    x = x.to_dict()
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def flatten(d: Mapping, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; an empty dict stays a leaf."""
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def _without(d: dict, paths) -> dict:
  d = json.loads(json.dumps(d))
  for path in paths:
    *parents, last = path.split('.')
    cur = d
    for p in parents:
      cur = cur.get(p) if isinstance(cur, dict) else None
    if isinstance(cur, dict):
      cur.pop(last, None)
  return d


@dataclasses.dataclass(frozen=True)
class RungSettings:
  """The effective settings of one rung (see the module docstring).

  changes: accepted differences, oldest first: {'step': the trainer step
    the rung had reached (None: none saved), 'finished': whether the rung
    had finished, 'diff': {key: [old, new]}}.
  """
  options: Mapping[str, Any]
  distill: Mapping[str, Any]
  context: Mapping[str, Any]
  teacher: Mapping[str, Any]
  changes: tuple[Mapping[str, Any], ...] = ()

  def flat(self) -> dict[str, Any]:
    """Dotted keys as the messages name them: options bare, the rest under
    'distill.', 'config.distill.' and 'teacher.'."""
    out = flatten(self.options)
    out.update(flatten(self.distill, 'distill.'))
    out.update(flatten(self.context, 'config.distill.'))
    out.update(flatten(self.teacher, 'teacher.'))
    return out

  def diff(self, new: 'RungSettings') -> dict[str, tuple[Any, Any]]:
    """{key: (self's value, new's value)} for every key that differs."""
    a, b = self.flat(), new.flat()
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
            for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(
                k, _ABSENT)}

  def to_dict(self) -> dict:
    return _plain(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, d: Mapping) -> 'RungSettings':
    return cls(options=d['options'], distill=d['distill'],
               context=d['context'], teacher=d['teacher'],
               changes=tuple(d.get('changes', ())))


# ---------------------------------------------------------------------------
# The teacher's identity.
# ---------------------------------------------------------------------------
def _files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


def content_hash(path: str, cache_file: str | None = None) -> str:
  """sha256 over the files under `path` (relative names and bytes).

  Hashing a 12B teacher reads ~34 GB, so the result is cached in
  `cache_file` under the files' names, sizes and mtimes: a rerun only
  stats them. Process 0 writes the cache.
  """
  path = os.path.abspath(path)
  files = _files(path)
  stats = [[os.path.relpath(f, path), os.stat(f).st_size,
            os.stat(f).st_mtime_ns] for f in files]
  key = hashlib.sha256(json.dumps([path, stats]).encode()).hexdigest()
  cache = {}
  if cache_file and os.path.isfile(cache_file):
    try:
      with open(cache_file) as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}  # A torn cache only costs a rehash.
  if key in cache:
    return cache[key]
  logging.info('hashing the teacher files under %s (%d files)', path,
               len(files))
  h = hashlib.sha256()
  for f, (rel, size, _) in zip(files, stats):
    h.update(f'{rel}\0{size}\0'.encode())
    with open(f, 'rb') as fh:
      for chunk in iter(lambda: fh.read(1 << 24), b''):
        h.update(chunk)
  digest = h.hexdigest()
  if cache_file and jax.process_index() == 0:
    cache[key] = digest
    atomic.write_file(cache_file, lambda f: json.dump(cache, f, indent=1))
  return digest


def teacher_identity(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """config.teacher plus 'sha256': {field: content hash} of each file or
  folder it names (path, pipeline), and config.student (the student the
  ladder starts from, when set) with its content hash. A shapes teacher
  trained into the workdir (teacher.shapes) is identified by its training
  config alone: it is trained deterministically from it, and it does not
  exist yet when the first rungs are recorded."""
  t = config.teacher
  files = {k: t.get(k) for k in ('path', 'pipeline') if t.get(k)}
  cache = os.path.join(workdir, HASH_CACHE_FILE)
  out = dict(config=_plain(t), sha256={
      k: content_hash(v, cache) for k, v in sorted(files.items())})
  if config.get('student'):  # The ladder starts from a finished student.
    out['student'] = dict(path=config.student,
                          sha256=content_hash(config.student, cache))
  return out


# ---------------------------------------------------------------------------
# A rung's settings.
# ---------------------------------------------------------------------------
def base_distill(config: ml_collections.ConfigDict, kind: str
                 ) -> ml_collections.ConfigDict | None:
  """The config a rung's `distill` overrides apply to; None for kinds that
  train nothing (their overrides are recorded as given)."""
  return rungs_lib.RUNG_KINDS[kind].base_distill(config)


def effective_distill(config: ml_collections.ConfigDict, rung: Mapping
                      ) -> dict:
  """The rung's distillation config after its overrides, run controls out."""
  base = base_distill(config, rung['kind'])
  if base is None:
    return _plain(dict(rung.get('distill') or {}))
  rungs_lib.override(base, rung.get('distill') or {}, 'distill')
  return _without(_plain(base), RUN_CONTROLS)


def rung_settings(config: ml_collections.ConfigDict, rung: Mapping,
                  teacher: Mapping, workdir: str = '') -> RungSettings:
  """The settings `rung` (a `ladder.check_config` entry) trains with.

  teacher: `teacher_identity(config, workdir)`. A text-encoder rung's own
  teacher T5 folder (option teacher_t5) adds its content hash to it.
  """
  options = {k: v for k, v in rung.items() if k != 'distill'}
  if rung.get('teacher_t5'):
    teacher = dict(teacher, teacher_t5_sha256=content_hash(
        rung['teacher_t5'], os.path.join(workdir, HASH_CACHE_FILE)
        if workdir else None))
  context = {}
  for path in CONTEXT_FIELDS:
    cur = config.distill
    for part in path.split('.'):
      cur = cur.get(part) if cur is not None else None
    context[path] = cur
  return RungSettings(options=_plain(options),
                      distill=effective_distill(config, rung),
                      context=_plain(context), teacher=_plain(teacher))


def read(rung_dir: str) -> RungSettings | None:
  path = os.path.join(rung_dir, SETTINGS_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return RungSettings.from_dict(json.load(f))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: unreadable rung settings ({e}); delete the '
                     'rung folder to retrain it, or use a new workdir') from e


def write_record(rung_dir: str, settings: RungSettings) -> None:
  if jax.process_index() == 0:
    atomic.write_file(os.path.join(rung_dir, SETTINGS_FILE), lambda f: f.write(
        json.dumps(settings.to_dict(), indent=2, sort_keys=True)))


def _fmt(v) -> str:
  return json.dumps(v, sort_keys=True) if not isinstance(v, str) or (
      v == _ABSENT) else repr(v)


def reconcile(rung_dir: str, recorded: RungSettings | None,
              current: RungSettings, *, step: int | None, finished: bool,
              accept: bool) -> RungSettings | None:
  """The record to write before the rung goes on, or None (unchanged).

  Args:
    recorded: rung_dir's record (None: the rung never started).
    current: what the config gives now.
    step: the rung's newest trainer checkpoint step (None: none saved).
    finished: the rung has its done.json.
    accept: config.accept_changed_settings.
  Raises:
    SettingsChanged: the rung trained (a saved step, or finished) under
      settings that differ from `current`, and `accept` is False.
  """
  if recorded is None:
    return current
  diff = recorded.diff(current)
  if not diff:
    return None
  if step is None and not finished:  # Nothing trained yet: just re-record.
    return dataclasses.replace(current, changes=recorded.changes)
  lines = '\n'.join(f'  {k}: {_fmt(a)} -> {_fmt(b)}'
                    for k, (a, b) in diff.items())
  state = 'finished' if finished else f'trained to step {step}'
  if not accept:
    raise SettingsChanged(
        f'{rung_dir} was {state} with other settings than the config now '
        f'gives ({len(diff)} differ, recorded -> now):\n{lines}\n'
        'To train with the new settings, use a new --workdir (or delete this '
        'rung folder and the ones after it). To go on with this rung as it '
        f'is under the new settings, rerun with {ACCEPT_FLAG}: the change is '
        f'then recorded in its {SETTINGS_FILE} and report.md.')
  change = dict(step=step, finished=finished,
                diff={k: [a, b] for k, (a, b) in diff.items()})
  return dataclasses.replace(current, changes=recorded.changes + (
      _plain(change),))


def marker_key(rung: Mapping) -> dict:
  """The rung options done.json stores (from before settings.json; kept
  for the workdirs of older versions)."""
  d = dict(rung, distill={k: v for k, v in rung['distill'].items()
                          if k != 'stop_after'})
  if not d['ablation']:  # Markers from before rungs had the option.
    del d['ablation']
  return _plain(d)


def check_rung(config: ml_collections.ConfigDict, workdir: str,
               rung_dir: str, rung: Mapping, teacher: Mapping,
               done: Mapping | None, *, write: bool) -> RungSettings | None:
  """The ladder's check of one rung before it runs (or is skipped).

  Compares rung_dir's record with what the config gives now (`reconcile`)
  and, with `write`, (re)writes it. Without `write` (the ladder's check of
  every rung before any work) a rung that never started is not touched.
  done: the rung's done.json (None: unfinished). A rung finished by an
  older version has no record: its done.json options are compared as
  before, and the current settings recorded (unverified).
  Returns:
    The rung's record (None: not started, and not `write`).
  """
  recorded = read(rung_dir)
  if not write and recorded is None and done is None:
    return None
  current = rung_settings(config, rung, teacher, workdir)
  # Through the checkpoint manager, on every process (a collective).
  step = None if done is not None else loop.latest_step(rung_dir)
  if recorded is None and done is not None:
    if done['rung'] != marker_key(rung):
      raise ValueError(
          f'ladder: {rung_dir} was finished with options {done["rung"]} '
          f'but the config now says {marker_key(rung)}; use a new workdir '
          'or delete that rung folder and the ones after it')
    logging.warning('ladder: %s has no %s (finished by an older version); '
                    'recording the current settings, unverified', rung_dir,
                    SETTINGS_FILE)
    recorded = current
  new = reconcile(rung_dir, recorded, current, step=step,
                  finished=done is not None,
                  accept=bool(config.get('accept_changed_settings', False)))
  if new is not None and write:
    if recorded is not None and len(new.changes) > len(recorded.changes):
      logging.warning('ladder: %s: accepted and recorded changed settings '
                      '(accept_changed_settings): %s', rung_dir,
                      new.changes[-1]['diff'])
    write_record(rung_dir, new)
  return new or recorded


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------
def summary(settings: RungSettings, config: ml_collections.ConfigDict
            ) -> dict:
  """{'non_default': {key: value}, 'changes': [...]}: the rung's settings
  that differ from its kind's option defaults and from the config's base
  distillation config (config.distill, or text_encoder.default_config())."""
  kind = settings.options.get('kind')
  spec = rungs_lib.RUNG_KINDS.get(kind)
  defaults = flatten(_plain(dict(spec.defaults if spec else {},
                                  ablation=False)))
  out = {k: v for k, v in flatten(settings.options).items()
         if k != 'kind' and defaults.get(k, _ABSENT) != v}
  base = base_distill(config, kind) if spec else None
  base = {} if base is None else flatten(_without(_plain(base),
                                                  RUN_CONTROLS))
  for k, v in flatten(settings.distill).items():
    if base.get(k, _ABSENT) != v:
      out[f'distill.{k}'] = v
  return dict(non_default=out, changes=list(settings.changes))


def markdown(rows: list[dict]) -> str:
  """The report section: per rung, the settings that differ from the
  defaults and every accepted change."""
  lines = ['## Rung settings', '',
           'Per rung, the settings it trained with that differ from the '
           "defaults (its kind's options; config.distill, or the text "
           'encoder\'s default config); the full record is '
           f'rung_*/{SETTINGS_FILE}.', '']
  for r in rows:
    s = r.get('settings')
    if s is None:
      continue
    nd = ', '.join(f'{k}={_fmt(v)}' for k, v in sorted(
        s['non_default'].items())) or 'defaults'
    lines.append(f"- {r['name']}: {nd}")
    for c in s['changes']:
      when = ('after it finished' if c['finished'] else
              f"at step {c['step']}")
      what = '; '.join(f'{k} {_fmt(a)} -> {_fmt(b)}'
                       for k, (a, b) in c['diff'].items())
      lines.append(f'  - accepted {when} (accept_changed_settings): {what}')
  return '\n'.join(lines)
