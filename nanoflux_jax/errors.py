"""Errors shared by the writers and readers of files (checkpoint, convert).

A small leaf module, so that `checkpoint` and `convert` raise the same types
without importing each other.
"""


class CheckpointError(ValueError):
  """A checkpoint file is missing, truncated, corrupt or has the wrong keys."""


class OverwriteError(FileExistsError):
  """Writing would replace a file or folder that is not ours to replace."""
