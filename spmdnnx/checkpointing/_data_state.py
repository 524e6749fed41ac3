"""The data iterator's position: one JSON file per process, an orbax item.

A data iterator (a grain ``DatasetIterator`` or anything with
``get_state()`` / ``set_state(state)``) has a position per process: in a
multi-process job each process reads its own shard of the data. Grain's own
orbax handler needs a grain iterator; this one takes the state itself (a
JSON-serializable value, captured when `save` is called) and writes it as
``process_<i>-of-<n>.json`` in the item directory, the same naming grain
uses, so each process restores its own position.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from spmdnnx import errors


def state_file(process_index: int, process_count: int) -> str:
  return f"process_{process_index}-of-{process_count}.json"


class DataStateHandler(ocp.handlers.CheckpointHandler):
  """Saves/restores this process's data-iterator state as JSON."""

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = state_file(jax.process_index(), jax.process_count())
    (directory / name).write_text(args.text)

  def restore(self, directory: epath.Path, args: "DataStateRestore" = None) -> Any:
    directory = epath.Path(directory)
    name = state_file(jax.process_index(), jax.process_count())
    path = directory / name
    if not path.exists():
      present = sorted(os.listdir(directory)) if directory.exists() else []
      raise errors.CheckpointError(
          f"no data-iterator state for this process at {path}: the checkpoint has "
          f"{present or 'none'}. Data positions are per process, so a job with a "
          "different process count cannot resume them; restore without data= and "
          "reposition the iterator yourself.", path=str(path))
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> Any:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  """Save args: the iterator state already rendered as JSON text."""

  text: str


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  """Restore args (none needed: each process reads its own file)."""


def capture(data: Any) -> str:
  """``data.get_state()`` as JSON text, taken now (before training moves on).

  Raises:
    CheckpointError: if ``data`` has no ``get_state`` or its state is not JSON.
  """
  if not callable(getattr(data, "get_state", None)) or \
      not callable(getattr(data, "set_state", None)):
    raise errors.CheckpointError(
        f"data= must have get_state() and set_state(state) (a grain DatasetIterator "
        f"does), got {type(data).__name__}.")
  state = data.get_state()
  if isinstance(state, bytes):
    raise errors.CheckpointError(
        "data.get_state() returned bytes (a grain DataLoader iterator?); use a "
        "grain DatasetIterator (its state is a dict) or return a JSON-serializable dict.")
  try:
    return json.dumps(state)
  except (TypeError, ValueError) as e:
    raise errors.CheckpointError(
        f"data.get_state() is not JSON-serializable ({e}); return plain dicts, lists, "
        "numbers and strings.") from e
