"""One writer per workdir: a lock file naming its holder.

Two runs writing one workdir at once train every step twice and interleave
their metrics, checkpoints and reports. `hold(workdir, what)` takes
workdir/LOCK_FILE, a small JSON record of the holder (pid, host, start time,
command line), created with O_EXCL so that exactly one process gets it:
  * a second run is refused with `WorkdirLocked`, naming the holder;
  * a stale lock, left by a process of this host that is gone (a crash,
    SIGKILL), is moved aside and taken over; a lock from another host is
    never judged stale (its pid means nothing here): the message says to
    delete the file if that run is gone;
  * on a multi-host run only process 0 takes it, and every process learns
    whether it got it (so all of them stop, not only process 0);
  * the same process may take it again inside (nesting): the ladder holds
    the workdir and its trainers hold each rung's folder.
It is released on exit, exceptions included. The ladder (`run_ladder`), the
DiT trainer (`trainer.train`) and the text-encoder distillation
(`text_encoder.train_text_encoder`) hold their workdir while they run.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import socket
import sys
import time

from absl import logging
import jax
# The coordination service's key-value store: process 0 tells the others
# whether it got the lock without an XLA collective (whose compile would
# skew the processes before their first training collective).
from jax._src import distributed

from nanoflux_jax import atomic

LOCK_FILE = 'workdir.lock'
# The same host name and liveness test as atomic's temporary siblings.
_host = atomic._host  # pylint: disable=protected-access
_pid_running = atomic._pid_running  # pylint: disable=protected-access
# A lock file that stays unreadable (a writer died between creating and
# filling it) this long is stale.
_UNREADABLE_STALE_S = 60.0
_held: dict[str, int] = {}  # lock path -> nesting depth in this process.
_shared = itertools.count()  # Same sequence on every process of a run.
_SHARE_TIMEOUT_MS = 30 * 60 * 1000


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


def _record(what: str) -> dict:
  return dict(pid=os.getpid(), host=_host(), hostname=socket.gethostname(),
              what=what, start=time.time(),
              started=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
              command=' '.join(sys.argv)[:300])


def _read(path: str) -> dict | None:
  """The lock's record; None when it is gone or not (yet) valid JSON."""
  try:
    with open(path) as f:
      rec = json.load(f)
  except (OSError, ValueError):
    return None
  return rec if isinstance(rec, dict) and 'pid' in rec else None


def _is_stale(rec: dict) -> bool:
  return rec.get('host') == _host() and not _pid_running(int(rec['pid']))


def _holder(rec: dict) -> str:
  return (f"pid {rec.get('pid')} on host {rec.get('hostname', rec.get('host'))}"
          f" since {rec.get('started', '?')} ({rec.get('what', '?')}: "
          f"{rec.get('command') or '?'})")


def _refuse(path: str, rec: dict | None) -> WorkdirLocked:
  workdir = os.path.dirname(path)
  who = _holder(rec) if rec else 'a process whose lock record is unreadable'
  return WorkdirLocked(
      f'{workdir} is in use: {path} is held by {who}. Two runs on one '
      'workdir would train every step twice. Wait for that run to end (or '
      'stop it), or use another --workdir. If that run is gone (a crash on '
      f'another host cannot be detected from here), delete {path}.')


def _take_over(path: str, rec: dict | None) -> bool:
  """Moves a stale lock aside; False when another process was faster."""
  aside = atomic.tmp_sibling(path, 'stale')
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  if _read(aside) != rec:  # Moved a lock that someone took meanwhile.
    try:
      os.link(aside, path)  # Put it back; never over a newer one.
    except FileExistsError:
      pass
    os.remove(aside)
    return False
  os.remove(aside)
  logging.warning('%s: took over the stale lock of %s (that process is '
                  'gone)', path, _holder(rec) if rec else 'an unreadable '
                  'record')
  return True


def _acquire(path: str, what: str) -> dict:
  rec = _record(what)
  for _ in range(5):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      held = _read(path)
      for _ in range(10):  # Being written right now: give it a moment.
        if held is not None:
          break
        time.sleep(0.05)
        held = _read(path)
      if held is None:
        try:
          age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
          continue
        if age < _UNREADABLE_STALE_S:
          raise _refuse(path, None) from None
      elif not _is_stale(held):
        raise _refuse(path, held) from None
      _take_over(path, held)
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(rec, f, indent=1)
    return rec
  raise WorkdirLocked(f'{path}: could not take the lock (other processes '
                      'kept taking it); see who holds it and retry')


def _release(path: str, rec: dict) -> None:
  held = _read(path)
  if held is not None and all(held.get(k) == rec[k] for k in ('pid', 'host',
                                                              'start')):
    os.remove(path)
  else:
    logging.warning('%s: the lock is no longer ours (%s); left as it is',
                    path, _holder(held) if held else 'gone')


def _missing_dirs(path: str) -> list[str]:
  """The folders above-and-including `path` that do not exist, deepest
  first."""
  out = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    out.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return out


@contextlib.contextmanager
def hold(workdir: str, what: str = 'run'):
  """Holds workdir/LOCK_FILE for the `with` body (see the module docstring).

  A workdir this call had to create is removed again on exit when nothing
  else was written to it (a run refused by its config leaves no folder).
  Raises:
    WorkdirLocked: another live run holds it.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  path = os.path.join(workdir, LOCK_FILE)
  if path in _held:  # Nested in this process: already ours.
    _held[path] += 1
    try:
      yield
    finally:
      _held[path] -= 1
    return
  error, rec, created = None, None, []
  if jax.process_index() == 0:
    created = _missing_dirs(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
      rec = _acquire(path, what)
    except WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:  # Every process stops if process 0 could not.
    error = _share(error, path)
  if error is not None:
    raise error
  _held[path] = 1
  try:
    yield
  finally:
    del _held[path]
    if rec is not None:
      _release(path, rec)
    for d in created:  # Deepest first; only while empty.
      try:
        os.rmdir(d)
      except OSError:
        break


def _share(error: WorkdirLocked | None, path: str) -> WorkdirLocked | None:
  """Process 0's outcome (its error, or None), on every process."""
  client = distributed.global_state.client
  if client is None:
    return error
  key = f'nanoflux_jax/workdir_lock/{next(_shared)}'
  if jax.process_index() == 0:
    client.key_value_set(key, 'ok' if error is None else str(error))
    return error
  value = client.blocking_key_value_get(key, _SHARE_TIMEOUT_MS)
  return None if value == 'ok' else WorkdirLocked(
      f'{path}: process 0 could not take the workdir lock: {value}')


def holding(what: str):
  """Decorator: fn(config, workdir, ...) runs holding workdir's lock."""
  def deco(fn):
    @functools.wraps(fn)
    def wrapped(c, workdir, *args, **kwargs):
      with hold(workdir, what):
        return fn(c, workdir, *args, **kwargs)
    return wrapped
  return deco
