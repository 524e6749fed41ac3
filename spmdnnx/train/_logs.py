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
from typing import IO, Iterator


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
  and removes the logging handler on exit.

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
    finally:
      sys.stdout, sys.stderr = saved
      root.removeHandler(handler)
