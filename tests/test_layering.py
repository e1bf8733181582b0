"""The library's import structure: no cycles, dependencies point one way.

  base (configs, config_arg, errors, atomic, jsonfile, images,
    shapes.world, shapes.geometry, parallel, call_args)
    -> models -> (sampling, checkpoint) -> shapes.classifier -> convert
    -> pipeline_checks -> (pipeline, evaluate, testing) -> compress -> export
    -> the `nanoflux_jax` API -> distill -> shapes (teacher, evaluation)
    -> ladder -> experiments

Read statically with `ast`: every import statement, at module level or inside
a function, is an edge of the module graph. `from pkg import sub` with `sub` a
module is an edge to `pkg.sub`; any other import of a package (`import pkg`,
`from pkg import name`) is an edge to its `__init__` (module `pkg`), whose own
imports (what it re-exports) are its edges in turn.
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = 'nanoflux_jax'

# Rank of each group of modules (a module belongs to the longest key that
# names it or a package above it; the bare package name is only its API
# `__init__`). An import must point to a lower rank or stay in its group.
RANKS = {
    'nanoflux_jax.configs': 0,
    'nanoflux_jax.config_arg': 0,
    'nanoflux_jax.errors': 0,
    'nanoflux_jax.atomic': 0,
    'nanoflux_jax.jsonfile': 0,
    'nanoflux_jax.images': 0,
    'nanoflux_jax.shapes.world': 0,  # The toy world's scenes and captions.
    'nanoflux_jax.shapes.geometry': 0,
    'nanoflux_jax.parallel': 0,
    'nanoflux_jax.call_args': 0,
    'nanoflux_jax.models': 10,
    'nanoflux_jax.sampling': 20,
    'nanoflux_jax.checkpoint': 20,
    'nanoflux_jax.shapes.classifier': 25,
    'nanoflux_jax.convert': 30,
    'nanoflux_jax.pipeline_checks': 35,
    'nanoflux_jax.pipeline': 40,
    'nanoflux_jax.evaluate': 40,
    'nanoflux_jax.testing': 40,
    'nanoflux_jax.compress': 50,
    'nanoflux_jax.export': 60,
    'nanoflux_jax': 70,  # The public API (`__init__.py`): re-exports only.
    'nanoflux_jax.distill': 80,
    'nanoflux_jax.shapes': 85,  # The toy world's teacher and evaluation.
    'nanoflux_jax.ladder': 90,
}
# Base modules: within rank 0 the groups may import each other (acyclically),
# except `parallel`, which knows no model or config (see
# test_parallel_imports_no_library_module).
BASE_RANK = 0

# The only third-party modules that library code may import inside a
# function: optional (extras) or heavy to import. Each such import carries a
# `# Deferred: <why>` comment on the line above.
DEFERRABLE = ('tensorflow', 'torch', 'transformers', 'diffusers',
              'sentencepiece', 'ai_edge_litert', 'ai_edge_quantizer',
              'jax.experimental.jax2tf')
# `import nanoflux_jax` must not pull these in.
HEAVY = ('tensorflow', 'torch', 'transformers', 'diffusers', 'ai_edge_litert',
         'ai_edge_quantizer')


def _module_names() -> dict[str, pathlib.Path]:
  """{'nanoflux_jax.models.flux': path, 'nanoflux_jax.models': .../__init__}."""
  out = {}
  for path in sorted((ROOT / PKG).rglob('*.py')):
    parts = path.relative_to(ROOT).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


MODULES = _module_names()


class Import:
  """One import edge: `src` imports `dst` at `line`, `deferred` if inside a
  function; `comment` is the comment block above it (through the import
  lines just above, so one comment can head a few deferred imports)."""

  def __init__(self, src, dst, line, deferred, comment):
    self.src, self.dst, self.line = src, dst, line
    self.deferred, self.comment = deferred, comment

  def where(self) -> str:
    return f'{MODULES[self.src].relative_to(ROOT)}:{self.line}'


def _absolute(src: str, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ''
  is_pkg = MODULES[src].name == '__init__.py'
  base = src.split('.')[:len(src.split('.')) - node.level + is_pkg]
  return '.'.join(base + ([node.module] if node.module else []))


def _targets(src: str, node) -> list[str]:
  """Modules (library or not) an import statement loads, as edges."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  mod = _absolute(src, node)
  if mod not in MODULES:  # Third party: keep the name (e.g. jax...jax2tf).
    return [f'{mod}.{a.name}' for a in node.names]
  return [f'{mod}.{a.name}' if f'{mod}.{a.name}' in MODULES else mod
          for a in node.names]


def _walk(tree: ast.AST, deferred: bool = False):
  for child in ast.iter_child_nodes(tree):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child, deferred
    yield from _walk(child, deferred or isinstance(
        child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _comment_above(lines: list[str], index: int) -> str:
  """The comment lines above lines[index], past import statements."""
  out = []
  for line in reversed(lines[:index]):
    line = line.strip()
    if line.startswith('#'):
      out.insert(0, line)
    elif not line.startswith(('import ', 'from ')):
      break
  return '\n'.join(out)


def all_imports() -> list[Import]:
  out = []
  for src, path in MODULES.items():
    text = path.read_text()
    lines = text.splitlines()
    for node, deferred in _walk(ast.parse(text, str(path))):
      above = _comment_above(lines, node.lineno - 1)
      for dst in _targets(src, node):
        out.append(Import(src, dst, node.lineno, deferred, above))
  return out


IMPORTS = all_imports()


def library_imports() -> list[Import]:
  return [i for i in IMPORTS if i.dst in MODULES]


def graph() -> dict[str, set[str]]:
  g = {m: set() for m in MODULES}
  for i in library_imports():
    if i.dst != i.src:
      g[i.src].add(i.dst)
  return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `g` as [a, b, ..., a], or None (iterative DFS)."""
  state = {m: 0 for m in g}  # 0 new, 1 on the stack, 2 done.
  for start in sorted(g):
    if state[start]:
      continue
    stack = [(start, iter(sorted(g[start])))]
    path = [start]
    state[start] = 1
    while stack:
      node, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        state[node] = 2
        stack.pop()
        path.pop()
      elif state[nxt] == 1:
        return path[path.index(nxt):] + [nxt]
      elif state[nxt] == 0:
        state[nxt] = 1
        path.append(nxt)
        stack.append((nxt, iter(sorted(g[nxt]))))
  return None


def group(module: str) -> str:
  """The RANKS key of a library module."""
  if module == PKG:
    return PKG
  parts = module.split('.')
  for n in range(len(parts), 1, -1):
    key = '.'.join(parts[:n])
    if key in RANKS:
      return key
  raise KeyError(module)


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == [
      'a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle():
  cycle = find_cycle(graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_every_module_has_a_rank():
  missing = []
  for m in MODULES:
    try:
      group(m)
    except KeyError:
      missing.append(m)
  assert not missing, f'place these modules in RANKS: {missing}'


def test_imports_point_down_the_layers():
  bad = []
  for i in library_imports():
    a, b = group(i.src), group(i.dst)
    if a == b or RANKS[b] < RANKS[a] or RANKS[a] == RANKS[b] == BASE_RANK:
      continue
    bad.append(f'{i.where()}: {i.src} (rank {RANKS[a]}) imports {i.dst} '
               f'(rank {RANKS[b]})')
  assert not bad, 'imports against the layering:\n' + '\n'.join(bad)


@pytest.mark.parametrize('lower, forbidden', [
    ('nanoflux_jax.models', ('sampling', 'checkpoint', 'convert', 'compress',
                             'distill', 'export', 'pipeline', 'evaluate',
                             'testing')),
    ('nanoflux_jax.checkpoint', ('convert', 'evaluate', 'testing')),
    ('nanoflux_jax.convert', ('evaluate', 'testing', 'pipeline')),
])
def test_lower_layers_do_not_import(lower, forbidden):
  bad = [f'{i.where()}: imports {i.dst}' for i in library_imports()
         if (i.src == lower or i.src.startswith(lower + '.')) and
         group(i.dst) in {f'{PKG}.{f}' for f in forbidden}]
  assert not bad, '\n'.join(bad)


def test_only_the_trainers_users_import_distill():
  users = {f'{PKG}.{g}' for g in ('distill', 'shapes', 'ladder')}
  bad = [f'{i.where()}: imports {i.dst}' for i in library_imports()
         if group(i.dst) == f'{PKG}.distill' and group(i.src) not in users]
  assert not bad, '\n'.join(bad)


def test_parallel_imports_no_library_module():
  bad = [f'{i.where()}: imports {i.dst}' for i in IMPORTS
         if i.src == f'{PKG}.parallel' and
         (i.dst == PKG or i.dst.startswith(PKG + '.'))]
  assert not bad, 'parallel.py must depend on jax/flax/numpy only:\n' + (
      '\n'.join(bad))


def test_no_deferred_library_imports():
  bad = [f'{i.where()}: {i.dst}' for i in library_imports() if i.deferred]
  assert not bad, ('imports of library modules inside functions (move them '
                   'to the top; break a cycle by moving code):\n' +
                   '\n'.join(bad))


def test_deferred_imports_are_optional_heavy_ones_with_a_reason():
  bad = []
  for i in IMPORTS:
    if not i.deferred or i.dst in MODULES or i.dst.split('.')[0] == PKG:
      continue
    if not any(i.dst == d or i.dst.startswith(d + '.') for d in DEFERRABLE):
      bad.append(f'{i.where()}: {i.dst} is neither optional nor heavy; '
                 'import it at the top')
    elif '# Deferred:' not in i.comment:
      bad.append(f'{i.where()}: {i.dst} lacks a "# Deferred: <why>" '
                 'comment on the line above')
  assert not bad, '\n'.join(bad)


def test_import_pulls_in_no_heavy_dependency():
  code = ('import sys, nanoflux_jax; print(sorted({m.split(".")[0] for m in '
          f'sys.modules}} & set({HEAVY!r})))')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT)] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, cwd=ROOT, env=env)
  assert out.stdout.strip() == '[]', (
      f'import nanoflux_jax imported {out.stdout.strip()}')
