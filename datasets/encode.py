"""Out-of-core encoding of text sources: two streaming passes over the files.

Pass 1 parses and validates every line in chunks of `chunk_rows` lines
(through the source's `core.Reader`), and counts the int64 keys of each
field over the training file: all of its rows when one file is split at
random, as pytorch-fm counts (a sorted array of distinct keys and their
counts: memory grows with the vocabulary, not with the rows). The kept keys
(seen at least `min_count` times) get dense ids in key order and every rarer
value one out-of-vocabulary id per field, the last one, as pytorch-fm does.
A multi-hot field's values are counted and kept the same way, and pass 1
finds the longest list, the `max_len` of the cache. Pass 2
(`Encoded.chunks`) parses the files again and looks the keys up; data.py
routes its chunks to the splits of the cache.
"""

from collections.abc import Callable, Iterator
import functools
import logging
import os
from typing import Any

import ml_collections
import numpy as np

from datasets import core
from datasets import parallel
from datasets import streaming


class Counts:
  """Occurrences of int64 keys of one field; memory O(distinct keys).

  Each chunk's distinct keys and counts wait in a list; once they number a
  quarter of the sorted totals, they are summed among themselves and
  looked up in the totals: the counts of keys found grow in place, the new
  keys are inserted (amortised O(n log n)). Counts are int32 until the
  keys added could overflow them. At peak a field holds its totals about
  twice (the old and the grown), not four times the totals and the waiting
  keys as one sort of them all would.
  """

  MIN_MERGE = 1 << 18  # Pending keys that trigger a merge, at least.
  MERGE_FRACTION = 4  # ... and at least the totals over this.

  def __init__(self):
    self.keys = np.empty(0, np.int64)
    self.counts = np.empty(0, np.int32)
    self._pending_keys, self._pending_counts = [], []
    self._pending_size = 0
    self._added = 0  # Keys added: no count can exceed it.

  def add(self, keys: np.ndarray) -> None:
    self.add_counted(*counted(keys))

  def add_counted(
    self, unique: np.ndarray, counts: np.ndarray, added: int
  ) -> None:
    """Adds `added` keys, given as their distinct keys and counts."""
    self._added += added
    self._pending_keys.append(unique)
    self._pending_counts.append(counts.astype(self._dtype()))
    self._pending_size += len(unique)
    limit = len(self.keys) // self.MERGE_FRACTION
    if self._pending_size >= max(limit, self.MIN_MERGE):
      self._merge()

  def _dtype(self) -> type:
    return np.int32 if self._added <= np.iinfo(np.int32).max else np.int64

  def _merge(self) -> None:
    if not self._pending_keys:
      return
    keys = np.concatenate(self._pending_keys)
    self._pending_keys = []
    counts = np.concatenate(self._pending_counts).astype(self._dtype())
    self._pending_counts, self._pending_size = [], 0
    if not len(keys):  # E.g. a multi-hot column whose lists are all empty.
      return
    order = np.argsort(keys, kind='stable')
    keys, counts = keys[order], counts[order]
    del order
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    keys = keys[starts]
    counts = np.add.reduceat(counts, starts, dtype=counts.dtype)
    del starts
    self.counts = self.counts.astype(counts.dtype, copy=False)
    at = np.searchsorted(self.keys, keys)
    if len(self.keys):
      found = self.keys[np.minimum(at, len(self.keys) - 1)] == keys
      self.counts[at[found]] += counts[found]  # Distinct keys: no clash.
      new = ~found
      del found
      at, keys, counts = at[new], keys[new], counts[new]
    # One array at a time, each let go once its grown copy is made.
    self.keys = np.insert(self.keys, at, keys)
    self.counts = np.insert(self.counts, at, counts)

  def kept(self, min_count: int) -> np.ndarray:
    """Sorted keys seen at least `min_count` times."""
    self._merge()
    return self.keys[self.counts >= min_count]


def encode_keys(vocabulary: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """Ids of `keys` `[n]` in a sorted `vocabulary`; the rest get `len(vocab)`."""
  if len(vocabulary) == 0:
    return np.zeros(len(keys), np.int32)
  pos = np.searchsorted(vocabulary, keys)
  hit = vocabulary[np.minimum(pos, len(vocabulary) - 1)] == keys
  return np.where(hit, pos, len(vocabulary)).astype(np.int32)


def encode_ids(
  vocabulary: tuple[np.ndarray, ...] | None, keys: np.ndarray
) -> np.ndarray:
  """int32 ids `[n, fields]` of int64 keys (as they are without vocabulary)."""
  if vocabulary is None:
    return keys.astype(np.int32)
  ids = np.empty(keys.shape, np.int32)
  for f, table in enumerate(vocabulary):
    ids[:, f] = encode_keys(table, keys[:, f])
  return ids


def encode_multi(
  vocabulary: tuple[np.ndarray, ...], keys: np.ndarray
) -> np.ndarray:
  """int32 ids `[n, multi_fields, len]` of multi-hot keys; padding -> -1.

  Args:
    vocabulary: per multi-hot field, its sorted kept keys.
    keys: int64 `[n, multi_fields, len]`, `core.PAD_KEY` after the values.
  """
  ids = np.empty(keys.shape, np.int32)
  for m, table in enumerate(vocabulary):
    ids[:, m] = encode_keys(table, keys[:, m].ravel()).reshape(ids[:, m].shape)
  return np.where(keys == core.PAD_KEY, np.int32(-1), ids)


def counted(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """`keys`' distinct keys, their counts and their number (`add_counted`)."""
  return *np.unique(keys, return_counts=True), len(keys)


def tally(count: bool, count_multi: bool, part: tuple) -> tuple:
  """Pass 1 of one parsed chunk, where it was parsed (a worker, if any).

  Args:
    count: whether to count the one-hot fields' keys.
    count_multi: whether to count the multi-hot fields' keys.
    part: `reader.parse`'s `(keys [n, fields], labels [n], *side)`.

  Returns:
    `(n, fields, longest, multi)`: the rows; per one-hot field, its keys
    `counted` (none unless `count`); the longest multi-hot list (0 without
    multi-hot fields); per multi-hot field, its keys `counted` (none unless
    `count_multi`).
  """
  keys, _, *side = part
  fields = [counted(k) for k in keys.T] if count else []
  longest, multi = 0, []
  if side and side[0].multi is not None:
    present = side[0].multi != core.PAD_KEY  # [n, M, L]
    longest = int(present.sum(-1).max(initial=0))
    for m in range(present.shape[1] if count_multi else 0):
      multi.append(counted(side[0].multi[:, m][present[:, m]]))
  return len(keys), fields, longest, multi


def encode_part(
  vocabulary: tuple[np.ndarray, ...] | None,
  multi_vocabulary: tuple[np.ndarray, ...],
  longest: int,
  part: tuple,
) -> tuple:
  """Pass 2 of one parsed chunk, where it was parsed (a worker, if any).

  Returns `(ids, labels)`, or `(ids, labels, multi_ids, dense)` where the
  source has side inputs: a `core.Chunk` without its role.
  """
  keys, labels, *side = part
  ids = encode_ids(vocabulary, keys)
  if not side:
    return ids, labels
  multi, dense = side[0]
  if multi is not None:
    multi = encode_multi(multi_vocabulary, multi[:, :, :longest])
  return ids, labels, multi, dense


def source_files(
  config: ml_collections.ConfigDict, find_splits: bool = False
) -> dict[str, str]:
  """Source files: {'all': path} (random split) or train / valid / test.

  Args:
    config: `config.dataset`.
    find_splits: in a `path` directory, also take the valid ('valid' or
      'dev' in the name) and test files when `valid_path` and `test_path`
      are not set.
  """
  name = config.name
  if not config.path:
    example = {'criteo': 'criteo/train.txt', 'csv': 'clicks.csv'}
    raise core.DataError(
      f'config.dataset.path: set it to the {name} file (e.g.'
      f' --config.dataset.path=/data/{example.get(name, f"{name}/train")}).'
    )
  path = os.path.abspath(os.path.expanduser(config.path))
  valid, test = config.valid_path, config.test_path
  if os.path.isdir(path):
    found, others = {}, []  # Others: not read without find_splits.
    for entry in sorted(os.listdir(path)):
      full = os.path.join(path, entry)
      if entry.startswith('.') or not os.path.isfile(full):
        continue
      low = entry.lower()
      if any(word in low for word in ('valid', 'dev', 'test')):
        others.append(entry)
      role = (
        'train'
        if 'train' in low
        else 'valid'
        if 'valid' in low or (find_splits and 'dev' in low)
        else 'test'
        if 'test' in low and find_splits
        else None
      )
      if role:
        found.setdefault(role, []).append(full)
    if any(len(v) > 1 for v in found.values()) or 'train' not in found:
      raise core.DataError(
        f'config.dataset.path: {path} is a directory; expected exactly one'
        f' file with "train" in its name, found {found.get("train", [])}.'
        ' Name the file itself instead.'
      )
    path = found['train'][0]
    if find_splits and not (valid or test):
      if 'valid' in found and 'test' in found:
        valid, test = found['valid'][0], found['test'][0]
    if not find_splits and others and not (valid or test):
      logging.warning(
        'config.dataset.path %s is a directory: %s trains, split at random;'
        ' %s there not read (labelled validation and test files are named'
        ' with config.dataset.valid_path and test_path).',
        config.path,
        os.path.basename(path),
        ', '.join(others),
      )
  files = {'all': path}
  if valid or test:
    if not (valid and test):
      raise core.DataError(
        'config.dataset.valid_path and config.dataset.test_path: set both'
        ' (predefined splits) or neither (random split of the path).'
      )
    files = {'train': path, 'valid': valid, 'test': test}
  for role, file in files.items():
    file = os.path.abspath(os.path.expanduser(file))
    files[role] = file
    if not os.path.isfile(file):
      key = {'valid': 'valid_path', 'test': 'test_path'}.get(role, 'path')
      problem = 'does not exist'
      if os.path.exists(file):  # A pipe (`<(zcat ...)`), a device.
        problem = (
          'is not a regular file: preprocessing reads its sources more than'
          ' once. Write it to a file first (`.gz` files are read as they are)'
        )
      raise core.DataError(f'config.dataset.{key}: {file} {problem}.')
  return files


def build_from(
  reader: Callable[[ml_collections.ConfigDict, str], core.Reader],
) -> Callable[..., core.Encoded]:
  """The `build` of a text source whose `reader(options, path)` parses a file.

  See datasets/core.py; `options` is the source's format section.
  """

  def build(config, options, paths) -> core.Encoded:
    return encode(config, paths, functools.partial(reader, options))

  return build


def encode(
  config: ml_collections.ConfigDict,
  files: dict[str, str],
  reader: Callable[[str], core.Reader],
  field_dims: tuple[int, ...] = (),
) -> core.Encoded:
  """Pass 1 over `files`; pass 2 is the returned `Encoded.chunks`.

  Args:
    config: `config.dataset`, its `min_count` resolved.
    files: {role: path}, as `source_files` returns.
    reader: `reader(path)` is the parser of file `path`; every file's fields
      must be those of the training file.
    field_dims: when given, the keys are the ids as they are (libFM with
      `field_dims`) and nothing is counted.

  Returns:
    The vocabulary and the row counts; `chunks()` makes pass 2.
  """
  train_role = 'all' if 'all' in files else 'train'
  readers = {role: reader(path) for role, path in files.items()}

  def names(role):
    r = readers[role]
    return (
      r.field_names,
      getattr(r, 'multi_field_names', ()),
      getattr(r, 'dense_names', ()),
    )

  field_names, multi_names, dense_names = names(train_role)
  for role, path in files.items():
    if names(role) != names(train_role):
      raise core.DataError(
        f'{path}: fields {sum(names(role), ())} differ from those of'
        f' {files[train_role]}: {sum(names(train_role), ())}. Give every file'
        " the training file's "
        + (
          'columns, or name the columns to read in config.dataset.csv'
          ' (categorical_columns, numeric_columns, float_columns,'
          ' multi_hot_columns; empty categorical_columns reads every other'
          ' column).'
          if config.name == 'csv'
          else 'fields.'
        )
      )
  logging.info(
    'Preprocessing %s from %s (min_count %d)',
    config.name,
    ', '.join(files.values()),
    config.min_count,
  )

  def passes(number, bad, then) -> Iterator[tuple[str, Any]]:
    """`(role, then(role)(parsed chunk))` of every file's chunks."""
    what = ('count', 'encode')[number - 1]
    for role, path in files.items():
      desc = f'{config.name} pass {number}/2 ({what}) {os.path.basename(path)}'
      parsed = streaming.chunks(
        readers[role],
        path,
        config.chunk_rows,
        bad,
        desc,
        config.get('parse_workers', 0),
        then(role),
      )
      for chunk in parsed:
        yield role, chunk

  # Pass 1: validate, count rows, count the training values of each field.
  # The chunks are counted where they are parsed, and their counts summed
  # here (the same totals).
  counts = [Counts() for _ in field_names]
  multi_counts = [Counts() for _ in multi_names]
  longest = 1
  bad = streaming.BadLines(config.skip_bad_lines)
  rows = dict.fromkeys(files, 0)

  def tally_of(role):
    train = role == train_role
    return functools.partial(tally, train and not field_dims, train)

  for role, (n, fields, most, multi) in passes(1, bad, tally_of):
    rows[role] += n
    for counter, counted_keys in zip(counts, fields, strict=False):
      counter.add_counted(*counted_keys)
    longest = max(longest, most)
    for counter, counted in zip(multi_counts, multi, strict=False):
      counter.add_counted(*counted)
  for role, path in files.items():
    if rows[role] == 0:  # Every line skipped: e.g. the wrong label column.
      why = (
        f'; {bad.count} malformed lines were skipped (the first logged'
        ' above): check the format options'
      )
      raise core.DataError(f'{path}: no examples found{why * bool(bad.count)}.')
  if field_dims:
    vocabulary = None
    kept = tuple(np.arange(d, dtype=np.int64) for d in field_dims)
  else:
    vocabulary = tuple(counter.kept(config.min_count) for counter in counts)
    kept, field_dims = vocabulary, tuple(len(v) + 1 for v in vocabulary)
  multi_vocabulary = tuple(c.kept(config.min_count) for c in multi_counts)
  del counts, multi_counts
  core.release_memory()  # The counts' heap, not held through pass 2.

  def pass_2() -> Iterator[core.Chunk]:
    # The keys are looked up where they are parsed, with the vocabulary
    # sent to each worker, unless it is too large to copy into each.
    encoded = functools.partial(
      encode_part, vocabulary, multi_vocabulary, longest
    )
    size = sum(v.nbytes for v in (*(vocabulary or ()), *multi_vocabulary))
    sent = encoded if size <= parallel.MAX_SENT_BYTES else None
    parsed = passes(2, streaming.BadLines(bad.skip, log=False), lambda _: sent)
    for role, part in parsed:
      yield role, *(part if sent else encoded(part))

  return core.Encoded(
    field_names=field_names,
    field_dims=tuple(int(d) for d in field_dims),
    vocabulary=kept,
    rows=rows,
    chunks=pass_2,
    skipped=bad.count,
    multi_field_names=multi_names,
    multi_field_dims=tuple(len(v) + 1 for v in multi_vocabulary),
    multi_vocabulary=multi_vocabulary,
    max_len=longest if multi_names else 0,
    dense_names=dense_names,
  )
