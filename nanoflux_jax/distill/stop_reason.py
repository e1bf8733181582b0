"""One short last line that says why training stopped.

A full disk during an orbax save, a NaN at step N or a SIGTERM surface as
a traceback buried in hundreds of lines of orbax, asyncio and XLA logging.
The training binaries run their work inside `final_line()`: when it raises,
`describe` reduces the exception to one line,

  nanoflux_jax: training stopped: disk full (No space left on device) \
      writing /wd/checkpoints

which is printed to stderr as the process's last output: after the
traceback and what background threads print (see `_print_last`). The
exception itself still propagates (exit status and traceback unchanged).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import signal
import sys

PREFIX = 'nanoflux_jax: training stopped: '
_MAX = 300  # characters of the cause.


def _first_line(text: str) -> str:
  text = str(text).strip()
  line = text.splitlines()[0] if text else ''
  return line if len(line) <= _MAX else line[:_MAX - 3] + '...'


def _os_error(e: OSError) -> str:
  where = f' writing {e.filename}' if getattr(e, 'filename', None) else ''
  if e.errno == errno.ENOSPC:
    return f'disk full (No space left on device){where}'
  if e.errno == errno.EDQUOT:
    return f'disk quota exceeded{where}'
  if e.errno == errno.EFBIG:
    return f'file too large (a file size limit){where}'
  return f'{type(e).__name__}: {_first_line(e)}'


# tensorstore (orbax's writer) reports a full disk inside a ValueError:
# 'RESOURCE_EXHAUSTED: ... local file "<path>" ... No space left on device
# [os_error_code='28']'.
_NO_SPACE = re.compile(r"No space left on device|os_error_code='28'")
_LOCAL_FILE = re.compile(r'(?:local file|Failed writing:?) "([^"]+)"')


def _short_path(path: str) -> str:
  """An orbax temporary path -> the checkpoints folder it was written in."""
  parts = path.split(os.sep)
  for i, p in enumerate(parts):
    if 'orbax-checkpoint-tmp' in p:
      return os.sep.join(parts[:i]) or path
  return path


def _chain(e: BaseException):
  """e, its __cause__ / __context__, and so on (orbax wraps OS errors)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def describe(e: BaseException) -> str:
  """One short line naming why `e` stopped training.

  A disk-full OSError anywhere in the exception's chain wins (orbax and
  asyncio re-raise it wrapped); NaN / inf (FloatingPointError) keeps the
  step; signals (loop.TrainingInterrupted, KeyboardInterrupt) say which and
  that a checkpoint was saved; anything else is its type and first line.
  """
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT,
                                              errno.EFBIG):
      return _os_error(x)
    if _NO_SPACE.search(str(x)):
      m = _LOCAL_FILE.search(str(x))
      where = f' writing {_short_path(m.group(1))}' if m else ''
      return f'disk full (No space left on device){where}'
  if isinstance(e, FloatingPointError):
    return f'NaN / inf at {_first_line(e)}'  # 'step N: non-finite [...]'
  if isinstance(e, KeyboardInterrupt):
    # loop.TrainingInterrupted: 'SIGTERM at step N: checkpoint saved ...'.
    msg = _first_line(e)
    return (f'signal: {msg}' if msg else
            f'signal: {signal.Signals.SIGINT.name} (KeyboardInterrupt)')
  if isinstance(e, OSError):
    return _os_error(e)
  if isinstance(e, SystemExit):
    return f'exit status {e.code}'
  return f'{type(e).__name__}: {_first_line(e)}'


_lines: list[str] = []


def _print_last() -> None:
  """Prints the pending lines, once.

  Registered with atexit when the error happens: CPython runs exit handlers
  after it has printed the uncaught exception's traceback and joined the
  non-daemon threads (orbax's savers), so the line comes after that noise.
  Handlers registered earlier run after this one (last in, first out);
  none of the libraries' print anything there (checked with a full disk
  under an orbax save, tests/test_run_record.py).
  """
  if not _lines:
    return
  sys.stderr.flush()
  sys.stdout.flush()
  print('\n'.join(_lines), file=sys.stderr, flush=True)
  _lines.clear()


@contextlib.contextmanager
def final_line():
  """Runs the body; if it raises, its cause is printed as the last line."""
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit) and e.code in (0, None):
      raise
    _lines.append(PREFIX + describe(e))
    atexit.register(_print_last)
    raise

