"""Markdown table cells shared by the reports."""


def cell(v, spec: str) -> str:
  """format(v, spec), or '-' for a missing value."""
  return '-' if v is None else format(v, spec)
