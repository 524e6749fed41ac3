"""`CheckpointManager`: periodic, async, sharded checkpoints of a training run.

One checkpoint step is an orbax step directory holding up to five items:
``model`` and ``optimizer`` (orbax StandardSave of the objects' States),
``data`` (this process's data-iterator position), ``metadata`` (the user's
config, JSON) and ``spmdnnx`` (the record `describe` prints, JSON). Orbax
writes each step in a temporary directory and renames it only when every
process has finished, so a step that was being written when the job died is
never listed, nor taken as the latest.

>>> import tempfile, jax.numpy as jnp
>>> import spmdnnx as nnx
>>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
>>> with CheckpointManager(tempfile.mkdtemp(), async_save=False) as mngr:
...   mngr.save(10, model=model, metadata={"lr": 0.1})
...   fresh = nnx.Linear(2, 3, rngs=nnx.Rngs(1))
...   info = mngr.restore(model=fresh)
True
>>> info.step, info.metadata, bool(jnp.all(fresh.kernel.value == model.kernel.value))
(10, {'lr': 0.1}, True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

try:  # orbax internals, used only to release threads a failed save strands
  from orbax.checkpoint._src.futures import future as _orbax_future
except ImportError:  # pragma: no cover - other orbax versions
  _orbax_future = None

from spmdnnx import errors
from spmdnnx.checkpointing import _convert
from spmdnnx.checkpointing import _data_state
from spmdnnx.checkpointing import _metadata
from spmdnnx.checkpointing import _restore


#: How an async save takes its copy of the state (see `CheckpointManager`).
SNAPSHOTS = ("device", "host")


@jax.jit
def _device_copy(arrays: list) -> list:
  # Outputs never alias non-donated inputs: these are fresh buffers, so the
  # caller may donate the originals while the copy is being written.
  return [jnp.copy(a) for a in arrays]


def _snapshot(tree: Any) -> Any:
  """A device-side copy of every jax.Array of ``tree`` (dispatched, not awaited)."""
  leaves, treedef = jax.tree.flatten(tree)
  idx = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array)]
  copies = _device_copy([leaves[i] for i in idx])
  for i, c in zip(idx, copies):
    leaves[i] = c
  return jax.tree.unflatten(treedef, leaves)


class CheckpointWarning(UserWarning):
  """A checkpoint problem that was worked around (e.g. a corrupted step skipped)."""


@dataclasses.dataclass(frozen=True)
class RestoreInfo:
  """What `CheckpointManager.restore` read besides the objects it filled.

  Attributes:
    step: the step restored.
    data_state: this process's data-iterator state (also passed to
      ``data.set_state``), or None if the checkpoint has none for it.
    metadata: the user metadata saved with the step (e.g. the config), or None.
    record: the checkpoint's own record (paths, shapes, axes, mesh, versions).
  """

  step: int
  data_state: Any
  metadata: Any
  record: dict


def _release_stranded(threads: list) -> None:
  """Lets orbax's commit threads of a failed save exit.

  In orbax 0.12.8, when the background creation of a step directory fails
  (e.g. permission denied), the item-commit threads keep waiting for the
  "directory created" signal for the coordination timeout (20+ minutes), and
  as they are not daemons the process cannot exit. Cancelling them and
  sending that signal lets them return at once.
  """
  if _orbax_future is None:
    return
  for t in threads:
    receive = getattr(t, "_receive_signals", None)
    if not t.is_alive() or receive is None or not callable(getattr(t, "cancel", None)):
      continue
    t.cancel()
    _orbax_future.set_signals(receive, operation_id=getattr(t, "_operation_id", None))


class _Unreadable(Exception):
  """A step that exists but cannot be read (corrupted, truncated, incomplete)."""

  def __init__(self, error: errors.CheckpointError):
    super().__init__(str(error))
    self.error = error


def _positive_int(name: str, value: Any, optional: bool) -> None:
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise errors.ConfigError(
        f"CheckpointManager: {name} must be a positive int{' or None' if optional else ''}, "
        f"got {value!r}.")


def _json_metadata(metadata: Any) -> Any:
  if hasattr(metadata, "to_dict") and callable(metadata.to_dict):
    metadata = metadata.to_dict()  # ml_collections.ConfigDict
  try:
    json.dumps(metadata)
  except (TypeError, ValueError) as e:
    raise errors.CheckpointError(
        f"metadata= must be JSON-serializable (dicts, lists, numbers, strings; a "
        f"ConfigDict is converted with to_dict()): {e}.") from e
  return metadata


class CheckpointManager:
  """Saves and restores model, optimizer, data position and metadata by step.

  Args:
    directory: where step directories are written (created if missing).
    save_interval_steps: `save` writes only on multiples of this (unless
      ``force=True``); the first save of a run follows the same rule.
    max_to_keep: keep at most this many recent steps (None: all).
    keep_period: also keep every step that is a multiple of this.
    async_save: write in the background, so training goes on (and may donate
      its buffers) while the step is written.
    snapshot: with ``async_save``, how `save` takes its copy of the state:
      ``"device"`` (default) dispatches a copy on the devices and returns at
      once, the copy to host memory and the writes run in a background
      thread (costs one transient copy of the saved state in device memory);
      ``"host"`` blocks while orbax copies every shard to host memory (no
      extra device memory). Multi-process jobs always save as ``"host"``
      does: orbax's cross-process barriers must run on the training thread.

  Raises:
    ConfigError: for a non-positive interval, count or period, or an unknown
      snapshot.
  """

  def __init__(self, directory: Any, *, save_interval_steps: int = 1,
               max_to_keep: int | None = None, keep_period: int | None = None,
               async_save: bool = True, snapshot: str = "device"):
    if snapshot not in SNAPSHOTS:
      raise errors.ConfigError(
          f"CheckpointManager: snapshot must be one of {SNAPSHOTS}, got {snapshot!r}.")
    _positive_int("save_interval_steps", save_interval_steps, optional=False)
    _positive_int("max_to_keep", max_to_keep, optional=True)
    _positive_int("keep_period", keep_period, optional=True)
    self.directory = os.path.abspath(os.fspath(directory))
    self._existed = os.path.isdir(self.directory)
    self._interval = save_interval_steps
    # Orbax's save runs cross-process barriers (collectives). In a
    # multi-process job they must be issued from the thread that runs the
    # training steps, in the same order on every process: from a second
    # thread they interleave differently across processes and deadlock. So the
    # device snapshot with a background orbax call is single-process only;
    # multi-process jobs use orbax's own async save (its writes still run in
    # the background).
    self._background = async_save and snapshot == "device" and jax.process_count() == 1
    self._thread: threading.Thread | None = None
    self._thread_error: BaseException | None = None
    self._last_save: int | None = None
    self._save_threads: list = []
    self._closed = False
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep,
        keep_period=keep_period, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._mngr = self._open()

  def _open(self) -> ocp.CheckpointManager:
    handlers = {
        "model": ocp.StandardCheckpointHandler(),
        "optimizer": ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
        _metadata.RECORD_ITEM: ocp.JsonCheckpointHandler(),
        "data": _data_state.DataStateHandler(),
    }
    try:
      return ocp.CheckpointManager(self.directory, options=self._options,
                                   item_handlers=handlers)
    except OSError as e:
      raise errors.CheckpointError(
          f"cannot create or open the checkpoint directory {self.directory}: {e}.",
          path=self.directory) from e

  # --- context manager -------------------------------------------------------
  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def _check_open(self, what: str) -> None:
    if self._closed:
      raise errors.CheckpointError(
          f"CheckpointManager.{what}: the manager for {self.directory} is closed.",
          path=self.directory)

  # --- steps -----------------------------------------------------------------
  def all_steps(self) -> list[int]:
    """Every complete step in the directory, ascending."""
    self._check_open("all_steps")
    if self._thread is not None:
      self._thread.join()  # orbax's manager is not shared with a running save
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_directory(self, step: int) -> str:
    """The directory of one step."""
    return os.path.join(self.directory, str(step))

  # --- save ------------------------------------------------------------------
  def save(self, step: int, *, model: Any = None, optimizer: Any = None, data: Any = None,
           metadata: Any = None, force: bool = False) -> bool:
    """Saves a step (in the background when ``async_save``).

    Args:
      step: the training step (a non-negative int).
      model: a Module (its whole State: Params, BatchStats, Rngs...).
      optimizer: an `nnx.Optimizer` (its step count and optax state; its model
        is not repeated) or any graph object.
      data: an iterator with ``get_state()``; its state is taken now.
      metadata: JSON-serializable user metadata (a ConfigDict is converted).
      force: save even if ``step`` is not on the save interval.

    Returns:
      Whether a checkpoint was started (False off the save interval).

    Raises:
      CheckpointError: nothing to save; a step that already exists; a state
        that cannot be saved; a previous background save that failed.
    """
    self._check_open("save")
    if isinstance(step, np.integer):
      step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise errors.CheckpointError(f"save: step must be a non-negative int, got {step!r}.",
                                   step=step)
    if model is None and optimizer is None and data is None and metadata is None:
      raise errors.CheckpointError(
          "save: nothing to save; pass model=, optimizer=, data= or metadata=.", step=step)
    if not force and step % self._interval != 0:
      self._raise_background_error(wait=False)
      return False
    self._raise_background_error(wait=True)
    if step in self._mngr.all_steps():
      raise errors.CheckpointError(
          f"save: step {step} already exists in {self.directory}; steps are never "
          "overwritten (delete the directory or save under a new step).",
          step=step, path=self.step_directory(step))
    args: dict[str, Any] = {}
    leaves: dict[str, list] = {}
    states = []
    for item, obj in (("model", model), ("optimizer", optimizer)):
      if obj is None:
        continue
      state = _convert.item_state(obj, item)
      leaves[item] = _convert.describe_leaves(state)
      states.append(state)
      if leaves[item]:
        tree = _convert.saveable(state)
        args[item] = ocp.args.StandardSave(_snapshot(tree) if self._background else tree)
    if data is not None:
      args["data"] = _data_state.DataStateSave(_data_state.capture(data))
    if metadata is not None:
      args["metadata"] = ocp.args.JsonSave(_json_metadata(metadata))
    record = _metadata.build_record(step, leaves, states, model)
    record["has_data"] = data is not None
    record["has_metadata"] = metadata is not None
    args[_metadata.RECORD_ITEM] = ocp.args.JsonSave(record)
    self._last_save = step
    if self._background:
      self._thread = threading.Thread(target=self._orbax_save_in_thread, args=(step, args),
                                      name=f"spmdnnx-save-{step}")
      self._thread.start()
      return True
    return self._orbax_save(step, args)

  def _orbax_save(self, step: int, args: dict) -> bool:
    before = set(threading.enumerate())
    try:
      saved = self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
    except errors.SpmdnnxError:
      raise
    except Exception as e:  # orbax/tensorstore errors: name the step and directory
      raise errors.CheckpointError(
          f"saving step {step} to {self.directory} failed: {type(e).__name__}: {e}",
          step=step, path=self.directory) from e
    finally:
      self._save_threads = [t for t in threading.enumerate() if t not in before]
    return bool(saved)

  def _orbax_save_in_thread(self, step: int, args: dict) -> None:
    try:
      self._orbax_save(step, args)
    except BaseException as e:  # pylint: disable=broad-except
      self._thread_error = e

  def _raise_background_error(self, wait: bool = True) -> None:
    """Raises the failure of an earlier background save, once.

    With ``wait=False`` a save still running is not waited for.
    """
    thread = self._thread
    if thread is not None:
      if not wait and thread.is_alive():
        return
      thread.join()
      self._thread = None
      error, self._thread_error = self._thread_error, None
      if error is not None:
        self._report_failure(error)
    if not wait and self._mngr.is_saving_in_progress():
      return
    try:
      self._mngr.wait_until_finished()
      self._mngr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._report_failure(e)

  def _report_failure(self, e: BaseException) -> None:
    step = self._last_save
    # Reported once: a fresh orbax manager lets the run save again later.
    _release_stranded(self._save_threads)
    try:
      self._mngr.close()
    except Exception:  # pylint: disable=broad-except
      pass
    self._mngr = self._open()
    cause = e.__cause__ if isinstance(e, errors.CheckpointError) and e.__cause__ else e
    raise errors.CheckpointError(
        f"the background save of step {step} to {self.directory} failed: "
        f"{type(cause).__name__}: {cause}. That step is not restorable; fix the cause "
        "(disk space, permissions) and save again.", step=step, path=self.directory) from e

  def wait_until_finished(self) -> None:
    """Blocks until background saves are written.

    Raises:
      CheckpointError: if a background save failed.
    """
    self._check_open("wait_until_finished")
    self._raise_background_error()

  def close(self) -> None:
    """Waits for background saves, then releases orbax's resources.

    Raises:
      CheckpointError: if a background save failed (the manager is closed anyway).
    """
    if self._closed:
      return
    try:
      self._raise_background_error()
    finally:
      self._closed = True
      self._mngr.close()

  # --- restore ---------------------------------------------------------------
  def restore(self, step: int | None = None, *, model: Any = None, optimizer: Any = None,
              data: Any = None, convert_layout: bool = False,
              fallback_to_previous: bool = False) -> RestoreInfo:
    """Restores a step into the given objects, in place.

    Each array is read straight into its target sharding: the sharding of the
    target's current array, else the one the active `use_sharding` rules give
    its logical axes, else replicated on the `jax.set_mesh` mesh, else one
    device. Targets may be abstract (``nnx.eval_shape``). ``restore(model=m)``
    alone is a params-only restore (eval, fine-tuning with a new optimizer).

    Args:
      step: the step to restore; None: the latest.
      model, optimizer: objects to fill (real or abstract).
      data: an iterator whose ``set_state`` receives this process's position.
      convert_layout: allow a `Stack` checkpoint into a model with a list of
        blocks at the same path, and back (model item only).
      fallback_to_previous: with ``step=None``, if the latest step cannot be
        read (corrupted, truncated), warn and restore the newest readable
        earlier step instead of raising.

    Returns:
      A `RestoreInfo` with the step, data state and metadata.

    Raises:
      CheckpointError: missing/empty directory, a step that does not exist, a
        corrupted step, an item the step lacks, or a structure mismatch
        (every mismatching path listed, with both shapes and axes).
    """
    self._check_open("restore")
    self._raise_background_error()
    steps = self.all_steps()
    if not steps:
      why = ("did not exist (it was created empty): check the path" if not self._existed
             else "contains no complete checkpoint")
      raise errors.CheckpointError(
          f"restore: the checkpoint directory {self.directory} {why}.", path=self.directory)
    if step is not None:
      if step not in steps:
        raise errors.CheckpointError(
            f"restore: step {step} does not exist in {self.directory}; available steps: "
            f"{errors.format_paths(steps)}.", step=step, path=self.directory)
      candidates = [step]
    else:
      candidates = sorted(steps, reverse=True)
    skipped = []
    for s in candidates:
      try:
        info = self._restore_step(s, model, optimizer, data, convert_layout)
      except _Unreadable as e:
        if step is not None or not fallback_to_previous:
          hint = ("" if step is not None else
                  " Pass fallback_to_previous=True to restore the newest readable earlier "
                  "step instead.")
          raise errors.CheckpointError(str(e.error) + hint, step=s,
                                       path=self.step_directory(s)) from e.error.__cause__
        skipped.append(str(e.error))
        continue
      if skipped:
        warnings.warn(CheckpointWarning(
            f"restored step {s} instead of the latest: skipped unreadable step(s): "
            + " | ".join(skipped)), stacklevel=2)
      return info
    raise errors.CheckpointError(
        f"restore: no readable step in {self.directory}: " + " | ".join(skipped),
        path=self.directory)

  def _restore_step(self, step: int, model: Any, optimizer: Any, data: Any,
                    convert_layout: bool) -> RestoreInfo:
    where = self.step_directory(step)
    try:
      record = _metadata.read_record(where)
    except errors.CheckpointError as e:
      raise _Unreadable(e) from e
    plans = {}
    for item, obj in (("model", model), ("optimizer", optimizer)):
      if obj is None:
        continue
      ckpt_leaves = _metadata.item_leaves(record, item)
      if ckpt_leaves is None:
        raise errors.CheckpointError(
            f"restore: step {step} at {where} has no {item} (it holds "
            f"{', '.join(record.get('items', {})) or 'no arrays'}); omit {item}=.",
            step=step, path=where, item=item)
      plans[item] = _restore.plan_item(obj, item, ckpt_leaves, record, step=step,
                                       where=where, convert_layout=convert_layout)
    if data is not None and not record.get("has_data"):
      raise errors.CheckpointError(
          f"restore: step {step} at {where} has no data-iterator state; omit data=.",
          step=step, path=where)
    args: dict[str, Any] = {item: ocp.args.StandardRestore(p.abstract)
                            for item, p in plans.items() if p.leaves}
    if record.get("has_metadata"):
      args["metadata"] = ocp.args.JsonRestore()
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**args)) if args else {}
    except errors.SpmdnnxError:
      raise
    except Exception as e:
      raise _Unreadable(errors.CheckpointError(
          f"restore: step {step} at {where} is corrupted or incomplete and cannot be "
          f"read ({type(e).__name__}: {_short(e)}).", step=step, path=where)) from e
    data_state = self._read_data(step, where, record, strict=data is not None)
    for item, plan in plans.items():
      if plan.leaves:
        _restore.apply_item(plan, restored[item])
    if data is not None:
      data.set_state(data_state)
    metadata = restored["metadata"] if "metadata" in args else None
    return RestoreInfo(step=step, data_state=data_state, metadata=metadata, record=record)

  def _read_data(self, step: int, where: str, record: dict, strict: bool) -> Any:
    if not record.get("has_data"):
      return None
    try:
      restored = self._mngr.restore(
          step, args=ocp.args.Composite(data=_data_state.DataStateRestore()))
    except errors.CheckpointError:
      if strict:
        raise
      return None
    except Exception as e:
      raise _Unreadable(errors.CheckpointError(
          f"restore: the data-iterator state of step {step} at {where} cannot be read "
          f"({type(e).__name__}: {_short(e)}).", step=step, path=where)) from e
    return restored["data"]


def _short(e: Exception, limit: int = 300) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= limit else text[:limit] + "..."
