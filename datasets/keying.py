"""Values to int64 keys: the classes that pytorch-fm gives them an id by.

Counting and encoding (datasets/encode.py) never hold strings: a
categorical string becomes its 64-bit hash (`string_keys`), an integer
pytorch-fm's Criteo class of it (`int_feature_keys`), and a multi-hot list
the keys of its values (`multi_hot_keys`). Two values share a key exactly
when pytorch-fm would give them one id.
"""

import functools
import math

import numpy as np

from datasets import core

# Key of an empty integer feature; integers are rejected beyond +-2**62.
MISSING_INT = np.iinfo(np.int64).min
INT_LIMIT = 1 << 62


@functools.cache
def log_bucket_edges() -> np.ndarray:
  """Smallest integer `v` with `int(math.log(v) ** 2) >= k`, k = 1, 2, ...

  `np.searchsorted(edges, v, side='right')` is then pytorch-fm's bucket of
  an integer `v > 2`, decided by the same `math.log` that pytorch-fm calls:
  no vectorised log can round a value across a bucket boundary.
  """
  edges = []
  while int(math.log(INT_LIMIT) ** 2) > len(edges):
    k, lo, hi = len(edges) + 1, 3, INT_LIMIT
    while lo < hi:
      mid = (lo + hi) // 2
      if int(math.log(mid) ** 2) >= k:
        hi = mid
      else:
        lo = mid + 1
    edges.append(lo)
  return np.array(edges, np.int64)


def int_feature_keys(
  values: np.ndarray, missing: np.ndarray, log_bucket: bool = True
) -> np.ndarray:
  """Keys of integer features by pytorch-fm's Criteo rule, vectorised.

  pytorch-fm maps an empty value to 'NULL', `v > 2` to `int(log(v) ** 2)`
  and other values to `v - 2`. The keys here are the same classes: a
  sentinel for missing values, the bucket (>= 1) for `v > 2`, and `v - 2`
  (<= 0) otherwise, so two values share a key exactly when they share
  pytorch-fm's string.

  Args:
    values: int64 `[n]` (any value where `missing`).
    missing: bool `[n]`, True for empty fields.
    log_bucket: False keeps every integer as its own key.

  Returns:
    int64 keys `[n]`.
  """
  values = np.asarray(values, np.int64)
  if log_bucket:
    buckets = np.searchsorted(log_bucket_edges(), values, side='right')
    keys = np.where(values > 2, buckets, values - 2)
  else:
    keys = values.copy()
  keys[missing] = MISSING_INT
  return keys


def string_keys(values: np.ndarray) -> np.ndarray:
  """int64 keys of categorical strings `[n]`: a fixed-key 64-bit hash.

  Distinct values of one field collide with probability about
  `distinct**2 / 2**65` (1e-5 for 10M values), and the hash is the same in
  every process and run, so ids are reproducible.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top

  return pd.util.hash_array(np.asarray(values, object)).view(np.int64)


def multi_hot_keys(cells: np.ndarray, sep: str, max_len: int) -> np.ndarray:
  """Keys int64 `[n, max_len]` of multi-hot cells like `'a|b|c'`.

  Each value is stripped and keyed as a categorical string (`string_keys`);
  empty values are dropped (an empty or missing cell is an empty list), a
  list keeps its first `max_len` values in their order (duplicates too),
  and `core.PAD_KEY` fills the rest.
  """
  out = np.full((len(cells), max_len), core.PAD_KEY, np.int64)
  lists = [
    [v for v in (p.strip() for p in str(c).split(sep)) if v][:max_len]
    if isinstance(c, str)
    else []
    for c in cells
  ]
  lengths = np.fromiter(map(len, lists), np.int64, len(lists))
  values = [v for row in lists for v in row]
  if values:
    rows = np.repeat(np.arange(len(lists)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = np.arange(len(values)) - starts
    out[rows, cols] = string_keys(np.array(values, object))
  return out
