"""Multi-hot ids and numeric values in the cache: checks and standardisation.

A source hands the cache raw numeric values (NaN where missing); the cache
keeps them in float64 until every split is written, computes each numeric
field's mean and standard deviation over the TRAINING split's present
values, and writes `(value - mean) / std` in float32, a missing value
becoming 0 (the training mean). A field whose training values are all
missing gets mean 0; a standard deviation of 0 (a constant field) or an
undefined one is taken as 1, so the values stay finite. A value beyond
float32's range, before or after standardisation, is a DataError, as inf is.
"""

from collections.abc import Iterator, Sequence
import os

import numpy as np

from datasets import core

# Rows per piece when a numeric file is read back.
CHUNK_ROWS = 1 << 16
FLOAT32_MAX = float(np.finfo(np.float32).max)


class OutOfRange(core.DataError):
  """A numeric value beyond float32's range; `row` is its row's index."""

  def __init__(self, message: str, row: int):
    super().__init__(message)
    self.row = row


def check_range(
  values: np.ndarray,
  names: Sequence[str],
  raw: np.ndarray | None = None,
  mean: np.ndarray | None = None,
  std: np.ndarray | None = None,
) -> None:
  """Raises OutOfRange at the first of `values` `[n, fields]` (NaN: missing)
  beyond float32's range, naming its field (`names`, or its index).

  Args:
    values: raw values, or standardised values of `raw` by `mean` and
      `std` (which the message then quotes).
    names: the fields' names, or () for their indices.
    raw: the raw values, when `values` are standardised.
    mean: the training mean per field.
    std: the training standard deviation per field.
  """
  bad = np.abs(values) > FLOAT32_MAX  # inf too; NaN is missing.
  if not bad.any():
    return
  row, f = (int(i) for i in np.argwhere(bad)[0])
  name = names[f] if names else f'#{f}'
  if raw is None:
    value = f'{values[row, f]:g} is'
  else:
    value = (
      f'{raw[row, f]:g} standardises to {values[row, f]:g} (mean'
      f' {mean[f]:g}, std {std[f]:g}), which is'
    )
  raise OutOfRange(
    f'numeric field {name}: {value} beyond float32 range'
    f' (+-{FLOAT32_MAX:.4g}); remove or rescale the value.',
    row,
  )


def multi_problem(multi_ids: np.ndarray, dims: np.ndarray) -> str | None:
  """What is wrong with multi-hot ids `[n, multi_fields, max_len]`.

  Ids must be in `[0, dims[m])` or -1, and -1 (padding) only after a list's
  values.
  """
  if not multi_ids.size:
    return None
  dims = dims.reshape(1, -1, 1)
  outside = (multi_ids < -1) | (multi_ids >= dims)
  if outside.any():
    fields = np.flatnonzero(outside.any(axis=(0, 2))).tolist()
    return f'multi-hot ids outside [-1, multi_field_dims) in field(s) {fields}'
  if ((multi_ids[..., 1:] >= 0) & (multi_ids[..., :-1] < 0)).any():
    return 'multi-hot ids after the -1 padding of a list'
  return None


def dense_problem(dense: np.ndarray, allow_missing: bool = False) -> str | None:
  """What is wrong with numeric values `[n, dense_fields]`.

  Args:
    dense: the values.
    allow_missing: NaN is allowed (raw values from a source).
  """
  bad = np.isinf(dense) if allow_missing else ~np.isfinite(dense)
  if not bad.any():
    return None
  fields = np.flatnonzero(bad.any(axis=0)).tolist()
  return f'numeric values that are not finite in field(s) {fields}'


def _pieces(raw: np.ndarray) -> Iterator[np.ndarray]:
  for start in range(0, len(raw), CHUNK_ROWS):
    yield np.asarray(raw[start : start + CHUNK_ROWS], np.float64)


def moments(
  raw: np.ndarray, names: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
  """Per column mean and standard deviation of the present values.

  Two passes in pieces (memory does not grow with the rows): the sum, then
  the squared deviations from the mean, as `np.nanmean` and `np.nanstd`.

  Args:
    raw: float64 `[n, dense_fields]`, NaN where missing (a memory map).
    names: the fields' names, for an error.

  Returns:
    float64 mean and std `[dense_fields]`: mean 0 without present values,
    std 1 where it is 0 or undefined.

  Raises:
    OutOfRange: a value beyond float32's range.
  """
  width = raw.shape[1]
  total, count, squares = np.zeros(width), np.zeros(width), np.zeros(width)
  for piece in _pieces(raw):
    check_range(piece, names)  # Then no sum below can overflow float64.
    total += np.nansum(piece, axis=0)
    count += np.count_nonzero(~np.isnan(piece), axis=0)
  mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  for piece in _pieces(raw):
    squares += np.nansum((piece - mean) ** 2, axis=0)
  std = np.sqrt(squares / np.maximum(count, 1))
  std = np.where((count > 0) & (std > 0) & np.isfinite(std), std, 1.0)
  return mean, std


def standardized(
  raw: np.ndarray,
  mean: np.ndarray,
  std: np.ndarray,
  names: Sequence[str] = (),
) -> Iterator[np.ndarray]:
  """float32 `(raw - mean) / std` in pieces of rows; missing (NaN) -> 0.

  Raises:
    OutOfRange: a value beyond float32's range, before or after (its row
      counted from the first of `raw`).
  """
  for start in range(0, len(raw), CHUNK_ROWS):
    piece = np.asarray(raw[start : start + CHUNK_ROWS], np.float64)
    try:
      check_range(piece, names)
      with np.errstate(over='ignore'):  # A tiny std.
        out = (piece - mean) / std
      check_range(out, names, piece, mean, std)
    except OutOfRange as e:
      raise OutOfRange(str(e), start + e.row) from None
    yield np.where(np.isnan(out), 0.0, out).astype(np.float32)


def write_standardised(
  writers, add, splits, sizes, num_dense, names: Sequence[str] = ()
) -> tuple:
  """Writes `{split}_dense` from the complete raw files, then deletes them.

  Args:
    writers: the cache's `{file: NpyWriter}`, with `{split}_dense_raw`.
    add: `add(file, dtype, shape)` opens another writer of the cache.
    splits: the split names, training first.
    sizes: rows per split.
    num_dense: numeric fields (0: nothing to do).
    names: the numeric fields' names, for an error (empty: their indices).

  Returns:
    Lists of the training split's mean and standard deviation per field.

  Raises:
    DataError: a value beyond float32's range, before or after
      standardisation (the cache's temporary files are then dropped).
  """
  if not num_dense:
    return [], []
  paths = {}
  for split in splits:
    writer = writers.pop(f'{split}_dense_raw')
    writer.close()
    paths[split] = writer.path
  split = splits[0]
  try:
    mean, std = moments(np.load(paths[split], mmap_mode='r'), names)
    for split, size in zip(splits, sizes, strict=True):
      writer = add(f'{split}_dense', np.float32, (size, num_dense))
      raw = np.load(paths[split], mmap_mode='r')
      for piece in standardized(raw, mean, std, names):
        writer.write(piece)
      del raw
      os.remove(paths[split])
  except OutOfRange as e:
    raise core.DataError(f'The {split} rows: {e}') from e
  return mean.tolist(), std.tolist()
