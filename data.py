"""Datasets: the registry of sources, the cache, the split and the batches.

A dataset is a table of categorical fields encoded to dense ids
`0..field_dims[f]-1`, with a 0/1 label, split into train, validation and
test. `config.dataset.name` picks a source module of datasets/; its format
keys sit in `config.dataset.<format>`. Encoded splits are cached as `.npy`
files (memory-mapped when read), under a key of the source files and of
every option, so a second run starts in seconds and a changed input never
serves stale data.

Batches are dicts of numpy arrays: `ids` int32 `[batch, fields]`, `label`
float32 `[batch]`, and for evaluation `mask` float32 `[batch]` (0 on padding).
"""

from collections.abc import Iterator, Sequence
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile

import ml_collections
import numpy as np

from datasets import core
from datasets import encode

# Re-exported: the names that training, benchmarks and tests use.
DataError = core.DataError
DownloadError = core.DownloadError
Dataset = core.Dataset
Split = core.Split
cache_dir = core.cache_dir

ROOT = os.path.dirname(os.path.abspath(__file__))

# The registry: format -> its source module, datasets/<format>.py, whose
# format keys are config.dataset.<format>. A new source is a new module and
# its name here.
FORMATS = ('movielens', 'criteo', 'avazu', 'libfm', 'csv')
SOURCES = {f: importlib.import_module(f'datasets.{f}') for f in FORMATS}

# Every config.dataset.name, and the format that serves it.
FORMAT_OF = {name: fmt for fmt, s in SOURCES.items() for name in s.NAMES}

# Keys of config.dataset that every format reads.
SHARED_KEYS = (
  *('name', 'path', 'valid_path', 'test_path', 'cache_dir', 'url', 'split'),
  *('seed', 'min_count', 'skip_bad_lines', 'chunk_rows'),
)

# Bump when the cache's files or any encoding change: part of every key.
CACHE_VERSION = 2

SPLITS = ('train', 'valid', 'test')


def format_defaults() -> dict[str, ml_collections.ConfigDict]:
  """`{format: its keys and defaults}`, the sections of `config.dataset`."""
  return {
    fmt: ml_collections.ConfigDict(source.DEFAULTS)
    for fmt, source in SOURCES.items()
    if source.DEFAULTS
  }


def resolve(config: ml_collections.ConfigDict):
  """Checks `config.dataset` and picks its source.

  Returns:
    (the source module, `config` with `min_count` resolved, its format
    keys as a ConfigDict with the defaults filled in).

  Raises:
    DataError: an unknown name or key, or a key of another format set.
  """
  if config.name not in FORMAT_OF:
    raise DataError(
      f'config.dataset.name: unknown dataset {config.name!r}; choose one of'
      f' {", ".join(FORMAT_OF)}.'
    )
  selected = FORMAT_OF[config.name]
  for key in sorted(set(config.keys()) - set(SHARED_KEYS) - set(SOURCES)):
    owner = next((f for f, s in SOURCES.items() if key in s.DEFAULTS), '')
    hint = f' (it is config.dataset.{owner}.{key} now)' if owner else ''
    raise DataError(f'config.dataset.{key}: unknown key{hint}.')
  for fmt, source in SOURCES.items():
    for key, value in (config.get(fmt) or {}).items():
      if key not in source.DEFAULTS:
        raise DataError(f'config.dataset.{fmt}.{key}: unknown key.')
      if fmt != selected and value != source.DEFAULTS[key]:
        raise DataError(
          f'config.dataset.{fmt}.{key} is set but config.dataset.name is'
          f' {config.name!r}.'
        )
  if config.chunk_rows <= 0:
    raise DataError(
      f'config.dataset.chunk_rows must be positive, got {config.chunk_rows}'
    )
  source = SOURCES[selected]
  options = ml_collections.ConfigDict(source.DEFAULTS)
  options.update(dict(config.get(selected) or {}))
  config = ml_collections.ConfigDict(config.to_dict())
  if config.min_count < 0:
    config.min_count = source.MIN_COUNT
  return source, config, options


# --------------------------------------------------------------------------
# The seeded split.


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
  """Rows of train / valid / test, as pytorch-fm: int() of the first two."""
  fractions = tuple(float(f) for f in fractions)
  if (
    len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6
  ):
    raise DataError(
      f'config.dataset.split must be three non-negative fractions summing'
      f' to 1, got {fractions}'
    )
  n_train, n_valid = int(n * fractions[0]), int(n * fractions[1])
  return n_train, n_valid, n - n_train - n_valid


def _permutation(n: int, rng: np.random.Generator) -> np.ndarray:
  """`rng.permutation(n)`: the same order, in int32 when `n` allows.

  Half the memory below 2**31 rows: 160 MB for Criteo's 40M training rows.
  """
  if n >= 2**31:
    return rng.permutation(n)
  perm = np.arange(n, dtype=np.int32)
  rng.shuffle(perm)
  return perm


def split_indices(
  n: int, fractions: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A seeded random partition of `range(n)` into train / valid / test."""
  n_train, n_valid, _ = split_sizes(n, fractions)
  perm = _permutation(n, np.random.default_rng(seed))
  return (
    perm[:n_train],
    perm[n_train : n_train + n_valid],
    perm[n_train + n_valid :],
  )


# --------------------------------------------------------------------------
# The cache: one directory per key, `{split}_ids.npy`, `{split}_labels.npy`,
# `vocab.npy` (every field's keys in id order, end to end) and `meta.json`.


def fingerprint(path: str) -> dict:
  """Identifies a source file's version cheaply: size, mtime and edges.

  Hashing the first and last MiB next to size and modification time catches
  a replaced or edited file without reading gigabytes.
  """
  stat = os.stat(path)
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    digest.update(f.read(1 << 20))
    if stat.st_size > 1 << 20:
      f.seek(max(stat.st_size - (1 << 20), 1 << 20))
      digest.update(f.read())
  return {
    'path': os.path.abspath(path),
    'size': stat.st_size,
    'mtime_ns': stat.st_mtime_ns,
    'sha256_edges': digest.hexdigest(),
  }


def cache_spec(
  config: ml_collections.ConfigDict,
  options: ml_collections.ConfigDict,
  paths: dict[str, str],
) -> dict:
  """Everything the encoded arrays depend on: the cache key's input."""
  out = {
    'version': CACHE_VERSION,
    'name': config.name,
    'sources': {role: fingerprint(path) for role, path in paths.items()},
    'min_count': config.min_count,
    'skip_bad_lines': config.skip_bad_lines,
    'options': options.to_dict(),
  }
  if 'all' in paths:
    out.update(split=list(config.split), seed=config.seed)
  return out


def cache_key(spec: dict) -> str:
  """A short stable hash of a JSON-able description of the preprocessing."""
  blob = json.dumps(spec, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Written into a temporary cache directory: who is filling it.
_OWNER = 'owner.json'


def _remove_stale_tmp(parent: str) -> None:
  """Deletes temporary cache directories of dead runs on this host.

  A killed preprocessing run leaves its `.tmp-*` directory (up to the size
  of the encoded data); its `owner.json` names the host and process, so a
  later run on the same host removes it once that process is gone.
  """
  for entry in (e for e in os.listdir(parent) if e.startswith('.tmp-')):
    path = os.path.join(parent, entry)
    try:
      with open(os.path.join(path, _OWNER)) as f:
        owner = json.load(f)
    except (OSError, ValueError):
      continue  # Not ours, or being created.
    if owner.get('host') != socket.gethostname():
      continue
    try:
      os.kill(int(owner['pid']), 0)
    except ProcessLookupError:
      logging.info('Removing %s, left by a run that died', path)
      shutil.rmtree(path, ignore_errors=True)
    except (PermissionError, KeyError, ValueError, TypeError, OverflowError):
      pass  # Alive (another user's process) or unreadable: leave it.


def _routed(encoded: core.Encoded, config) -> Iterator[tuple]:
  """`(split index, ids, labels)` pieces: by the file's role, or at random."""
  if 'all' not in encoded.rows:
    for role, ids, labels in encoded.chunks():
      yield SPLITS.index(role), ids, labels
    return
  parts = split_indices(encoded.rows['all'], config.split, config.seed)
  if encoded.in_memory:  # Each split in the order of the permutation.
    [(_, ids, labels)] = encoded.chunks()
    for s, part in enumerate(parts):
      yield s, ids[part], labels[part]
    return
  # Streamed: one byte per row says its split; rows stay in file order.
  assignment = np.full(encoded.rows['all'], 2, np.int8)
  assignment[parts[0]], assignment[parts[1]] = 0, 1
  del parts
  row = 0
  for _, ids, labels in encoded.chunks():
    where = assignment[row : row + len(ids)]
    if len(where) != len(ids):
      raise DataError(f'{config.name}: more rows than in pass 1 (changed?)')
    for s in range(len(SPLITS)):
      yield s, ids[where == s], labels[where == s]
    row += len(ids)


def write_cache(
  directory: str, encoded: core.Encoded, config, spec: dict
) -> None:
  """Splits and writes `encoded` to `directory` atomically.

  The arrays go to a temporary directory beside it, renamed into place only
  when complete, so an interrupted run never leaves a cache that a later
  run would trust. A concurrent writer (another process of a multi-host
  run) that finished first wins; its cache holds the same arrays.
  """
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_tmp(parent)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.tmp-{config.name}-')
  owner = os.path.join(tmp, _OWNER)
  with open(owner, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getpid()}, f)
  if 'all' in encoded.rows:
    sizes = split_sizes(encoded.rows['all'], config.split)
  else:
    sizes = tuple(encoded.rows[split] for split in SPLITS)
  logging.info(
    '%s: %s examples, field_dims %s', config.name, sizes, encoded.field_dims
  )
  num_fields = len(encoded.field_names)
  writers = []
  try:
    for split, size in zip(SPLITS, sizes, strict=True):
      path = os.path.join(tmp, split)
      writers += [  # Flat: ids and labels of train, then of valid, of test.
        encode.NpyWriter(f'{path}_ids.npy', np.int32, (size, num_fields)),
        encode.NpyWriter(f'{path}_labels.npy', np.float32, (size,)),
      ]
    for s, ids, labels in _routed(encoded, config):
      writers[2 * s].write(ids)
      writers[2 * s + 1].write(labels)
    for writer in writers:
      writer.close()
    vocabulary = [np.asarray(v, np.int64) for v in encoded.vocabulary]
    np.save(
      os.path.join(tmp, 'vocab.npy'),
      np.concatenate(vocabulary),
      allow_pickle=False,
    )
    for source in spec['sources'].values():
      if fingerprint(source['path']) != source:
        raise DataError(f'{source["path"]} changed during preprocessing.')
    meta = {
      'name': config.name,
      'field_names': list(encoded.field_names),
      'field_dims': list(encoded.field_dims),
      # Field f's keys are vocab.npy[sum(sizes[:f]):][:sizes[f]]; its ids
      # from sizes[f] on are out of vocabulary.
      'vocabulary_sizes': [len(v) for v in vocabulary],
      'spec': spec,
      'examples': dict(zip(SPLITS, sizes, strict=True)),
      'skipped_lines': encoded.skipped,
    }
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.remove(owner)
    try:
      os.rename(tmp, directory)
    except OSError:
      if not os.path.isfile(os.path.join(directory, 'meta.json')):
        raise
    logging.info('Wrote %s', directory)
  finally:
    for writer in writers:
      writer.file.close()
    shutil.rmtree(tmp, ignore_errors=True)


def read_cache(directory: str) -> Dataset:
  """Opens a cache written by `write_cache`, memory-mapping the arrays."""
  with open(os.path.join(directory, 'meta.json')) as f:
    meta = json.load(f)
  if meta['skipped_lines']:
    logging.warning(
      '%s: skipped %d malformed lines (config.dataset.skip_bad_lines)',
      meta['name'],
      meta['skipped_lines'],
    )

  def load(name):
    return np.load(os.path.join(directory, f'{name}.npy'), mmap_mode='r')

  ends = np.cumsum(meta['vocabulary_sizes'])
  vocabulary = load('vocab')
  return Dataset(
    name=meta['name'],
    field_names=tuple(meta['field_names']),
    field_dims=tuple(meta['field_dims']),
    **{s: Split(load(f'{s}_ids'), load(f'{s}_labels')) for s in SPLITS},
    vocabulary=tuple(np.split(vocabulary, ends[:-1])),
  )


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Loads (from the cache when possible) the dataset `config.dataset`.

  Args:
    config: the `dataset` part of the config.

  Returns:
    The encoded dataset, its splits memory-mapped from the cache.

  Raises:
    DataError: unknown name or key, missing path or malformed file.
  """
  source, config, options = resolve(config)
  paths = source.files(config)
  if 'all' in paths:
    split_sizes(1, config.split)  # Validates the fractions before any work.
  spec = cache_spec(config, options, paths)
  directory = os.path.join(
    cache_dir(config), 'encoded', f'{config.name}-{cache_key(spec)}'
  )
  if not os.path.isfile(os.path.join(directory, 'meta.json')):
    write_cache(directory, source.build(config, options, paths), config, spec)
  return read_cache(directory)


# --------------------------------------------------------------------------
# Batches.


def check_batch_size(size: int, divisor: int, name: str, what: str) -> None:
  """Raises unless batch size `size` (of config key `name`, e.g.
  `'config.batch_size'`) is a positive multiple of `divisor` `what`s."""
  if size <= 0 or size % divisor:
    raise DataError(
      f'{name}={size} must be a positive multiple of the number of {what}'
      f' ({divisor}).'
    )


def num_train_steps(split: Split, batch_size: int) -> int:
  """Steps of one training epoch: full global batches only."""
  return len(split) // batch_size


def train_batches(
  split: Split,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of each global training batch of one epoch.

  The epoch's order is a permutation seeded by `(seed, epoch)`, identical on
  every process, so the processes together see exactly the batches one
  process would, and a resumed run repeats the order of the epoch it redoes.
  The remainder is dropped: training never sees padded rows.

  Args:
    split: the training split.
    batch_size: global batch size, over all processes and devices.
    seed: shuffle seed.
    epoch: epoch number (0-based), mixed into the seed.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Yields:
    Dicts with `ids` int32 `[batch_size / process_count, fields]` and `label`
    float32 `[batch_size / process_count]`.
  """
  check_batch_size(batch_size, process_count, 'config.batch_size', 'processes')
  local = batch_size // process_count
  perm = _permutation(len(split), np.random.default_rng([seed, epoch]))
  for step in range(num_train_steps(split, batch_size)):
    start = step * batch_size + process_index * local
    # Sorted rows read a memory map front to back; the rows of a batch are
    # a set, so their order does not matter.
    rows = np.sort(perm[start : start + local])
    yield {'ids': split.ids[rows], 'label': split.labels[rows]}


def eval_batches(
  split: Split,
  batch_size: int,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape evaluation batches of this process's slice, with a mask.

  Process `p` evaluates the contiguous rows `[n*p/P, n*(p+1)/P)`. Every
  process yields the same number of batches (collectives need that); the
  last ones are padded with zero ids and `mask == 0`.

  Yields:
    Dicts with `ids` int32 `[batch_size / process_count, fields]`, `label`
    and `mask` float32 `[batch_size / process_count]`.
  """
  check_batch_size(
    batch_size, process_count, 'config.eval_batch_size', 'processes'
  )
  local = batch_size // process_count
  bounds = [len(split) * p // process_count for p in range(process_count + 1)]
  lo, hi = bounds[process_index], bounds[process_index + 1]
  longest = max(np.diff(bounds))
  num_fields = split.ids.shape[1]
  for b in range(max(1, math.ceil(longest / local))):
    start, stop = min(lo + b * local, hi), min(lo + (b + 1) * local, hi)
    count = stop - start
    ids = np.zeros((local, num_fields), np.int32)
    label = np.zeros((local,), np.float32)
    mask = np.zeros((local,), np.float32)
    ids[:count] = split.ids[start:stop]
    label[:count] = split.labels[start:stop]
    mask[:count] = 1.0
    yield {'ids': ids, 'label': label, 'mask': mask}


def shard(batch: dict[str, np.ndarray], num_devices: int) -> dict:
  """Reshapes each `[B, ...]` array to `[num_devices, B / num_devices, ...]`."""
  out = {}
  for key, value in batch.items():
    check_batch_size(
      value.shape[0], num_devices, 'the per-process batch_size', 'devices'
    )
    out[key] = value.reshape((num_devices, -1) + value.shape[1:])
  return out
