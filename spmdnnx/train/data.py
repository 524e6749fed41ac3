"""Deterministic synthetic data, so the launcher runs with no downloads."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


@dataclasses.dataclass
class SyntheticRegression:
  """Batches of (x, y) with y = tanh(x @ w_true) + noise; same seed, same data.

  >>> data = SyntheticRegression(in_features=4, out_features=2, batch_size=8, seed=0)
  >>> x, y = next(iter(data))
  >>> x.shape, y.shape
  ((8, 4), (8, 2))
  """

  in_features: int
  out_features: int
  batch_size: int
  seed: int = 0
  noise: float = 0.01

  def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(self.seed)
    w_true = rng.normal(size=(self.in_features, self.out_features)).astype(np.float32)
    w_true /= np.sqrt(self.in_features)
    while True:
      x = rng.normal(size=(self.batch_size, self.in_features)).astype(np.float32)
      y = np.tanh(x @ w_true) + self.noise * rng.normal(size=(self.batch_size, self.out_features))
      yield x, y.astype(np.float32)
