"""The shared check of the table-driven bad-input tests: a call is refused
with the right exception and message, and nothing a user owns changes."""
import hashlib
import os

import pytest


def snapshot(paths) -> dict:
  """{file: (sha256, mtime_ns)} of every file under `paths` (files or
  folders)."""
  out = {}
  for root in paths:
    files = ([root] if os.path.isfile(root) else
             [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs])
    for f in files:
      with open(f, 'rb') as fh:
        out[f] = (hashlib.sha256(fh.read()).hexdigest(),
                  os.stat(f).st_mtime_ns)
  return out


def assert_refused(call, exc, fragments, owned, folder=None):
  """`call()` raises `exc` (ours or a builtin) whose message holds every
  fragment; the files under `owned` are unchanged and nothing is added to
  `folder`. Returns the exception."""
  fragments = [fragments] if isinstance(fragments, str) else fragments
  before = snapshot(owned)
  listing = None if folder is None else sorted(os.listdir(folder))
  with pytest.raises(exc) as e:
    call()
  assert type(e.value).__module__.startswith(('nanoflux_jax', 'builtins'))
  for fragment in fragments:
    assert fragment in str(e.value), str(e.value)
  assert snapshot(owned) == before  # Nothing the user owns was touched.
  if folder is not None:
    assert sorted(os.listdir(folder)) == listing  # Nor anything added.
  return e.value
