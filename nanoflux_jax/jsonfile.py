"""Reading the JSON files that describe artefacts (configs, manifests)."""
from __future__ import annotations

import json


def read_object(path: str, error: type[Exception], what: str) -> dict:
  """The JSON object in file `path`; anything else raises `error` naming the
  file as a corrupt `what` (unreadable, not JSON, or not an object)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f'{path}: corrupt {what}: {e}') from e
  if not isinstance(d, dict):
    raise error(f'{path}: corrupt {what}: not a JSON object')
  return d
