"""Batches: a split's rows as the model's inputs, for training and scoring.

Batches are dicts of numpy arrays: `ids` int32 `[batch, fields]`, `label`
float32 `[batch]`, and for evaluation `mask` float32 `[batch]` (0 on padding);
a dataset with multi-hot fields adds `multi_ids` int32 `[batch,
multi_fields, max_len]` (-1 after each list's values), one with numeric
fields `dense` float32 `[batch, dense_fields]`. `model_inputs(batch)` is
what the model takes: `ids` and, when present, `multi_ids` and `dense`.

Training batches are global batches cut from a seeded permutation per
epoch, each process taking its share; evaluation batches are fixed-shape
and padded, with a mask; `shard` and `stack_batches` shape them for the
devices and for several steps per dispatch.
"""

from collections.abc import Iterator
import logging
import math

import ml_collections
import numpy as np

from datasets import core
from datasets import split as split_lib

# The keys of a batch that are the model's inputs, and their dtypes.
INPUTS = {'ids': np.int32, 'multi_ids': np.int32, 'dense': np.float32}


def check_batch_size(size: int, divisor: int, name: str, what: str) -> None:
  """Raises unless batch size `size` (of config key `name`, e.g.
  `'config.batch_size'`) is a positive multiple of `divisor` `what`s."""
  if size <= 0 or size % divisor:
    raise core.DataError(
      f'{name}={size} must be a positive multiple of the number of {what}'
      f' ({divisor}).'
    )


def model_inputs(batch: dict) -> dict:
  """The model's inputs of `batch`: `ids`, and `multi_ids` and `dense` when
  it has them, as keyword arguments of `model.apply`."""
  return {key: batch[key] for key in INPUTS if key in batch}


def model_fields(dataset: core.Dataset) -> dict:
  """The model's constructor arguments that describe the dataset's inputs
  besides `field_dims`: `multi_field_dims` and `num_dense`, when non-empty."""
  out = {}
  if dataset.multi_field_dims:
    out['multi_field_dims'] = tuple(dataset.multi_field_dims)
  if dataset.dense_names:
    out['num_dense'] = len(dataset.dense_names)
  return out


def example_inputs(model, rows: int = 2) -> dict:
  """Inputs of `rows` examples for `model.init`: id 0, empty lists, zeros."""
  out = {'ids': np.zeros((rows, len(model.field_dims)), np.int32)}
  if getattr(model, 'multi_field_dims', ()):
    shape = (rows, len(model.multi_field_dims), 1)
    out['multi_ids'] = np.full(shape, -1, np.int32)
  if getattr(model, 'num_dense', 0):
    out['dense'] = np.zeros((rows, model.num_dense), np.float32)
  return out


def _rows(split: core.Split, rows) -> dict[str, np.ndarray]:
  """`ids`, `label` and, when `split` has them, `multi_ids` and `dense`."""
  out = dict(ids=split.ids, label=split.labels, multi_ids=split.multi_ids)
  out['dense'] = split.dense
  return {key: x[rows] for key, x in out.items() if x is not None}


def num_train_steps(split: core.Split, batch_size: int) -> int:
  """Steps of one training epoch: full global batches only."""
  return len(split) // batch_size


def train_rows(
  split: core.Split,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[np.ndarray]:
  """This process's rows of each global training batch of one epoch.

  The epoch's order is a permutation seeded by `(seed, epoch)`, identical on
  every process, so the processes together see exactly the batches one
  process would, and a resumed run repeats the order of the epoch it redoes.
  The remainder is dropped: training never sees padded rows.

  Args:
    split: the training split.
    batch_size: global batch size, over all processes and devices.
    seed: shuffle seed.
    epoch: epoch number (0-based), mixed into the seed.
    shuffle: False: every epoch in the split's stored order (pytorch-fm's
      DataLoader), the same batches each epoch.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Yields:
    Row indices int32 `[batch_size / process_count]`, sorted.
  """
  check_batch_size(batch_size, process_count, 'config.batch_size', 'processes')
  local = batch_size // process_count
  if shuffle:
    perm = split_lib.permutation(
      len(split), np.random.default_rng([seed, epoch])
    )
  else:
    perm = split_lib.arange(len(split))
  for step in range(num_train_steps(split, batch_size)):
    # Sorted rows read a memory map front to back. The global batch is
    # sorted before it is cut, so that each device (and its dropout key)
    # gets the rows it gets in one process with as many devices.
    rows = np.sort(perm[step * batch_size : (step + 1) * batch_size])
    yield rows[process_index * local : (process_index + 1) * local].astype(
      np.int32
    )


def train_batches(
  split: core.Split, batch_size: int, **kwargs
) -> Iterator[dict]:
  """The batches (`ids`, `label`, ...) of `train_rows(split, ...)`'s rows."""
  for rows in train_rows(split, batch_size, **kwargs):
    yield _rows(split, rows)


def resident_split(
  split: core.Split, config: ml_collections.ConfigDict
) -> dict[str, np.ndarray] | None:
  """`split` as one batch to keep on the devices; None if it does not fit.

  It fits in `config.device_split_mb` MiB. A memory map is read into memory.
  """
  arrays = (split.ids, split.labels, split.multi_ids, split.dense)
  size = sum(a.nbytes for a in arrays if a is not None)
  fits = size <= config.device_split_mb * 2**20
  logging.info(
    'Training split: %.1f MiB, %s (config.device_split_mb=%d)',
    size / 2**20,
    'kept on the devices' if fits else 'read from the host batch by batch',
    config.device_split_mb,
  )
  if not fits:
    return None
  return {k: np.asarray(v) for k, v in _rows(split, slice(None)).items()}


def eval_batches(
  split: core.Split,
  batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape evaluation batches of this process's slice, with a mask.

  Process `p` evaluates the contiguous rows `[n*p/P, n*(p+1)/P)`. Every
  process yields the same number of batches (collectives need that); the
  last ones are padded with zero ids, empty lists (-1) in `multi_ids`, zero
  `dense` and `mask == 0`.

  Yields:
    Dicts with `ids` int32 `[batch_size / process_count, fields]`, `label`
    and `mask` float32 `[batch_size / process_count]`, and `multi_ids` and
    `dense` when the split has them.
  """
  check_batch_size(
    batch_size, process_count, 'config.eval_batch_size', 'processes'
  )
  local = batch_size // process_count
  bounds = [len(split) * p // process_count for p in range(process_count + 1)]
  lo, hi = bounds[process_index], bounds[process_index + 1]
  longest = max(np.diff(bounds))
  for b in range(max(1, math.ceil(longest / local))):
    start, stop = min(lo + b * local, hi), min(lo + (b + 1) * local, hi)
    batch = {}
    for key, rows in _rows(split, slice(start, stop)).items():
      fill = -1 if key == 'multi_ids' else 0
      dtype = INPUTS.get(key, np.float32)
      batch[key] = np.full((local,) + rows.shape[1:], fill, dtype)
      batch[key][: stop - start] = rows
    batch['mask'] = np.zeros((local,), np.float32)
    batch['mask'][: stop - start] = 1.0
    yield batch


def shard(batch: dict[str, np.ndarray], num_devices: int) -> dict:
  """Reshapes each `[B, ...]` array to `[num_devices, B / num_devices, ...]`."""
  out = {}
  for key, value in batch.items():
    check_batch_size(
      value.shape[0], num_devices, 'the per-process batch_size', 'devices'
    )
    out[key] = value.reshape((num_devices, -1) + value.shape[1:])
  return out


def stack_batches(
  batches: Iterator[dict], sizes: list[int], num_devices: int
) -> Iterator[dict]:
  """Stacks of `sizes` batches `[devices, max(sizes), B / devices]`, each
  shorter one ending in zero batches, which `train.train_steps` skips."""
  batches, length = iter(batches), max(sizes)
  for size in sizes:
    group = [shard(next(batches), num_devices) for _ in range(size)]
    if size < length:
      pad = {k: np.zeros_like(v) for k, v in group[0].items()}
      group += [pad] * (length - size)
    yield {key: np.stack([b[key] for b in group], axis=1) for key in group[0]}


def stack_rows(
  rows: Iterator[np.ndarray], sizes: list[int], num_devices: int
) -> Iterator[np.ndarray]:
  """`train_rows` stacked as `stack_batches` stacks their examples."""
  batches = ({'rows': r} for r in rows)
  for stack in stack_batches(batches, sizes, num_devices):
    yield stack['rows']  # [devices, size, B / devices]
