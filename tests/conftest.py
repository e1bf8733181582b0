"""Test set-up: 8 fake CPU devices, and no silently skipped parity tests.

* XLA_FLAGS: the fake-device count is forced to 8 (before jax is imported),
  replacing any count already in the environment, so a preset XLA_FLAGS
  cannot make the sharding tests trivial; other flags are kept. Tests that
  shard assert `jax.device_count() == DEVICES`.
* References: a parity test whose PyTorch reference (torch, diffusers,
  transformers) is missing is skipped by `refs.require`, and the session then
  ends with an error naming every such test, unless
  `--allow-missing-references` is given. (With NANOFLUX_REQUIRE_REFERENCE=1,
  as in .ci/run, the test itself fails instead.)
"""
import os
import re

import pytest

DEVICES = 8
_COUNT_FLAG = '--xla_force_host_platform_device_count'

_flags = re.sub(_COUNT_FLAG + r'=\S*', '', os.environ.get('XLA_FLAGS', ''))
os.environ['XLA_FLAGS'] = f'{_flags.strip()} {_COUNT_FLAG}={DEVICES}'.strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# The prefix of refs.require's skip reason.
MISSING_REFERENCE = 'reference '
_missing: list[tuple[str, str]] = []


def pytest_addoption(parser):
  parser.addoption(
      '--allow-missing-references', action='store_true', default=False,
      help='let parity tests skip when torch/diffusers/transformers are '
      'missing (by default the session fails, naming them)')


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2]).removeprefix('Skipped: ')
  return str(longrepr)


def pytest_runtest_logreport(report):
  if report.skipped and not hasattr(report, 'wasxfail'):
    reason = _skip_reason(report)
    if reason.startswith(MISSING_REFERENCE) and 'not installed' in reason:
      _missing.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
  if _missing and not session.config.getoption('allow_missing_references'):
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
      session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  del exitstatus
  if not _missing or config.getoption('allow_missing_references'):
    return
  tr = terminalreporter
  tr.section('parity tests skipped: missing references', sep='=', red=True,
             bold=True)
  for nodeid, reason in _missing:
    tr.line(f'{nodeid}: {reason}', red=True)
  tr.line(f'ERROR: {len(_missing)} parity test(s) did not run. Install the '
          'references (pip install torch==2.13.0 diffusers transformers) or '
          'pass --allow-missing-references.', red=True, bold=True)
