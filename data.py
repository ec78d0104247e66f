"""Datasets, their cache, and the batch iterators of training and evaluation.

A dataset is a table of categorical fields encoded to dense ids
`0..field_dims[f]-1`, with a 0/1 label, split at random into train, validation
and test. Encoded splits are cached as `.npy` files (memory-mapped when read),
under a key of the source files and of every preprocessing option, so that a
second run starts in seconds and a changed input never serves stale data.

Batches are dicts of numpy arrays: `ids` int32 `[batch, fields]`, `label`
float32 `[batch]`, and for evaluation `mask` float32 `[batch]` (0 on padding).
"""

from collections.abc import Iterator, Sequence
import dataclasses
import hashlib
import http.client
import json
import logging
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile

import ml_collections
import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.abspath(__file__))
EMBEDDED = os.path.join(ROOT, 'assets', 'ml-latest-small', 'ratings.csv.gz')

# Bump when the encoding changes, so that old caches are not served.
CACHE_FORMAT = 1


class DataError(ValueError):
  """Bad input data or dataset config; the message names the file or key."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: ids int32 `[n, fields]` and labels float32 `[n]`.

  The arrays may be read-only memory maps.
  """

  ids: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An encoded dataset: its fields and its three splits."""

  name: str
  field_names: tuple[str, ...]
  field_dims: tuple[int, ...]
  train: Split
  valid: Split
  test: Split


# --------------------------------------------------------------------------
# MovieLens (GroupLens).

# Archive MD5s as GroupLens publishes them in its `.md5` sidecar files.
GROUPLENS_MD5 = {
  'ml-100k': '0e33842e24a9c977be4e0107933c0723',
  'ml-1m': 'c4d9eecfca2ab87c1945afe126590906',
  'ml-20m': 'cd245b17a1ae2cc31bb14903e1204af3',
  'ml-25m': '6b51fb2759a8657d3bfcbfc42b592ada',
}

# Ratings file inside each archive: (name, separator, header line).
_RATINGS_FILE = {
  'ml-latest-small': ('ratings.csv', ',', True),
  'ml-100k': ('u.data', '\t', False),
  'ml-1m': ('ratings.dat', '::', False),
  'ml-20m': ('ratings.csv', ',', True),
  'ml-25m': ('ratings.csv', ',', True),
}

MOVIELENS = tuple(_RATINGS_FILE)


def default_cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
    os.path.expanduser('~'), '.cache'
  )
  return os.path.join(base, 'flax_fm')


def cache_dir(config: ml_collections.ConfigDict) -> str:
  """The cache directory of `config.dataset.cache_dir` or the default."""
  return os.path.abspath(
    os.path.expanduser(config.cache_dir or default_cache_dir())
  )


class DownloadError(RuntimeError):
  """A download failed or did not match its checksum."""


def download(url: str, dest: str, *, md5: str | None = None) -> str:
  """Downloads `url` to `dest`, verifying its MD5; atomic.

  The bytes go to a temporary file beside `dest` that is renamed only when the
  transfer is complete and its checksum matches, so an interrupted or corrupt
  download never leaves a file that a later run would trust.

  Args:
    url: what to fetch.
    dest: final path of the file.
    md5: expected hex MD5 of the content, or None to skip the check.

  Returns:
    `dest`.

  Raises:
    DownloadError: network failure, truncated transfer or checksum mismatch.
  """
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    dir=os.path.dirname(dest), prefix=os.path.basename(dest) + '.partial-'
  )
  try:
    digest = hashlib.md5()
    received = 0
    with os.fdopen(fd, 'wb') as out:
      with urllib.request.urlopen(url, timeout=60) as response:
        expected = response.headers.get('Content-Length')
        while chunk := response.read(1 << 20):
          out.write(chunk)
          digest.update(chunk)
          received += len(chunk)
    if expected is not None and received != int(expected):
      raise DownloadError(
        f'Download of {url} ended after {received} of {expected} bytes.'
      )
    if md5 is not None and digest.hexdigest() != md5:
      raise DownloadError(
        f'Checksum mismatch for {url}: MD5 {digest.hexdigest()}, expected'
        f' {md5}. The file was discarded; retry, or download it yourself'
        ' and set config.dataset.path.'
      )
    os.replace(tmp, dest)
    return dest
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    raise DownloadError(f'Could not download {url}: {e}') from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fetch_grouplens(name: str, config: ml_collections.ConfigDict) -> str:
  """Returns the directory of GroupLens archive `name`, downloading it once.

  The archive is verified against `GROUPLENS_MD5` and unpacked into a
  temporary directory that is renamed into place when complete.
  """
  root = os.path.join(cache_dir(config), 'downloads')
  final = os.path.join(root, name)
  if os.path.isdir(final):
    return final
  url = f'{config.url.rstrip("/")}/{name}.zip'
  logging.info('Downloading %s', url)
  archive = download(
    url, os.path.join(root, f'{name}.zip'), md5=GROUPLENS_MD5[name]
  )
  tmp = tempfile.mkdtemp(dir=root, prefix=f'.{name}-')
  try:
    with zipfile.ZipFile(archive) as z:
      z.extractall(tmp)
    inner = os.path.join(tmp, name)
    os.rename(inner if os.path.isdir(inner) else tmp, final)
  except (zipfile.BadZipFile, OSError) as e:
    if not os.path.isdir(final):
      raise DownloadError(f'Could not unpack {archive}: {e}') from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    os.remove(archive)
  return final


def _movielens_source(config: ml_collections.ConfigDict) -> str:
  """Path of the ratings file of MovieLens `config.name`."""
  name = config.name
  filename = _RATINGS_FILE[name][0]
  if config.path:
    path = os.path.expanduser(config.path)
    if os.path.isdir(path):
      path = os.path.join(path, filename)
    if not os.path.exists(path):
      raise DataError(
        f'config.dataset.path: {path} does not exist (expected the {name}'
        f' file {filename} or its directory).'
      )
    return path
  if name == 'ml-latest-small':
    return EMBEDDED
  return os.path.join(fetch_grouplens(name, config), filename)


def _bad_line(path: str, sep: str, header: bool) -> str:
  """Finds the first malformed ratings line of `path` and describes it."""
  opener = _open_text(path)
  with opener as f:
    for number, line in enumerate(f, start=1):
      if header and number == 1:
        continue
      line = line.rstrip('\r\n')
      if not line:
        continue
      parts = line.split(sep)
      if len(parts) != 4:
        return (
          f'{path}:{number}: expected 4 {sep!r}-separated columns (user,'
          f' item, rating, timestamp), found {len(parts)}: {line[:80]!r}'
        )
      for what, value, kind in zip(
        ('user id', 'item id', 'rating'),
        parts[:3],
        (int, int, float),
        strict=True,
      ):
        try:
          kind(value)
        except ValueError:
          return f'{path}:{number}: {what} {value!r} is not a number'
  return f'{path}: could not be parsed as a ratings file'


def _open_text(path: str):
  if path.endswith('.gz'):
    import gzip  # pylint: disable=g-import-not-at-top

    return gzip.open(path, 'rt', encoding='utf-8', errors='replace')
  return open(path, encoding='utf-8', errors='replace')


def read_movielens(path: str, name: str) -> pd.DataFrame:
  """Reads a MovieLens ratings file into columns user, item, rating.

  Raises:
    DataError: naming the file and line of the first malformed row.
  """
  _, sep, header = _RATINGS_FILE[name]
  # '::' (ml-1m) is read as ':' with the empty columns between skipped, which
  # keeps pandas' fast C parser.
  columns = [0, 2, 4, 6] if sep == '::' else [0, 1, 2, 3]
  try:
    frame = pd.read_csv(
      path,
      sep=':' if sep == '::' else sep,
      header=0 if header else None,
      dtype=str,
      engine='c',
      skip_blank_lines=True,
      encoding_errors='replace',
    )
    if frame.shape[1] != columns[-1] + 1:
      raise ValueError('wrong number of columns')
    frame = frame.iloc[:, columns]
    if frame.isna().to_numpy().any():
      raise ValueError('missing values')
    out = pd.DataFrame(
      {
        'user': pd.to_numeric(frame.iloc[:, 0], errors='raise'),
        'item': pd.to_numeric(frame.iloc[:, 1], errors='raise'),
        'rating': pd.to_numeric(frame.iloc[:, 2], errors='raise'),
      }
    )
  except (ValueError, pd.errors.ParserError) as e:
    raise DataError(_bad_line(path, sep, header)) from e
  if len(out) == 0:
    raise DataError(f'{path}: no ratings found')
  return out


# --------------------------------------------------------------------------
# Encoding, splitting and the cache.


def encode_columns(columns: Sequence[np.ndarray]) -> tuple[np.ndarray, tuple]:
  """Encodes each column's distinct values to dense ids in sorted order.

  Args:
    columns: one array of raw values `[n]` per field.

  Returns:
    ids int32 `[n, fields]` and field_dims (distinct values per field).
  """
  ids, dims = [], []
  for column in columns:
    values, inverse = np.unique(np.asarray(column), return_inverse=True)
    ids.append(inverse.astype(np.int32).reshape(-1))
    dims.append(len(values))
  return np.stack(ids, axis=1), tuple(int(d) for d in dims)


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


def split_indices(
  n: int, fractions: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A seeded random partition of `range(n)` into train / valid / test."""
  n_train, n_valid, _ = split_sizes(n, fractions)
  perm = np.random.default_rng(seed).permutation(n)
  return (
    perm[:n_train],
    perm[n_train : n_train + n_valid],
    perm[n_train + n_valid :],
  )


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


def cache_key(spec: dict) -> str:
  """A short stable hash of a JSON-able description of the preprocessing."""
  blob = json.dumps({'format': CACHE_FORMAT, **spec}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_cache(directory: str, dataset: Dataset, spec: dict) -> None:
  """Writes `dataset` to `directory` atomically (temporary dir + rename)."""
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-')
  try:
    for split in ('train', 'valid', 'test'):
      part = getattr(dataset, split)
      np.save(os.path.join(tmp, f'{split}_ids.npy'), part.ids)
      np.save(os.path.join(tmp, f'{split}_labels.npy'), part.labels)
    meta = {
      'name': dataset.name,
      'field_names': list(dataset.field_names),
      'field_dims': list(dataset.field_dims),
      'spec': spec,
    }
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)
    try:
      os.rename(tmp, directory)
    except OSError:
      if not os.path.isfile(os.path.join(directory, 'meta.json')):
        raise  # Not a concurrent writer that finished first.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_cache(directory: str) -> Dataset:
  """Opens a cache written by `write_cache`, memory-mapping the arrays."""
  with open(os.path.join(directory, 'meta.json')) as f:
    meta = json.load(f)
  splits = {}
  for split in ('train', 'valid', 'test'):
    splits[split] = Split(
      ids=np.load(os.path.join(directory, f'{split}_ids.npy'), mmap_mode='r'),
      labels=np.load(
        os.path.join(directory, f'{split}_labels.npy'), mmap_mode='r'
      ),
    )
  return Dataset(
    name=meta['name'],
    field_names=tuple(meta['field_names']),
    field_dims=tuple(meta['field_dims']),
    **splits,
  )


def _build_movielens(config: ml_collections.ConfigDict) -> tuple[Dataset, dict]:
  source = _movielens_source(config)
  spec = {
    'name': config.name,
    'source': fingerprint(source),
    'split': list(config.split),
    'seed': config.seed,
    'label': 'rating > 3',
  }
  split_sizes(1, config.split)  # Validates the fractions before any work.
  directory = os.path.join(
    cache_dir(config), 'encoded', f'{config.name}-{cache_key(spec)}'
  )
  if os.path.isfile(os.path.join(directory, 'meta.json')):
    return read_cache(directory), spec
  logging.info('Encoding %s from %s', config.name, source)
  frame = read_movielens(source, config.name)
  ids, field_dims = encode_columns(
    [frame['user'].to_numpy(), frame['item'].to_numpy()]
  )
  labels = (frame['rating'].to_numpy() > 3).astype(np.float32)
  parts = split_indices(len(labels), config.split, config.seed)
  dataset = Dataset(
    name=config.name,
    field_names=('user', 'item'),
    field_dims=field_dims,
    train=Split(ids[parts[0]], labels[parts[0]]),
    valid=Split(ids[parts[1]], labels[parts[1]]),
    test=Split(ids[parts[2]], labels[parts[2]]),
  )
  write_cache(directory, dataset, spec)
  return read_cache(directory), spec


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Loads (from the cache when possible) the dataset `config.dataset`.

  Args:
    config: the `dataset` part of the config.

  Returns:
    The encoded dataset, its splits memory-mapped from the cache.

  Raises:
    DataError: unknown name, missing path or malformed file.
  """
  if config.name in MOVIELENS:
    dataset, _ = _build_movielens(config)
    return dataset
  raise DataError(
    f'config.dataset.name: unknown dataset {config.name!r}; choose one of'
    f' {", ".join(MOVIELENS)}.'
  )


# --------------------------------------------------------------------------
# Batches.


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
  if batch_size % process_count:
    raise DataError(
      f'config.batch_size={batch_size} must divide by the number of'
      f' processes ({process_count}).'
    )
  local = batch_size // process_count
  perm = np.random.default_rng([seed, epoch]).permutation(len(split))
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
  if batch_size % process_count:
    raise DataError(
      f'config.eval_batch_size={batch_size} must divide by the number of'
      f' processes ({process_count}).'
    )
  n = len(split)
  local = batch_size // process_count
  lo, hi = (
    n * process_index // process_count,
    n * (process_index + 1) // (process_count),
  )
  longest = max(
    n * (p + 1) // process_count - n * p // process_count
    for p in range(process_count)
  )
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
    if value.shape[0] % num_devices:
      raise DataError(
        f'A batch of {value.shape[0]} rows does not split over'
        f' {num_devices} local devices; make config.batch_size and'
        ' config.eval_batch_size multiples of the device count.'
      )
    out[key] = value.reshape((num_devices, -1) + value.shape[1:])
  return out
