"""The input pipeline: byte tokenizer, packing, a grain loader, prefetch.

Text files are read as bytes; each byte is a token (vocabulary 256) and token
0 separates documents (NUL bytes inside a file are dropped). The default
corpus is the Python standard library's own ``.py`` files, present on every
machine. Files are split into train and eval by a hash of their path relative
to the corpus root, so the split never depends on the file order or on which
other files exist.

Each split is one token stream (documents joined by 0) cut into windows of
``seq_len + 1`` tokens; a window gives ``inputs = w[:-1]``, ``targets =
w[1:]``. Training windows go through a grain ``MapDataset``: shuffled by seed
(reshuffled every epoch), repeated forever, sliced so that each process reads
only its own rows of every global batch, and batched. The iterator's state is
one index, saved in every checkpoint, so a resumed run reads exactly the
batches the uninterrupted run would have read.

>>> tokens = encode("ab")
>>> tokens.tolist(), decode(tokens)
([97, 98], 'ab')
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import os
import queue
import sysconfig
import threading
import time
import zlib
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from spmdnnx import errors

#: Token that separates documents in the packed stream.
SEPARATOR = 0
#: Byte-level vocabulary size.
VOCAB_SIZE = 256


def encode(text: str | bytes) -> np.ndarray:
  """UTF-8 bytes of ``text`` as uint8 tokens (NUL bytes dropped)."""
  raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(raw.replace(b"\0", b""), dtype=np.uint8).copy()


def decode(tokens: Sequence[int] | np.ndarray) -> str:
  """Tokens back to text; separators become newlines, bad UTF-8 is replaced."""
  data = bytes(np.asarray(tokens, dtype=np.uint8).tolist())
  return data.replace(b"\0", b"\n").decode("utf-8", errors="replace")


def stdlib_glob() -> str:
  """The default corpus: every ``.py`` file of this Python's standard library."""
  return os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py")


def _excluded(path: str) -> bool:
  parts = path.split(os.sep)
  return "site-packages" in parts or "dist-packages" in parts


def list_files(pattern: str) -> tuple[str, list[str]]:
  """The sorted files a glob matches, and the root their paths are relative to.

  Args:
    pattern: a glob (``**`` recurses); empty selects `stdlib_glob`.

  Returns:
    ``(root, files)``.

  Raises:
    DataError: if the glob matches no file.
  """
  pattern = pattern or stdlib_glob()
  files = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p) and not _excluded(p))
  if not files:
    raise errors.DataError(
        f"data.path {pattern!r} matches no file. Give a glob of text files, e.g. "
        "--config.data.path='/data/corpus/**/*.txt' (quote it so the shell does not "
        "expand it), or leave it empty for the Python standard library's sources.",
        paths=[pattern])
  root = os.path.commonpath([os.path.dirname(f) for f in files])
  return root, files


def split_files(root: str, files: Sequence[str], eval_fraction: float
                ) -> tuple[list[str], list[str]]:
  """Splits files into (train, eval) by a CRC32 of the path relative to root.

  Raises:
    DataError: if either split would be empty.
  """
  cut = int(round(eval_fraction * 10_000))
  train, held_out = [], []
  for f in files:
    rel = os.path.relpath(f, root).replace(os.sep, "/")
    (held_out if zlib.crc32(rel.encode()) % 10_000 < cut else train).append(f)
  if not train or not held_out:
    raise errors.DataError(
        f"Splitting {len(files)} files with data.eval_fraction={eval_fraction} leaves "
        f"{len(train)} train and {len(held_out)} eval files; both need at least one. "
        "Use more files or change data.eval_fraction.", paths=list(files[:5]))
  return train, held_out


def token_stream(files: Sequence[str]) -> np.ndarray:
  """All files' tokens, each document followed by a `SEPARATOR`."""
  parts = []
  for f in files:
    with open(f, "rb") as fh:
      parts.append(encode(fh.read()))
    parts.append(np.zeros((1,), np.uint8))
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping ``[n, seq_len + 1]`` windows of a token stream.

  Raises:
    DataError: if the stream is shorter than one window.
  """
  n = len(stream) // (seq_len + 1)
  if n == 0:
    raise errors.DataError(
        f"The corpus has {len(stream)} tokens, fewer than one window of seq_len + 1 = "
        f"{seq_len + 1}; use more text or a smaller seq_len.")
  return stream[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def _to_example(window: np.ndarray) -> dict[str, np.ndarray]:
  window = window.astype(np.int32)
  return {"inputs": window[:-1], "targets": window[1:]}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A corpus split into packed train and eval windows.

  Attributes:
    train: ``[n_train, seq_len + 1]`` uint8 windows.
    eval: ``[n_eval, seq_len + 1]`` uint8 windows.
    train_files / eval_files: the files of each split.
  """

  train: np.ndarray
  eval: np.ndarray
  train_files: tuple[str, ...]
  eval_files: tuple[str, ...]

  @classmethod
  def load(cls, pattern: str, seq_len: int, eval_fraction: float) -> "Corpus":
    """Reads, splits and packs the files a glob matches.

    Raises:
      DataError: for a glob matching nothing, or a split too small.
    """
    root, files = list_files(pattern)
    train_files, eval_files = split_files(root, files, eval_fraction)
    return cls(windows(token_stream(train_files), seq_len),
               windows(token_stream(eval_files), seq_len),
               tuple(train_files), tuple(eval_files))


def train_dataset(train_windows: np.ndarray, *, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This process's batches of training examples, forever.

  Windows are shuffled by ``seed`` (a new order every epoch); global batch
  ``k`` is windows ``[k * global_batch, (k + 1) * global_batch)`` of that
  order, and this process reads its contiguous block of rows of it.

  Args:
    train_windows: ``[n, seq_len + 1]`` windows.
    global_batch: sequences per step over all processes.
    seed: shuffle seed.
    process_index / process_count: which block of each batch to read.

  Returns:
    A grain MapDataset of ``{"inputs", "targets"}`` int32 ``[local, seq_len]``.
  """
  local = global_batch // process_count
  ds = grain.MapDataset.source(train_windows).shuffle(seed=seed).repeat(None)
  # Row r of global batch k is element k * global_batch + r; keep this
  # process's rows [p * local, (p + 1) * local) of every batch.
  base = process_index * local

  def pick(index: int) -> int:
    batch, row = divmod(index, local)
    return batch * global_batch + base + row

  rows = grain.MapDataset.range(len(ds) // global_batch * local).map(pick)
  picked = rows.map(lambda i: ds[i])
  return picked.map(_to_example).batch(local, drop_remainder=True)


def eval_batches(eval_windows: np.ndarray, *, global_batch: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The fixed held-out batches (unshuffled, wrapping), this process's rows."""
  local = global_batch // process_count
  out = []
  n = len(eval_windows)
  for k in range(num_batches):
    start = k * global_batch + process_index * local
    idx = np.arange(start, start + local) % n
    w = eval_windows[idx].astype(np.int32)
    out.append({"inputs": w[:, :-1], "targets": w[:, 1:]})
  return out


class Prefetcher:
  """Reads host batches and places them on the mesh in a background thread.

  Wraps a grain iterator; ``place`` turns a host batch into global arrays
  (e.g. `spmdnnx.global_batch_from_local`). Up to ``depth`` ready batches wait
  in a queue. `get_state` returns the grain state *after the last batch the
  caller took*, not after the last batch the thread read ahead, so a
  checkpoint resumes at the right batch.

  Args:
    dataset: a grain MapDataset or IterDataset of host batches.
    place: host batch -> device batch (runs in the thread).
    depth: batches read ahead.
  """

  def __init__(self, dataset: Any, place: Callable[[Any], Any], *, depth: int = 2):
    self._dataset = dataset
    self._place = place
    self._depth = max(1, depth)
    self._iter = iter(dataset.to_iter_dataset() if isinstance(dataset, grain.MapDataset)
                      else dataset)
    self._state = self._iter.get_state()
    self.wait_s = 0.0  # total time `__next__` waited for a batch
    self._start()

  def _start(self) -> None:
    self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, name="spmdnnx-prefetch", daemon=True)
    self._thread.start()

  def _work(self) -> None:
    try:
      while not self._stop.is_set():
        host = next(self._iter)
        item = (self._place(host), self._iter.get_state(), None)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced to the consumer
      self._queue.put((None, None, e))

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    t0 = time.perf_counter()
    batch, state, error = self._queue.get()
    self.wait_s += time.perf_counter() - t0
    if error is not None:
      raise error
    self._state = state
    return batch

  def _halt(self) -> None:
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.05)
      except queue.Empty:
        pass
    self._thread.join()

  def get_state(self) -> dict:
    """The grain state after the last batch returned by `__next__`."""
    return dict(self._state)

  def set_state(self, state: dict) -> None:
    """Restarts reading at ``state`` (a `get_state` result)."""
    self._halt()
    self._iter.set_state(dict(state))
    self._state = self._iter.get_state()
    self._start()

  def close(self) -> None:
    """Stops the background thread."""
    self._halt()
