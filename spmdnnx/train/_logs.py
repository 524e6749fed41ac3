"""Per-process log files: ``DIR/logs/process_<i>.log``.

Every process of a job copies what it prints (stdout and stderr) and its
Python ``logging`` records (absl's included) into its own file, so a failure
on any host can be read after the job ends. Writing progress lines and metric
files only on process 0 is the loop's business; this module only captures.

>>> import tempfile, pathlib
>>> d = tempfile.mkdtemp()
>>> with process_log(d, process_index=0) as path:
...   print("hello from process 0")
hello from process 0
>>> "hello from process 0" in pathlib.Path(path).read_text()
True
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import traceback
from typing import IO, Any, Iterator

import jax
import numpy as np


def log_path(workdir: str | os.PathLike, process_index: int) -> pathlib.Path:
  """``DIR/logs/process_<i>.log``."""
  return pathlib.Path(workdir) / "logs" / f"process_{process_index}.log"


class _Tee:
  """A text stream that writes to a console stream and a log file."""

  def __init__(self, stream: IO[str], file: IO[str]):
    self._stream, self._file = stream, file

  def write(self, text: str) -> int:
    self._file.write(text)
    return self._stream.write(text)

  def flush(self) -> None:
    self._file.flush()
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


@contextlib.contextmanager
def process_log(workdir: str | os.PathLike, *, process_index: int) -> Iterator[pathlib.Path]:
  """Copies stdout, stderr and logging records into this process's log file.

  The file is appended to (a resumed run continues it). Restores the streams
  and removes the logging handler on exit; an exception leaving the block
  is written to the file (with its traceback) on its way out.

  Args:
    workdir: the run's directory.
    process_index: this process's rank.

  Yields:
    The log file's path.
  """
  path = log_path(workdir, process_index)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a", buffering=1) as file:
    handler = logging.StreamHandler(file)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s [process {process_index}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, file), _Tee(sys.stderr, file)
    try:
      yield path
    except BaseException:
      # What ends the process (an error, a SIGINT) is in its log too.
      file.write(traceback.format_exc())
      raise
    finally:
      sys.stdout, sys.stderr = saved
      root.removeHandler(handler)


#: Set to 1 to log every step's local batch (rows and checksum), not only the first.
LOG_LOCAL_BATCHES_ENV = "SPMDNNX_LOG_LOCAL_BATCHES"


def log_local_batch(step: int, first_step: int) -> bool:
  """Whether to log the local batch of ``step``: the run's first, or all when asked."""
  return step == first_step or os.environ.get(LOG_LOCAL_BATCHES_ENV, "") not in ("", "0")


def local_batch_line(step: int, batch: Any) -> str:
  """Which rows of a global batch this process holds, and their checksum.

  Reads only the addressable shards (each distinct block once), so it shows
  what this process loaded: in an N-process job each process holds its own
  rows, and the checksums of all processes add up to the single-process one.

  >>> import jax, numpy as np
  >>> x = jax.device_put(np.arange(8, dtype=np.int32).reshape(4, 2))
  >>> local_batch_line(1, {"inputs": x})
  'process 0 of 1: step 1 batch rows 0..3 of 4, checksum 28'
  """
  leaves = jax.tree.leaves(batch)
  rows: set[int] = set()
  checksum = 0
  for leaf in leaves:
    seen = set()
    for shard in leaf.addressable_shards:
      key = tuple((s.start, s.stop) for s in shard.index)
      if key in seen:
        continue
      seen.add(key)
      data = np.asarray(shard.data)
      checksum += int(data.astype(np.int64).sum()) if data.dtype.kind in "iub" else 0
      rows.update(range(*shard.index[0].indices(leaf.shape[0])))
  span = (f"{min(rows)}..{max(rows)}" if rows and max(rows) - min(rows) + 1 == len(rows)
          else ",".join(map(str, sorted(rows))))
  return (f"process {jax.process_index()} of {jax.process_count()}: step {step} batch rows "
          f"{span} of {leaves[0].shape[0]}, checksum {checksum}")
