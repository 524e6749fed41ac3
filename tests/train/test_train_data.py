"""The byte pipeline: tokenizer, split, packing, per-process batches, state."""

import os

import numpy as np
import pytest

from spmdnnx import errors
from spmdnnx import train
from spmdnnx.train import _data

from train_helpers import SMALL_CORPUS


def test_encode_decode_roundtrip_and_separator():
  tokens = train.encode("héllo\0x")
  assert tokens.dtype == np.uint8
  assert 0 not in tokens.tolist()  # NUL bytes are dropped: 0 only separates documents
  assert train.decode(tokens) == "héllox"
  assert train.decode([104, 0, 105]) == "h\ni"


def test_split_is_by_path_and_deterministic(tmp_path):
  for i in range(40):
    (tmp_path / f"f{i:02d}.txt").write_text(f"doc {i}\n")
  root, files = train.list_files(str(tmp_path / "*.txt"))
  a_train, a_eval = train.split_files(root, files, 0.25)
  b_train, b_eval = train.split_files(root, list(reversed(files)), 0.25)
  assert sorted(a_eval) == sorted(b_eval) and a_eval
  assert not set(a_train) & set(a_eval)
  assert len(a_train) + len(a_eval) == 40
  # adding files never moves an existing file to the other split
  (tmp_path / "zz.txt").write_text("new")
  root2, files2 = train.list_files(str(tmp_path / "*.txt"))
  assert set(a_eval) <= set(train.split_files(root2, files2, 0.25)[1])


def test_glob_matching_nothing_is_a_data_error(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(errors.DataError, match="matches no file") as info:
    train.list_files(pattern)
  assert info.value.paths == [pattern]


def test_split_leaving_no_eval_file_is_an_error(tmp_path):
  (tmp_path / "only.txt").write_text("x")
  root, files = train.list_files(str(tmp_path / "*.txt"))
  with pytest.raises(errors.DataError, match="both need at least one"):
    train.split_files(root, files, 0.5)


def test_corpus_shorter_than_a_window_is_an_error():
  with pytest.raises(errors.DataError, match="fewer than one window"):
    _data.windows(np.ones((10,), np.uint8), seq_len=16)


def test_packing_joins_documents_with_separator(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"abc")
  (tmp_path / "b.txt").write_bytes(b"de")
  stream = _data.token_stream(sorted(str(p) for p in tmp_path.iterdir()))
  assert stream.tolist() == [97, 98, 99, 0, 100, 101, 0]
  w = _data.windows(stream, seq_len=2)
  assert w.tolist() == [[97, 98, 99], [0, 100, 101]]


def _windows(n=64, t=4):
  return (np.arange(n * (t + 1)) % 251 + 1).astype(np.uint8).reshape(n, t + 1)


def test_examples_shift_targets_by_one():
  ds = train.train_dataset(_windows(), global_batch=4, seed=0)
  b = ds[0]
  assert b["inputs"].shape == (4, 4) and b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_shuffle_depends_on_seed_and_covers_every_window_per_epoch():
  w = _windows()
  firsts = lambda ds, k: np.concatenate([ds[i]["inputs"][:, 0] for i in range(k)])
  a = firsts(train.train_dataset(w, global_batch=8, seed=0), 8)
  b = firsts(train.train_dataset(w, global_batch=8, seed=1), 8)
  assert sorted(a.tolist()) == sorted(w[:, 0].astype(int).tolist())  # one epoch = 64 windows
  assert not np.array_equal(a, b)
  assert np.array_equal(a, firsts(train.train_dataset(w, global_batch=8, seed=0), 8))
  # the next epoch is shuffled differently
  epoch2 = firsts(train.train_dataset(w, global_batch=8, seed=0), 16)[64:]
  assert not np.array_equal(a, epoch2)


def test_each_process_reads_its_block_of_every_global_batch():
  w = _windows()
  full = train.train_dataset(w, global_batch=8, seed=3)
  parts = [train.train_dataset(w, global_batch=8, seed=3, process_index=p, process_count=4)
           for p in range(4)]
  for k in range(5):
    joined = np.concatenate([p[k]["inputs"] for p in parts])
    np.testing.assert_array_equal(joined, full[k]["inputs"])


def test_eval_batches_are_fixed_and_wrap():
  w = _windows(n=6)
  batches = train.eval_batches(w, global_batch=4, num_batches=2)
  np.testing.assert_array_equal(batches[1]["inputs"][:2], w[[4, 5], :-1].astype(np.int32))
  np.testing.assert_array_equal(batches[1]["inputs"][2:], w[[0, 1], :-1].astype(np.int32))
  halves = train.eval_batches(w, global_batch=4, num_batches=2, process_index=1,
                              process_count=2)
  np.testing.assert_array_equal(halves[0]["targets"], batches[0]["targets"][2:])


def test_prefetcher_state_is_that_of_the_last_consumed_batch():
  ds = train.train_dataset(_windows(), global_batch=4, seed=0)
  placed = []
  pre = train.Prefetcher(ds, lambda b: placed.append(1) or b, depth=3)
  try:
    got = [next(pre)["inputs"] for _ in range(3)]
    state = pre.get_state()
    fourth = next(pre)["inputs"]
    assert len(placed) >= 4  # the thread reads ahead...
    pre.set_state(state)     # ...but the state resumes right after the 3rd batch
    np.testing.assert_array_equal(next(pre)["inputs"], fourth)
    for k, g in enumerate(got):
      np.testing.assert_array_equal(g, ds[k]["inputs"])
  finally:
    pre.close()


def test_prefetcher_surfaces_errors_of_the_reader():
  def bad(_):
    raise ValueError("broken placement")
  pre = train.Prefetcher(train.train_dataset(_windows(), global_batch=4, seed=0), bad)
  try:
    with pytest.raises(ValueError, match="broken placement"):
      next(pre)
  finally:
    pre.close()


def test_default_corpus_is_the_stdlib_sources():
  assert train.stdlib_glob().endswith(os.path.join("**", "*.py"))
  root, files = train.list_files(SMALL_CORPUS)
  assert files == sorted(files) and all(f.endswith(".py") for f in files)
