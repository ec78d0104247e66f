"""The seeded split of a dataset's rows, as pytorch-fm's, and row orders.

`split_indices` partitions the rows of a file that holds them all into
train, validation and test at random, from `config.dataset.seed`;
`permutation` shuffles a split's rows for an epoch. Both keep their indices
in int32 below 2**31 rows.
"""

from collections.abc import Sequence

import numpy as np

from datasets import core

# pytorch-fm's 8:1:1, `config.dataset.split` in configs/default.py.
DEFAULT = (0.8, 0.1, 0.1)


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
  """Rows of train / valid / test, as pytorch-fm: int() of the first two."""
  fractions = tuple(float(f) for f in fractions)
  if (
    len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6
  ):
    raise core.DataError(
      f'config.dataset.split must be three non-negative fractions summing'
      f' to 1, got {fractions}'
    )
  n_train, n_valid = int(n * fractions[0]), int(n * fractions[1])
  return n_train, n_valid, n - n_train - n_valid


def arange(n: int) -> np.ndarray:
  """`np.arange(n)`, in int32 when `n` allows.

  Half the memory below 2**31 rows: 160 MB for Criteo's 40M training rows.
  """
  return np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)


def permutation(n: int, rng: np.random.Generator) -> np.ndarray:
  """`rng.permutation(n)`: the same order, in `arange`'s dtype."""
  perm = arange(n)
  rng.shuffle(perm)
  return perm


def split_indices(
  n: int, fractions: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A seeded random partition of `range(n)` into train / valid / test."""
  n_train, n_valid, _ = split_sizes(n, fractions)
  perm = permutation(n, np.random.default_rng(seed))
  return tuple(np.split(perm, [n_train, n_train + n_valid]))
