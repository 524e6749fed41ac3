"""Readable display of graphs and States."""

from __future__ import annotations

import importlib.util
from typing import Any


def display(*objects: Any) -> None:
  """Prints each object as a readable tree (treescope in notebooks if installed)."""
  use_treescope = importlib.util.find_spec("treescope") is not None and _in_notebook()
  for obj in objects:
    if use_treescope:
      import treescope  # noqa: PLC0415  (optional dependency)
      treescope.display(obj)
    else:
      print(obj)


def _in_notebook() -> bool:
  try:
    from IPython import get_ipython  # noqa: PLC0415  (optional dependency)
  except ImportError:
    return False
  shell = get_ipython()
  return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
