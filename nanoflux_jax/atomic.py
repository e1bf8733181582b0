"""Atomic writes of files and folders that never delete what a user owns.

Every artefact writer (checkpoints, pipelines, TFLite exports, safetensors
files) follows the same three rules:
  1. `check_replaceable(path, is_kind, what)` before any expensive work: an
     existing path is replaced only when it is an artefact of the same kind
     (a checkpoint over a checkpoint) or an empty folder; anything else raises
     `OverwriteError` naming the path, and nothing is touched;
  2. the new artefact is built in a hidden temporary sibling from
     `tmp_sibling(path)`, named `.<name>.tmp-<host>-<pid>-<hex>`, and swapped in
     with `replace_dir` (folders) or `os.replace` (files);
  3. `remove_stale(path)` deletes temporary siblings that earlier, interrupted
     processes of this host left behind (their pid is no longer running), so
     an interruption costs disk space only until the next write.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid
from typing import Callable

from nanoflux_jax.errors import OverwriteError

# Temporary siblings from before pids were recorded; removed once this old.
_LEGACY_AGE_S = 3600.0


def _host() -> str:
  return re.sub(r'[^A-Za-z0-9]', '', socket.gethostname())[:32] or 'host'


def tmp_sibling(path: str, kind: str = 'tmp') -> str:
  """A hidden, unique sibling of `path`: .<name>.<kind>-<host>-<pid>-<hex>."""
  path = os.path.abspath(os.fspath(path))
  return os.path.join(os.path.dirname(path),
                      f'.{os.path.basename(path)}.{kind}-{_host()}-'
                      f'{os.getpid()}-{uuid.uuid4().hex[:8]}')


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  return True


def _stale_kind(name: str, base: str, full: str) -> str | None:
  """'tmp' or 'old' when `name` is a temporary sibling of `base` left by a
  dead process of this host (or, for older writers' names without a pid, one
  older than an hour); else None. Only names that writers make match, never
  a user's look-alike.
  """
  e = re.escape(base)
  m = re.fullmatch(rf'\.{e}\.(tmp|old)-([A-Za-z0-9]+)-(\d+)-[0-9a-f]{{8}}',
                   name)
  if m:
    dead = m.group(2) == _host() and not _pid_running(int(m.group(3)))
    return m.group(1) if dead else None
  m = re.fullmatch(rf'{e}\.tmp-(\d+)', name)  # Older safetensors writer.
  if m:
    return None if _pid_running(int(m.group(1))) else 'tmp'
  m = re.fullmatch(rf'\.?{e}\.(tmp|old)-[0-9a-f]{{8}}', name)  # No pid.
  try:
    old = m and time.time() - os.lstat(full).st_mtime > _LEGACY_AGE_S
  except OSError:
    return None
  return m.group(1) if old else None


def remove_stale(path: str) -> list[str]:
  """Removes temporary siblings of `path` left by dead processes.

  Matches the names `tmp_sibling` makes (and those of older versions); an
  `.old-*` folder is kept while `path` itself is missing, since it may then
  be the only copy of the previous artefact.
  Returns:
    The removed paths.
  """
  path = os.path.abspath(os.fspath(path))
  parent, base = os.path.dirname(path), os.path.basename(path)
  if not os.path.isdir(parent):
    return []
  removed = []
  for name in sorted(os.listdir(parent)):
    full = os.path.join(parent, name)
    kind = _stale_kind(name, base, full) if base in name else None
    if kind is None or (kind == 'old' and not os.path.exists(path)):
      continue
    if os.path.isdir(full) and not os.path.islink(full):
      shutil.rmtree(full, ignore_errors=True)
    else:
      try:
        os.remove(full)
      except OSError:
        continue
    removed.append(full)
  return removed


def check_replaceable(path: str, is_kind: Callable[[str], bool],
                      what: str) -> None:
  """Raises OverwriteError unless `path` may be (re)placed by a `what`.

  Allowed: `path` does not exist, is an empty folder, or `is_kind(path)`
  (an artefact of the same kind, replaced atomically).
  """
  path = os.fspath(path)
  if not os.path.lexists(path):
    return
  if os.path.isdir(path) and not os.path.islink(path):
    if not os.listdir(path) or is_kind(path):
      return
    raise OverwriteError(
        f'{path}: exists and is not a {what}; refusing to replace it (and '
        'delete its files). Remove it or choose another path.')
  raise OverwriteError(f'{path}: exists and is a file, not a {what} folder; '
                       'refusing to replace it.')


def replace_dir(src: str, dst: str) -> None:
  """Moves folder src to dst; an existing dst is only removed afterwards.

  The last step of every atomic folder write (checkpoints, pipelines, TFLite
  exports): build the folder beside dst, then swap it in. Callers check
  `check_replaceable(dst, ...)` first.
  """
  old = None
  if os.path.lexists(dst):
    old = tmp_sibling(dst, 'old')
    os.replace(dst, old)
  os.replace(src, dst)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def write_file(path: str, write: Callable[[object], None],
               mode: str = 'w') -> None:
  """Writes a small file atomically: `write(f)` fills a temporary sibling
  opened with `mode`, which then replaces `path` (reports, eval results).
  Stale siblings of earlier, interrupted writes are removed first."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  remove_stale(path)
  tmp = tmp_sibling(path)
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)
