"""conftest.py: a missing reference fails the session; 8 fake devices."""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

_TESTS = '''
import os

import refs


def test_needs_a_missing_reference():
  refs.require('nanoflux_no_such_reference_module')


def test_plain():
  assert True


def test_device_count():
  import jax
  assert jax.device_count() == 8, jax.devices()
  assert os.environ['XLA_FLAGS'].count('device_count') == 1
  assert '--xla_cpu_enable_fast_math=false' in os.environ['XLA_FLAGS']
'''


def _pytest(tmp_path, *args):
  for f in ('conftest.py', 'refs.py'):
    shutil.copy(os.path.join(HERE, f), tmp_path / f)
  (tmp_path / 'test_sample.py').write_text(_TESTS)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             # A preset count (and another flag) in the environment.
             XLA_FLAGS='--xla_force_host_platform_device_count=2 '
             '--xla_cpu_enable_fast_math=false')
  env.pop('NANOFLUX_REQUIRE_REFERENCE', None)
  out = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
       str(tmp_path), *args], capture_output=True, text=True, timeout=300,
      env=env, cwd=tmp_path)
  return out.returncode, out.stdout + out.stderr


def test_missing_reference_fails_the_session_naming_the_test(tmp_path):
  rc, out = _pytest(tmp_path)
  assert rc == 1, out
  assert '2 passed, 1 skipped' in out, out
  assert 'test_sample.py::test_needs_a_missing_reference' in out, out
  assert 'did not run' in out and '--allow-missing-references' in out, out


def test_allow_missing_references_lets_it_pass(tmp_path):
  rc, out = _pytest(tmp_path, '--allow-missing-references', '-k',
                    'not device_count')  # jax is imported once, above.
  assert rc == 0, out
  assert '1 passed, 1 skipped' in out and 'did not run' not in out, out


def test_reference_required_in_ci_fails_the_test(tmp_path):
  for f in ('conftest.py', 'refs.py'):
    shutil.copy(os.path.join(HERE, f), tmp_path / f)
  (tmp_path / 'test_sample.py').write_text(_TESTS)
  out = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
       str(tmp_path), '-k', 'missing_reference'],
      capture_output=True, text=True, timeout=300, cwd=tmp_path,
      env=dict(os.environ, NANOFLUX_REQUIRE_REFERENCE='1'))
  assert out.returncode == 1 and '1 failed' in out.stdout, out.stdout
  assert 'is required but missing' in out.stdout, out.stdout
