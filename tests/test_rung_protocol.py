"""The rung protocol: kinds are asked, never named, outside their modules;
a compressing kind's `shapes` is its compress on abstract params.

1. Static (ast): a registered kind's name (e.g. 'prune') is never switched
   on outside the module that registers it (`register_rung('<name>', ...)`).
   Module docstrings and comments are not code; the same spelling in
   another sense (diffusers' 'text_encoder' folder, the config field
   'depth', the 'downsample' param collection) is another word, so a string
   constant counts when it is used as a kind (see `kind_uses`).
2. Every kind that compresses declares `shapes`, and `shapes` (run by
   memory_plan.rung_shapes under jax.eval_shape) gives the config, param
   shapes and stage that the real compress gives, on a tiny model: the
   memory plan's promise.
"""
import ast
import dataclasses
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from nanoflux_jax import compress
from nanoflux_jax import parallel
from nanoflux_jax.configs import FluxConfig
from nanoflux_jax.distill import trainer
from nanoflux_jax.ladder import memory_bytes as mb
from nanoflux_jax.ladder import memory_plan as mp
from nanoflux_jax.ladder import rungs
from nanoflux_jax.ladder.stage import Stage
from nanoflux_jax.models import downsample

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / 'nanoflux_jax'
TEST_PREFIX = '_test'  # Kinds that tests register (and remove again).


# ---------------------------------------------------------------------------
# 1. No kind string outside its module.
# ---------------------------------------------------------------------------
def _is_name(node, name: str) -> bool:
  return (isinstance(node, ast.Name) and node.id == name) or (
      isinstance(node, ast.Attribute) and node.attr == name)


def _is_role(node) -> bool:
  """x.role, x['role'] or x.get('role'): a rung's role (or a report row's)."""
  return _is_name(node, 'role') or (
      isinstance(node, ast.Subscript) and _str(node.slice) == 'role') or (
          isinstance(node, ast.Call) and _is_name(node.func, 'get') and
          bool(node.args) and _str(node.args[0]) == 'role')


def _str(node):
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value
  return None


def registrations() -> dict[str, pathlib.Path]:
  """{kind name: the module that calls register_rung(name, ...)}; name a
  string constant or a module-level NAME = '<string>'."""
  out = {}
  for path in sorted(PKG.rglob('*.py')):
    tree = ast.parse(path.read_text(), str(path))
    consts = {t.id: _str(node.value) for node in tree.body
              if isinstance(node, ast.Assign) for t in node.targets
              if isinstance(t, ast.Name) and _str(node.value) is not None}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and _is_name(node.func, 'register_rung')
          and node.args):
        arg = node.args[0]
        name = _str(arg) or (consts.get(arg.id) if isinstance(arg, ast.Name)
                             else None)
        if name is not None:
          out[name] = path
  return out


def kind_uses(tree: ast.AST, names, roles=()) -> list[tuple[int, str, str]]:
  """[(line, name, how)] of the string constants in `tree` used as a kind:

    compare   an operand of ==, !=, in, not in, is (alone or in a
              tuple/list/set operand), except a role name compared with a
              role (`x.role`, `x['role']`, `x.get('role')`: rungs.ROLES
              share two spellings with kinds);
    case      a `match` case pattern;
    registry  the key of a RUNG_KINDS[...] subscript or RUNG_KINDS.get(...);
    kind=     the value of a `kind=` keyword or of a dict's 'kind' key;
    table     one of two or more kind names in one tuple/list/set literal or
              among one dict's keys (a kind table), unless they are all role
              names (rungs.ROLES).
  """
  names, roles = set(names), set(roles)
  out, seen = [], set()

  def hit(node, how):
    s = _str(node)
    if s in names and id(node) not in seen:
      seen.add(id(node))
      out.append((node.lineno, s, how))

  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      operands = [node.left] + list(node.comparators)
      role = any(_is_role(o) for o in operands)
      for o in operands:
        elts = o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o]
        for e in elts:
          if not (role and _str(e) in roles):
            hit(e, 'compare')
    elif isinstance(node, ast.MatchValue):
      hit(node.value, 'case')
    elif isinstance(node, ast.Subscript) and _is_name(node.value,
                                                      'RUNG_KINDS'):
      hit(node.slice, 'registry')
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and _is_name(node.func.value, 'RUNG_KINDS') and node.args):
      hit(node.args[0], 'registry')
    elif isinstance(node, ast.keyword) and node.arg == 'kind':
      hit(node.value, 'kind=')
    if isinstance(node, ast.Dict):
      for k, v in zip(node.keys, node.values):
        if k is not None and _str(k) == 'kind':
          hit(v, 'kind=')
    elts = (node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set))
            else node.keys if isinstance(node, ast.Dict) else [])
    kinds = [e for e in elts if e is not None and _str(e) in names]
    if len(kinds) >= 2 and not all(_str(e) in roles for e in kinds):
      for e in kinds:
        hit(e, 'table')
  return sorted(out)


def test_kind_uses_finds_switches_and_skips_other_words():
  """The detector on snippets: every way of switching on a kind is found;
  the same spellings in other senses, docstrings and comments are not."""
  names, roles = ('prune', 'depth', 'text_encoder', 'export'), rungs.ROLES
  switches = '''
if kind == 'prune': pass
if r.get('kind') not in ('text_encoder', 'export'): pass
spec = RUNG_KINDS['depth']
spec = rungs.RUNG_KINDS.get('depth')
rung = dict(kind='prune')
rung = {'kind': 'export', 'quantize': ()}
_DIT_KINDS = ('prune', 'depth')
fns = {'prune': f, 'depth': g}
match kind:
  case 'export': pass
if kind.role == 'prune': pass
'''
  got = kind_uses(ast.parse(switches), names, roles)
  assert [(line, how) for line, _, how in got] == [
      (2, 'compare'), (3, 'compare'), (3, 'compare'), (4, 'registry'),
      (5, 'registry'), (6, 'kind='), (7, 'kind='), (8, 'table'), (8, 'table'),
      (9, 'table'), (9, 'table'), (11, 'case'), (12, 'compare')], got
  other_words = '''
"""A module docstring naming 'prune' and 'depth'."""
# if kind == 'prune': a comment
cfg['depth'] = 2
config = {'depth': 2, 'depth_single_blocks': 4}
params = {**params, 'downsample': ds}
path = paths['text_encoder']
_COMPONENTS = ('transformer', 'text_encoder', 'text_encoder_2', 'vae')
ROLES = ('denoiser', 'text_encoder', 'export')
if kind.role == 'text_encoder': pass
if row.get('role') != 'export' and row['role'] in ('text_encoder',): pass
'''
  assert kind_uses(ast.parse(other_words), names, roles) == []


def test_every_kind_is_registered_where_the_static_check_looks():
  found = registrations()
  registered = {k for k in rungs.RUNG_KINDS if not k.startswith(TEST_PREFIX)}
  assert set(found) == registered, (sorted(found), sorted(registered))


def test_no_kind_string_outside_its_module():
  """No nanoflux_jax module but a kind's own switches on its name: the
  others ask the kind (role, trains_denoiser, shapes, ...)."""
  owners = registrations()
  offenders = []
  for path in sorted(PKG.rglob('*.py')):
    tree = ast.parse(path.read_text(), str(path))
    for line, name, how in kind_uses(tree, owners, rungs.ROLES):
      if owners[name] != path:
        offenders.append(f'{path.relative_to(ROOT)}:{line} {name!r} ({how}; '
                         f'registered in {owners[name].name})')
  assert not offenders, '\n'.join(offenders)


# ---------------------------------------------------------------------------
# 2. shapes == compress on shapes.
# ---------------------------------------------------------------------------
def test_every_compressing_kind_declares_shapes():
  """A kind whose compress changes the student must say how on shapes, or
  the memory plan would plan it with the wrong DiT."""
  for name, kind in rungs.RUNG_KINDS.items():
    if kind.compress is not rungs.unchanged:
      assert kind.shapes is not None, name


TEACHER = FluxConfig.tiny(depth=2, depth_single_blocks=3,
                          attention_impl='xla')
GRID = (4, 4)
# The compressing kinds in the ladder's order, each with options whose
# outcome does not depend on sensitivity scores (scope='block', explicit
# keep), a second down-sampler rung that widens the first, and the step
# rung (4 -> 2 steps: the stage's step count changes).
LADDER = (
    dict(kind='prune', criterion='_test_position', keep_heads=0.5,
         keep_mlp=0.75, scope='block', calib_n=1),
    dict(kind='depth', keep=(0, 2, 3, 4)),  # merge: only values differ.
    dict(kind='static_modulation'),
    dict(kind='downsample', start=1, end=2, factor=2),
    dict(kind='downsample', start=1, end=-1, factor=2),
    dict(kind='step_distill', factor=2),
)


@compress.register('_test_position')
def _position_scores(cfg, params, calib, *, img_grid=None):
  """Cheap, uneven scores (no gradient to compile): the prune rung's
  widths with scope='block' do not depend on them."""
  del params, calib, img_grid
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda m: rng.random(np.shape(m)).astype(np.float32),
                      compress.PruneMask.ones(cfg))


def _context(mesh, teacher):
  config = ml_collections.ConfigDict()
  config.distill = trainer.default_config()
  config.distill.data.grid = GRID
  config.distill.data.txt_len = 8
  config.teacher = {'path': '', 'preset': 'tiny', 'seed': 1}
  ctx = rungs.Context(config, mesh, GRID, '/nonexistent')
  ctx._loaded['teacher'] = teacher  # pylint: disable=protected-access
  ctx._loaded['pipeline'] = None  # pylint: disable=protected-access
  return ctx


def _shape_tree(params):
  return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype).name),
                      params)


def test_shapes_give_what_compress_gives(monkeypatch):
  # Host (numpy) params: the transforms slice them on the host, no compile.
  # Their values and the calibration trajectories do not change a shape
  # (the criterion ignores them; test_compress covers calibration).
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype) * 0.02,
      mb.abstract_params(TEACHER, None))
  monkeypatch.setattr(compress, 'calibration_set', lambda *a, **k: (
      dict.fromkeys(('img', 'img_ids', 'txt', 'txt_ids', 'timesteps'))))
  # The same init, compiled as one program: eagerly, every conv of the
  # down-sampler's init compiles on its own (~10 s on a loaded 2-core CPU).
  monkeypatch.setattr(downsample, 'init_params', jax.jit(
      downsample.init_params, static_argnums=0))
  mesh = parallel.create_mesh({'data': 1, 'fsdp': 1, 'tensor': 1},
                              jax.devices()[:1])
  ctx = _context(mesh, (TEACHER, params))
  real = (TEACHER, params)
  shaped = (TEACHER, mb.abstract_params(TEACHER, None))
  real_stage = shaped_stage = Stage(TEACHER, 4, GRID)
  # Every kind that has shapes is compared (a kind not registered yet, e.g.
  # in a partial checkout, is left out, never one that is).
  ladder = [r for r in LADDER if r['kind'] in rungs.RUNG_KINDS]
  assert {k for k, v in rungs.RUNG_KINDS.items() if v.shapes is not None} <= {
      r['kind'] for r in ladder}
  for rung in ladder:
    kind, opts = mp.rung_options(rung)
    real, new = kind.compress(ctx, real_stage, real, opts)
    # As runner._compressed: the stage describes the compressed config.
    real_stage = dataclasses.replace(new, dit_config=real[0])
    shaped, shaped_stage = mp.rung_shapes(rung, shaped_stage, shaped)
    assert shaped[0] == real[0], rung
    assert _shape_tree(shaped[1]) == _shape_tree(real[1]), rung
    assert shaped_stage == real_stage, rung
  cfg = real[0]
  # The chain did compress (so the comparisons above compared something).
  assert cfg.num_blocks == 4 and cfg.modulation == 'static'
  assert (cfg.downsample_start, cfg.downsample_end) == (1, 3)
  assert cfg.single_mlp == (96, 96, 96) and cfg.double_heads == (2,)
  assert real_stage.teacher_blocks == (0, 2, 3, 4)
  if ladder[-1]['kind'] == 'step_distill':
    assert real_stage.num_steps == 2 and len(cfg.static_timesteps) == 2


def test_expected_choices_keep_the_requested_amounts():
  """Where compress chooses from scores (depth keep_blocks, prune
  target_params), shapes plans the amounts it asks for."""
  student = (TEACHER, mb.abstract_params(TEACHER, None))
  stage = Stage(TEACHER, 4, GRID)
  (cfg, _), new = mp.rung_shapes(dict(kind='depth', keep_blocks=3), stage,
                                 student)
  # 3 of 5 blocks, double and single in proportion (2 * 3 / 5 -> 1).
  assert (cfg.depth, cfg.depth_single_blocks) == (1, 2)
  assert new.teacher_blocks == (0, 2, 3)
  target = compress.count_params(TEACHER) * 3 // 4
  (cfg, _), _ = mp.rung_shapes(
      dict(kind='prune', keep_heads=None, keep_mlp=None, scope='block',
           target_params=target), stage, student)
  assert 0.9 * target < compress.count_params(cfg) <= target
  with pytest.raises(ValueError, match="unknown kind 'no_such_kind'"):
    mp.rung_shapes(dict(kind='no_such_kind'), stage, student)
