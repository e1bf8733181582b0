"""One owner per shared default, checked statically with `ast`.

- The sampling timesteps: `sampling.schedule_for` computes them (issue 26);
  no other module defines schedule math or spells linspace(1, 0, ...).
- The guidance default: `call_args.DEFAULT_GUIDANCE`; no other library
  module assigns it or writes the 3.5 literal.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The schedule's math, defined and used in sampling.py only (`get_schedule`,
# BFL's name for it, was the old public helper).
SCHEDULE_MATH = ('schedule_for', 'get_schedule', 'time_shift', 'shift_mu')


def _trees(*dirs):
  """(path relative to the root, parsed module) for every .py under dirs."""
  files = [p for d in dirs for p in sorted((ROOT / d).rglob('*.py'))]
  assert len(files) > 20, files  # The walk found the tree.
  for path in files:
    rel = path.relative_to(ROOT).as_posix()
    yield rel, ast.parse(path.read_text(), rel)


def _names(node):
  """The identifiers an AST node spells: a name, an attribute, an import."""
  if isinstance(node, ast.Name):
    return [node.id]
  if isinstance(node, ast.Attribute):
    return [node.attr]
  if isinstance(node, ast.alias):
    return [node.name.rsplit('.', 1)[-1]]
  return []


def _is_unit_linspace(node):
  """linspace(1, 0, ...): the rule's timesteps, computed by hand."""
  if not (isinstance(node, ast.Call) and 'linspace' in _names(node.func)
          and len(node.args) >= 2):
    return False
  ends = [a.value if isinstance(a, ast.Constant) else None
          for a in node.args[:2]]
  return ends == [1, 0]


def _sets_guidance(node):
  """`DEFAULT_GUIDANCE = ...` (plain or annotated) or a 3.5 literal."""
  if isinstance(node, ast.Constant):
    return node.value == 3.5
  targets = (node.targets if isinstance(node, ast.Assign) else
             [node.target] if isinstance(node, ast.AnnAssign) else [])
  return any('DEFAULT_GUIDANCE' in _names(t) for t in targets)


def test_detectors_see_what_they_look_for():
  tree = ast.parse('from nanoflux_jax.sampling import time_shift\n'
                   'a = np.linspace(1, 0, 5)\nb = jnp.linspace(1.0, 0.0, 3)\n'
                   'c = np.linspace(0.3, 0.9, 4)\nd = sampling.get_schedule\n')
  nodes = list(ast.walk(tree))
  assert sum(_is_unit_linspace(n) for n in nodes) == 2
  spelled = {x for n in nodes for x in _names(n)}
  assert {'time_shift', 'get_schedule', 'linspace'} <= spelled
  tree = ast.parse('DEFAULT_GUIDANCE = 3.0\nDEFAULT_GUIDANCE: float = 2\n'
                   'g = 3.5 if x is None else x\nh = DEFAULT_GUIDANCE\n')
  assert [n.lineno for n in ast.walk(tree) if _sets_guidance(n)] == [1, 2, 3]


def test_only_sampling_computes_timesteps():
  """No module but sampling.py defines schedule math or spells
  get_schedule / time_shift / shift_mu, and no library module computes
  linspace(1, 0, ...): every one asks `sampling.schedule_for`."""
  bad = []
  for rel, tree in _trees('nanoflux_jax', 'experiments', 'tests'):
    if rel in ('nanoflux_jax/sampling.py', 'tests/test_sampling.py',
               'tests/test_one_owner.py'):
      continue
    for node in ast.walk(tree):
      where = f'{rel}:{getattr(node, "lineno", "?")}'
      if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and
          node.name in SCHEDULE_MATH):
        bad.append(f'{where} defines {node.name}')
      used = set(_names(node)) & set(SCHEDULE_MATH[1:])
      if used:
        bad.append(f'{where} uses {sorted(used)}')
      if rel.startswith('nanoflux_jax/') and _is_unit_linspace(node):
        bad.append(f'{where} computes linspace(1, 0, ...) timesteps')
  assert not bad, 'ask sampling.schedule_for instead:\n' + '\n'.join(bad)


def test_one_guidance_default():
  """call_args.DEFAULT_GUIDANCE is the library's only guidance default: no
  other module assigns DEFAULT_GUIDANCE or writes 3.5."""
  owners = {}
  for rel, tree in _trees('nanoflux_jax', 'experiments'):
    if rel == 'nanoflux_jax/call_args.py':
      continue
    for node in ast.walk(tree):
      if _sets_guidance(node):
        owners.setdefault(rel, []).append(node.lineno)
  assert not owners, ('import call_args.DEFAULT_GUIDANCE instead of: ' +
                      ', '.join(f'{r}:{sorted(set(v))}'
                                for r, v in sorted(owners.items())))
