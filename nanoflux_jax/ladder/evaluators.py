"""Evaluators of the ladder's stages, looked up by name (big_vision style).

`config.evaluate` is a list of dicts, each `{type, every, ...options}`:

  config.evaluate = [dict(type='clip', every=1, clip_path='/ckpt/clip',
                          prompts='/data/eval_prompts.txt')]

`type` names a registered evaluator, `every` N evaluates every N-th rung
(1: every rung; the teacher and the last rung always), the other keys are
the evaluator's options (its `defaults` fill the rest). `run` is called by
the ladder after every finished rung; each due stage that lacks a result
gets one, cached in {stage dir}/eval_{type}.json under a key of the options
and the stage (its sampling steps and schedule), so a resumed ladder
computes only what is new. Results land in report.json as

  report['evaluation'][type] = {'options': ..., 'setup': ...,
                                'rows': {stage name: {metric: value}}}

and `markdown` renders one section per type in report.md.

Adding an evaluator is one function and its registration:

  @evaluators.register_evaluator('my_metric', defaults={'num': 8})
  def my_metric(ctx, subject, opts, done) -> dict:
    cfg, params = subject.load()   # the stage's DiT; subject.stage: Stage
    return {'score': ...}          # JSON-ready metrics of this stage

`check(config, opts, where)` (raise naming `where` on a bad option, before
any work), `summary(ctx, opts) -> dict` (the report's setup line, computed
with the teacher's result and cached with it), `markdown(section, rows) ->
str` (default: one table of the scalar metrics) and `report_only` (options
that only change the report, not the metrics: left out of the cache key)
are optional. The built-in evaluators are registered in evaluator_list.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import ml_collections

from nanoflux_jax import atomic
from nanoflux_jax.ladder.rungs import RUNG_KINDS, Student
from nanoflux_jax.ladder.stage import Stage

# Keys every config.evaluate entry takes besides its evaluator's options.
_COMMON = ('type', 'every')


@dataclasses.dataclass(frozen=True)
class Subject:
  """One stage as an evaluator sees it.

  index: 0 for the teacher, i + 1 for rung i.
  name, row: its report row's name ('teacher', 'rung_3_prune') and the row.
  role: its rung kind's role ('denoiser', 'text_encoder', 'export'); None
    for the teacher.
  dir: its folder (results and caches go there).
  load: () -> (cfg, params) of its DiT, loaded on first use.
  text_encoder: its student T5 folder; None: the teacher's T5.
  exports: an export rung's {quantization: {'dir', 'mb'}}; else None.
  key: what its results depend on besides the options (stage_key).
  """
  index: int
  name: str
  row: Mapping[str, Any]
  role: str | None
  dir: str
  load: Callable[[], Student]
  text_encoder: str | None
  exports: Mapping[str, Any] | None
  key: Mapping[str, Any]
  _stage: Stage | None
  _ctx: Any = dataclasses.field(repr=False, compare=False)

  @property
  def stage(self) -> Stage:
    """Its Stage (the teacher's is built on first use: it loads the
    teacher)."""
    return self._stage or self._ctx.teacher_stage

  @property
  def num_steps(self) -> int:
    """Euler steps it samples with (a student may take fewer than the
    teacher)."""
    return (self._stage.num_steps if self._stage is not None else
            int(self._ctx.config.distill.num_sampling_steps))


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """evaluate(ctx, subject, opts, done) -> metrics; see the module
  docstring for the rest. done: [(Subject, metrics)] of the stages before
  this one that this evaluator scored, the teacher first."""
  name: str
  evaluate: Callable[..., dict]
  defaults: Mapping[str, Any]
  check: Callable[..., None] | None = None
  summary: Callable[..., dict] | None = None
  markdown: Callable[..., str] | None = None
  report_only: tuple[str, ...] = ()


EVALUATORS: dict[str, Evaluator] = {}


def register_evaluator(name: str, *, defaults: Mapping[str, Any], check=None,
                       summary=None, markdown=None, report_only=()):
  """Decorator adding evaluate fn(ctx, subject, opts, done) to
  EVALUATORS[name]."""
  if name in EVALUATORS:
    raise ValueError(f'register_evaluator: {name!r} is already registered')
  clash = sorted(set(defaults) & set(_COMMON))
  if clash:
    raise ValueError(f'register_evaluator({name!r}): options {clash} are '
                     'reserved')

  def deco(fn):
    EVALUATORS[name] = Evaluator(name, fn, dict(defaults), check, summary,
                                 markdown, tuple(report_only))
    return fn
  return deco


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------
def _plain(v):
  """JSON-ready: ConfigDicts and mappings to dicts, tuples to lists."""
  if isinstance(v, ml_collections.ConfigDict):
    v = v.to_dict()
  if isinstance(v, Mapping):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return v


def check_config(config) -> list[tuple[Evaluator, dict]]:
  """config.evaluate as (evaluator, options with defaults filled in) pairs.

  Raises:
    ValueError (or the evaluator's own check's error) naming the list index
    and the offending type or key, before any work.
  """
  raw = config.get('evaluate') or []
  if isinstance(raw, (Mapping, ml_collections.ConfigDict)):
    raise ValueError('ladder: config.evaluate must be a list of '
                     "{'type': ..., 'every': ..., ...} dicts, got a dict with "
                     f'keys {sorted(raw.keys())}')
  out, seen = [], {}
  for i, entry in enumerate(raw):
    where = f'config.evaluate[{i}]'
    if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
      raise ValueError(f'{where}: expected a dict, got {entry!r}')
    entry = _plain(entry)
    kind = entry.get('type')
    if kind not in EVALUATORS:
      raise ValueError(f'{where}: unknown type {kind!r}; registered: '
                       f'{sorted(EVALUATORS)}')
    if kind in seen:
      raise ValueError(f'{where}: type {kind!r} is already at index '
                       f'{seen[kind]}; one entry per type')
    seen[kind] = i
    ev = EVALUATORS[kind]
    extra = sorted(set(entry) - set(ev.defaults) - set(_COMMON))
    if extra:
      raise ValueError(f'{where} ({kind!r}): unknown keys {extra}; {kind} '
                       f'takes {sorted(ev.defaults)} and {list(_COMMON)}')
    every = entry.get('every', 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f'{where} ({kind!r}): every={every!r} must be an '
                       'integer >= 1')
    opts = {**_plain(ev.defaults), **entry, 'every': every}
    if ev.check is not None:
      ev.check(config, opts, f'{where} ({kind!r})')
    out.append((ev, opts))
  return out


# ---------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------
def stage_key(ctx, item: Mapping) -> dict:
  """What a stage's results depend on besides the evaluator options: its
  sampling steps and schedule, the token grid and text length, and its DiT
  and text-encoder folders (workdir-relative). The teacher's schedule
  follows from config.teacher and its steps, which stand in for it, so a
  resumed ladder need not load the teacher to check its cache."""
  c = ctx.config
  key = dict(grid=list(ctx.grid), txt_len=int(c.distill.data.txt_len))
  st = item.get('stage')
  if st is None:
    return dict(key, teacher=_plain(c.teacher),
                num_steps=int(c.distill.num_sampling_steps))
  rel = lambda p: None if p is None else os.path.relpath(p, ctx.workdir)
  return dict(key, num_steps=st.num_steps, schedule=list(st.schedule),
              dit=rel(st.dit), text_encoder=rel(st.text_encoder))


def subjects(ctx, stages: list[dict]) -> list[Subject]:
  """The ladder's stage dicts (runner.py: row, dit, text_encoder, stage,
  dir, exports; the teacher first) as Subjects."""
  out = []
  for i, s in enumerate(stages):
    row = s['row']
    kind = RUNG_KINDS.get(row.get('kind'))
    out.append(Subject(
        i, row['name'], row, None if i == 0 else (kind and kind.role),
        s['dir'], s['dit'], s.get('text_encoder'), s.get('exports'),
        stage_key(ctx, s), s.get('stage'), ctx))
  return out


def due(index: int, every: int, num_rungs: int) -> bool:
  """Whether stage `index` (0: the teacher, i + 1: rung i) is evaluated:
  the teacher, every `every`-th rung and the last rung."""
  return index == 0 or index % every == 0 or index == num_rungs


def result_file(stage_dir: str, name: str) -> str:
  return os.path.join(stage_dir, f'eval_{name}.json')


def _read(path: str):
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)


def run(ctx, stages: list[dict], report: dict) -> bool:
  """Evaluates every due stage that lacks a result (see the module
  docstring); fills report['evaluation'].

  Args:
    ctx: the ladder's rungs.Context.
    stages: the ladder's stage dicts so far, the teacher first.
    report: the report dict; gets report['evaluation'][type].
  Returns:
    True when the report changed (the caller rewrites it).
  """
  entries = check_config(ctx.config)
  if not entries:
    return False
  num_rungs = len(ctx.config.rungs)
  subs = subjects(ctx, stages)
  changed = False
  for ev, opts in entries:
    section = report.setdefault('evaluation', {}).setdefault(
        ev.name, dict(options=opts, setup=None, rows={}))
    key_opts = {k: v for k, v in opts.items()
                if k not in ev.report_only + ('every',)}
    done = []
    for sub in subs:
      if not due(sub.index, opts['every'], num_rungs):
        continue
      if sub.name in section['rows']:
        done.append((sub, section['rows'][sub.name]))
        continue
      key = dict(options=key_opts, stage=sub.key)
      file = result_file(sub.dir, ev.name)
      cached = _read(file)
      if cached is not None and cached.get('key') == key:
        metrics, setup = cached['metrics'], cached.get('setup')
      else:
        logging.info('ladder: evaluating %s (%s)', sub.name, ev.name)
        # Through JSON: a fresh result equals the one a rerun reads back.
        metrics = json.loads(json.dumps(ev.evaluate(ctx, sub, opts,
                                                    list(done))))
        setup = json.loads(json.dumps(
            ev.summary(ctx, opts) if ev.summary is not None and
            sub.index == 0 else None))
        if jax.process_index() == 0:  # Every host computes the same.
          os.makedirs(sub.dir, exist_ok=True)
          atomic.write_file(file, lambda f, m=metrics, s=setup: json.dump(
              dict(key=key, metrics=m, setup=s), f, indent=2))
        logging.info('ladder: %s: %s: %s', sub.name, ev.name, metrics)
      if sub.index == 0:
        section['setup'] = setup
      section['rows'][sub.name] = metrics
      done.append((sub, metrics))
      changed = True
  return changed


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------
def _fmt(v) -> str:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return '-' if v is None else str(v)
  return format(v, '.4g')


def table(section: dict, rows: list[dict], title: str) -> str:
  """The default section: one row per evaluated stage, one column per
  scalar metric."""
  results = section.get('rows') or {}
  cols = []
  for r in rows:
    for k, v in (results.get(r['name']) or {}).items():
      if k not in cols and (v is None or isinstance(v, (int, float, str))):
        cols.append(k)
  opts = {k: v for k, v in (section.get('options') or {}).items()
          if k != 'type'}
  out = [f'## {title}', '', f'Options: {json.dumps(opts, sort_keys=True)}.',
         '', '| rung | kind | ' + ' | '.join(cols) + ' |',
         '|---|---|' + '---:|' * len(cols)]
  for r in rows:
    m = results.get(r['name'])
    if m is not None:
      out.append(f"| {r['name']} | {r.get('kind', '-')} | " + ' | '.join(
          _fmt(m.get(k)) for k in cols) + ' |')
  return '\n'.join(out) + '\n'


def markdown(report: dict) -> str:
  """report.md's evaluation sections, one per evaluator type ('' if none).

  Each evaluator's `markdown(section, rows)` gets report['evaluation'][type]
  and the teacher's and rungs' rows, each with 'role' added (None for the
  teacher) from the rung kind that made it.
  """
  sections = report.get('evaluation') or {}
  rows = [dict(report['teacher'], role=None)] + [
      dict(r, role=getattr(RUNG_KINDS.get(r.get('kind')), 'role', None))
      for r in report['rungs']]
  out = []
  for name, section in sections.items():
    ev = EVALUATORS.get(name)
    if ev is not None and ev.markdown is not None:
      out.append(ev.markdown(section, rows))
    else:
      out.append(table(section, rows, f'Evaluation: {name}'))
  return '\n'.join(out)
