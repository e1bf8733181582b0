"""experiments/check_mutants.py stays runnable as the code moves: every
planted edit still matches exactly once, and every targeted test exists.
(Running the mutants themselves takes minutes; it is done outside CI.)"""
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mutants():
  spec = importlib.util.spec_from_file_location(
      'check_mutants', os.path.join(ROOT, 'experiments', 'check_mutants.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up.
  spec.loader.exec_module(module)
  return module.MUTANTS


MUTANTS = _mutants()


@pytest.mark.parametrize('mutant', MUTANTS, ids=lambda m: m.name)
def test_mutant_targets_match_once_and_tests_exist(mutant):
  for file, old, new in mutant.edits:
    with open(os.path.join(ROOT, file)) as f:
      assert f.read().count(old) == 1, (mutant.name, file, old)
    assert old != new
  for node in mutant.tests:
    path, _, name = node.partition('::')
    with open(os.path.join(ROOT, path)) as f:
      text = f.read()
    if name:
      func = re.sub(r'\[.*\]$', '', name)
      assert re.search(rf'^def {func}\(', text, re.M), (mutant.name, node)


def test_mutant_names_are_unique():
  names = [m.name for m in MUTANTS]
  assert len(names) == len(set(names))
