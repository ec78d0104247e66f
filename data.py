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
import csv
import dataclasses
import datetime
import functools
import hashlib
import http.client
import io
import itertools
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
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


def _publish(tmp: str, directory: str) -> None:
  """Renames the complete cache `tmp` to `directory`, atomically.

  A concurrent writer (another process of a multi-host run) that finished
  first wins; its cache holds the same arrays.
  """
  try:
    os.rename(tmp, directory)
  except OSError:
    if not os.path.isfile(os.path.join(directory, 'meta.json')):
      raise


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
    _publish(tmp, directory)
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
  if config.name in CTR_DATASETS:
    return _build_ctr(config)
  raise DataError(
    f'config.dataset.name: unknown dataset {config.name!r}; choose one of'
    f' {", ".join(MOVIELENS + CTR_DATASETS)}.'
  )


# --------------------------------------------------------------------------
# CTR datasets: Criteo, Avazu, libFM and generic CSV / Parquet, preprocessed
# out of core.
#
# Two streaming passes over the source in chunks of `chunk_rows` lines. Pass 1
# parses and validates every line, turns each field into int64 keys and counts
# them per field (a sorted array of distinct keys and their counts: memory
# grows with the vocabulary, not with the rows). The kept keys (seen at least
# `min_count` times) get dense ids in key order and every rarer value one
# out-of-vocabulary id per field, the last one, as pytorch-fm does. Pass 2
# parses the source again, looks the keys up, and appends each chunk's rows
# to `.npy` files of a temporary directory that is renamed into place only
# when complete.

CTR_DATASETS = ('criteo', 'avazu', 'libfm', 'csv')

# pytorch-fm's thresholds for Criteo (10) and Avazu (4); every value is kept
# in the other formats unless `config.dataset.min_count` says otherwise.
DEFAULT_MIN_COUNT = {'criteo': 10, 'avazu': 4, 'libfm': 1, 'csv': 1}

# Bump when the CTR encoding changes: part of every CTR cache key.
_CTR_ENCODING = 1

# Key of an empty integer feature; integers are rejected beyond +-2**62.
_MISSING_INT = np.iinfo(np.int64).min
_INT_LIMIT = 1 << 62

CRITEO_COLUMNS = (
  'label',
  *(f'I{i}' for i in range(1, 14)),
  *(f'C{i}' for i in range(1, 27)),
)
AVAZU_COLUMNS = (
  *('id', 'click', 'hour', 'C1', 'banner_pos', 'site_id', 'site_domain'),
  *('site_category', 'app_id', 'app_domain', 'app_category', 'device_id'),
  *('device_ip', 'device_model', 'device_type', 'device_conn_type', 'C14'),
  *('C15', 'C16', 'C17', 'C18', 'C19', 'C20', 'C21'),
)


@functools.cache
def _log_bucket_edges() -> np.ndarray:
  """Smallest integer `v` with `int(math.log(v) ** 2) >= k`, k = 1, 2, ...

  `np.searchsorted(edges, v, side='right')` is then pytorch-fm's bucket of
  an integer `v > 2`, decided by the same `math.log` that pytorch-fm calls:
  no vectorised log can round a value across a bucket boundary.
  """
  edges = []
  while int(math.log(_INT_LIMIT) ** 2) > len(edges):
    k, lo, hi = len(edges) + 1, 3, _INT_LIMIT
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
    buckets = np.searchsorted(_log_bucket_edges(), values, side='right')
    keys = np.where(values > 2, buckets, values - 2)
  else:
    keys = values.copy()
  keys[missing] = _MISSING_INT
  return keys


def string_keys(values: np.ndarray) -> np.ndarray:
  """int64 keys of categorical strings `[n]`: a fixed-key 64-bit hash.

  Distinct values of one field collide with probability about
  `distinct**2 / 2**65` (1e-5 for 10M values), and the hash is the same in
  every process and run, so ids are reproducible.
  """
  return pd.util.hash_array(np.asarray(values, object)).view(np.int64)


class _Counts:
  """Occurrences of int64 keys of one field; memory O(distinct keys).

  Each chunk's distinct keys and counts wait in a list that is merged into
  the sorted totals once it is as long as they are (amortised O(n log n)).
  """

  MIN_MERGE = 1 << 18  # Pending keys that trigger a merge, at least.

  def __init__(self):
    self.keys = np.empty(0, np.int64)
    self.counts = np.empty(0, np.int64)
    self._pending = []
    self._pending_size = 0

  def add(self, keys: np.ndarray) -> None:
    unique, counts = np.unique(keys, return_counts=True)
    self._pending.append((unique, counts))
    self._pending_size += len(unique)
    if self._pending_size >= max(len(self.keys), self.MIN_MERGE):
      self._merge()

  def _merge(self) -> None:
    if not self._pending:
      return
    keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
    counts = np.concatenate([self.counts] + [c for _, c in self._pending])
    self._pending, self._pending_size = [], 0
    order = np.argsort(keys, kind='stable')
    keys, counts = keys[order], counts[order]
    del order
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    self.keys, self.counts = keys[starts], np.add.reduceat(counts, starts)

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


class _BadLines:
  """Raises on a malformed line, or counts and skips it (`skip_bad_lines`)."""

  def __init__(self, skip: bool, log: bool = True):
    self.skip = skip
    self.log = log
    self.count = 0

  def __call__(self, where: str, reason: str) -> None:
    if not self.skip:
      raise DataError(
        f'{where}: {reason} (set config.dataset.skip_bad_lines=True to'
        ' skip malformed lines)'
      )
    self.count += 1
    if self.log and self.count <= 5:
      logging.warning('Skipping %s: %s', where, reason)


def _where(path: str, number: int, unit: str) -> str:
  return f'{path}:{number}' if unit == 'line' else f'{path}: {unit} {number}'


class _Progress:
  """Progress of a pass over a file: a bar on a terminal, a log line at end."""

  def __init__(self, desc: str, total_bytes: int):
    self.desc, self.total = desc, max(total_bytes, 1)
    self.enabled = sys.stderr.isatty()
    self.start = self.last = time.perf_counter()
    self.lines = 0

  def update(self, position: int, lines: int) -> None:
    self.lines += lines
    now = time.perf_counter()
    if self.enabled and now - self.last > 0.5:
      self.last = now
      rate = self.lines / max(now - self.start, 1e-9)
      filled = int(30 * min(position / self.total, 1.0))
      sys.stderr.write(
        f'\r{self.desc} [{"#" * filled}{"." * (30 - filled)}]'
        f' {position / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB'
        f' {self.lines:,} lines {rate:,.0f} lines/s'
      )
      sys.stderr.flush()

  def close(self) -> None:
    elapsed = time.perf_counter() - self.start
    if self.enabled:
      sys.stderr.write('\n')
    logging.info(
      '%s: %d lines in %.1f s (%.0f lines/s)',
      self.desc,
      self.lines,
      elapsed,
      self.lines / max(elapsed, 1e-9),
    )


def _is_parquet(path: str) -> bool:
  return path.lower().endswith(('.parquet', '.pq'))


def _open_binary(path: str):
  """(file for reading lines, raw file whose tell() is the progress)."""
  raw = open(path, 'rb')  # Closed by the caller.
  if path.endswith('.gz'):
    import gzip  # pylint: disable=g-import-not-at-top

    return gzip.GzipFile(fileobj=raw, mode='rb'), raw
  return raw, raw


def _first_line(path: str) -> bytes:
  """The first line of text file `path` (decompressed), b'' if empty."""
  f, raw = _open_binary(path)
  with raw, f:
    return f.readline()


def _split_line(line: bytes, sep: str, quoting: bool) -> list[str]:
  text = line.decode('utf-8-sig', 'replace').rstrip('\r\n')
  if quoting:
    return next(csv.reader([text], delimiter=sep))
  return text.split(sep)


@dataclasses.dataclass(frozen=True)
class _Table:
  """A delimited text layout: its columns and the fields made from them.

  Attributes:
    columns: every column of a line, in order.
    label: the 0/1 label column.
    fields: (field name, kind, source column) per field; kind is 'int'
      (integer, bucketed by pytorch-fm's rule when `log_bucket`), 'cat'
      (string), or 'hour_of_day' / 'weekday' (from Avazu's YYMMDDHH hour).
    sep: column separator.
    quoting: whether fields may be quoted (generic CSV; never Criteo/Avazu).
    log_bucket: bucket 'int' fields as pytorch-fm's Criteo loader.
    hint: what the columns are, for error messages.
    header: whether files start with a header line (None: when the first
      field of the first line is the first column's name).
  """

  columns: tuple[str, ...]
  label: str
  fields: tuple[tuple[str, str, str], ...]
  sep: str
  quoting: bool
  log_bucket: bool
  hint: str
  header: bool | None

  @property
  def field_names(self) -> tuple[str, ...]:
    return tuple(name for name, _, _ in self.fields)

  def has_header(self, first_line: bytes, path: str) -> bool:
    """Whether `first_line` of `path` is a header (checked if it is)."""
    if self.header is not None:
      return self.header
    names = [c.strip() for c in _split_line(first_line, self.sep, False)]
    if names[0] != self.columns[0]:
      return False
    if tuple(names) != self.columns:
      raise DataError(
        f'{path}:1: header {",".join(names)} differs from the expected'
        f' {",".join(self.columns)}'
      )
    return True

  def parse(
    self, lines: list[bytes], first: int, where, bad: _BadLines
  ) -> tuple[np.ndarray, np.ndarray]:
    """Parses lines `first, first + 1, ...` to keys and labels.

    Args:
      lines: raw lines (with their newlines).
      first: number of the first line, 1-based, for error messages.
      where: `where(number)` names a line in messages.
      bad: what to do with a malformed line.

    Returns:
      int64 keys `[n, fields]` and float32 0/1 labels `[n]` of the good
      lines; blank lines are ignored.
    """
    numbers = np.arange(first, first + len(lines))
    # (line number, reason) of every malformed line, reported in line order
    # at the end, so that an error names the chunk's first bad line.
    issues = []
    sep = self.sep.encode()
    counts = np.fromiter(
      (line.count(sep) for line in lines), np.int64, len(lines)
    )
    good = counts == len(self.columns) - 1
    for i in np.flatnonzero(~good):
      line = lines[i]
      if not line.strip():
        continue  # A blank line carries no example.
      found = len(_split_line(line, self.sep, self.quoting))
      if found == len(self.columns):  # Separators inside quotes.
        good[i] = True
        continue
      issues.append(
        (
          numbers[i],
          f'expected {len(self.columns)} columns ({self.hint}), found {found}',
        )
      )
    lines = [lines[i] for i in np.flatnonzero(good)]
    numbers = numbers[good]
    keys = np.zeros((0, len(self.fields)), np.int64)
    labels = np.zeros(0, np.float32)
    if lines:
      try:
        frame = self._read(lines, typed=True)
      except (ValueError, TypeError, OverflowError) as e:
        keep = self._find_unparsable(lines, numbers, issues)
        lines, numbers = [lines[i] for i in keep], numbers[keep]
        try:
          frame = self._read(lines, typed=True)
        except (ValueError, TypeError, OverflowError):
          raise DataError(
            f'{where(numbers[0])} to line {numbers[-1]}: could not parse ({e})'
          ) from e
      keys, labels = self._keys(frame, numbers, issues)
    for number, reason in sorted(issues):
      bad(where(number), reason)
    return keys, labels

  def _integer_columns(self) -> list[str]:
    cols = [self.label]
    for _, kind, column in self.fields:
      if kind != 'cat' and column not in cols:
        cols.append(column)
    return cols

  def _read(self, lines: list[bytes], typed: bool) -> pd.DataFrame:
    needed = set(self._integer_columns()) | {c for _, _, c in self.fields}
    integers = self._integer_columns()
    if typed:
      dtype = {c: ('Int64' if c in integers else object) for c in needed}
      na = {c: [''] for c in integers}
    else:
      dtype, na = object, None
    return pd.read_csv(
      io.BytesIO(b''.join(lines)),
      sep=self.sep,
      header=None,
      names=list(self.columns),
      usecols=[c for c in self.columns if c in needed],
      dtype=dtype,
      keep_default_na=False,
      na_filter=typed,
      na_values=na,
      quoting=csv.QUOTE_MINIMAL if self.quoting else csv.QUOTE_NONE,
      engine='c',
      skip_blank_lines=False,
      encoding_errors='replace',
    )

  def _find_unparsable(self, lines, numbers, issues) -> np.ndarray:
    """Adds the lines whose integer columns do not parse to `issues`.

    Returns:
      The indices of the other lines.
    """
    frame = self._read(lines, typed=False)
    wrong = np.zeros(len(lines), bool)
    for column in self._integer_columns():
      text = frame[column].to_numpy(object)
      number = pd.to_numeric(
        pd.Series(text).replace('', None), errors='coerce'
      ).to_numpy(np.float64)
      ok = (
        np.isfinite(number)
        & (number == np.round(number))
        & (np.abs(number) < _INT_LIMIT)
      )
      if column != self.label:
        ok |= text == ''
      for i in np.flatnonzero(~ok & ~wrong):
        what = 'label' if column == self.label else f'integer column {column}'
        issues.append((numbers[i], f'{what} {text[i]!r} is not an integer'))
      wrong |= ~ok
    return np.flatnonzero(~wrong)

  def _keys(self, frame, numbers, issues):
    """Keys and labels of the good rows; the others are added to `issues`."""
    n = len(frame)
    wrong = np.zeros(n, bool)
    reasons = {}

    def flag(mask, reason):
      for i in np.flatnonzero(mask & ~wrong):
        reasons[i] = reason(i)
      wrong[mask] = True

    label = frame[self.label]
    label_na = label.isna().to_numpy()
    label = label.to_numpy(np.int64, na_value=0)
    flag(
      label_na | ~np.isin(label, (-1, 0, 1)),
      lambda i: (
        'missing label'
        if label_na[i]
        else f'label {label[i]} is not 0 or 1 (or -1)'
      ),
    )
    keys = np.empty((n, len(self.fields)), np.int64)
    for f, (_, kind, column) in enumerate(self.fields):
      if kind == 'cat':
        keys[:, f] = string_keys(frame[column].to_numpy(object))
        continue
      series = frame[column]
      missing = series.isna().to_numpy()
      values = series.to_numpy(np.int64, na_value=0)
      flag(
        np.abs(values) >= _INT_LIMIT,
        lambda i, c=column, v=values: f'{c} {v[i]} is out of range',
      )
      if kind == 'int':
        keys[:, f] = int_feature_keys(values, missing, self.log_bucket)
      else:
        derived, valid = _avazu_hour(values, kind)
        flag(
          missing | ~valid,
          lambda i, c=column, s=series: f'{c} {s.iloc[i]!r} is not YYMMDDHH',
        )
        keys[:, f] = derived
    issues.extend((numbers[i], reason) for i, reason in reasons.items())
    keep = ~wrong
    return keys[keep], (label[keep] == 1).astype(np.float32)


def _avazu_hour(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """Hour of day (0-23) or weekday (0 = Monday) of YYMMDDHH ints, and validity.

  Computed once per distinct value (an Avazu chunk holds a few hours).
  """
  unique, inverse = np.unique(values, return_inverse=True)
  out = np.zeros(len(unique), np.int64)
  valid = np.zeros(len(unique), bool)
  for i, v in enumerate(unique.tolist()):
    day, hour = divmod(v, 100)
    try:
      date = datetime.date(2000 + day // 10000, day // 100 % 100, day % 100)
    except ValueError:
      continue
    if 0 <= v < 10**8 and hour < 24:
      valid[i] = True
      out[i] = hour if kind == 'hour_of_day' else date.weekday()
  return out[inverse.reshape(-1)], valid[inverse.reshape(-1)]


class _LibFM:
  """libFM / libSVM text: `label idx:value ...`, one feature per field.

  Without `field_dims`, the k-th feature of a line belongs to field k (as in
  the Frappe and MovieLens-tag files of the NFM and AFM papers) and every
  line must have the same number of features; each field's indices are then
  encoded like any categorical value. With `field_dims`, the indices are
  global over fields laid end to end: index `i` of field `f` is
  `offset[f] <= i < offset[f] + field_dims[f]` and becomes id
  `i - offset[f]`, and each line has exactly one feature of every field.
  """

  def __init__(self, num_fields: int, field_dims: tuple[int, ...]):
    self.num_fields = num_fields
    self.field_dims = field_dims
    self.offsets = np.concatenate([[0], np.cumsum(field_dims)]).astype(np.int64)
    self.field_names = tuple(f'field{f}' for f in range(num_fields))

  @staticmethod
  def has_header(first_line: bytes, path: str) -> bool:
    del first_line, path
    return False

  def parse(self, lines, first, where, bad):
    """Same contract as `_Table.parse`."""
    keys = np.empty((len(lines), self.num_fields), np.int64)
    labels = np.empty(len(lines), np.float32)
    n = 0
    for number, line in enumerate(lines, start=first):
      tokens = line.split()
      if not tokens:
        continue
      row = self._parse_line(tokens)
      if isinstance(row, str):
        bad(where(number), row)
        continue
      labels[n], keys[n] = row
      n += 1
    return keys[:n], labels[:n]

  def _parse_line(self, tokens):
    """(label, keys) of one line, or the reason it is malformed."""
    try:
      label = float(tokens[0])
    except ValueError:
      return f'label {tokens[0].decode(errors="replace")!r} is not a number'
    if label not in (-1.0, 0.0, 1.0):
      return f'label {tokens[0].decode(errors="replace")} is not -1, 0 or 1'
    features = tokens[1:]
    if len(features) != self.num_fields:
      return (
        f'expected {self.num_fields} features idx:value (one per field),'
        f' found {len(features)}'
      )
    indices = []
    for token in features:
      index, colon, value = token.partition(b':')
      try:
        index, value = int(index), float(value) if colon else 1.0
      except ValueError:
        return f'feature {token.decode(errors="replace")!r} is not idx:value'
      if index < 0 or index >= _INT_LIMIT:
        return f'feature index {index} is out of range'
      if value != 1.0:
        return (
          f'feature {token.decode(errors="replace")}: only one-hot'
          ' features (value 1) are supported'
        )
      indices.append(index)
    if not self.field_dims:
      return float(label > 0), indices
    indices = np.array(indices, np.int64)
    fields = np.searchsorted(self.offsets, indices, side='right') - 1
    if indices.max() >= self.offsets[-1]:
      return (
        f'feature index {indices.max()} is beyond config.dataset.field_dims'
        f' (sum {self.offsets[-1]})'
      )
    if len(set(fields.tolist())) != self.num_fields:
      return 'expected one feature of each field of config.dataset.field_dims'
    keys = np.empty(self.num_fields, np.int64)
    keys[fields] = indices - self.offsets[fields]
    return float(label > 0), keys


def _parquet_lines(path: str, columns: list[str], chunk_rows: int):
  """Parquet record batches as CSV lines (the text path parses them)."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
      f'{path}: reading Parquet needs pyarrow (pip install pyarrow).'
    ) from e
  parquet = pq.ParquetFile(path)
  for batch in parquet.iter_batches(batch_size=chunk_rows, columns=columns):
    frame = batch.to_pandas()[columns]
    text = frame.to_csv(header=False, index=False, lineterminator='\n')
    yield [line + b'\n' for line in text.encode().split(b'\n')[:-1]]


def _parquet_columns(path: str) -> list[str]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
      f'{path}: reading Parquet needs pyarrow (pip install pyarrow).'
    ) from e
  return list(pq.ParquetFile(path).schema_arrow.names)


def _chunks(reader, path: str, chunk_rows: int, bad: _BadLines, desc: str):
  """Parsed chunks `(keys [n, fields], labels [n])` of one source file."""
  if _is_parquet(path):
    columns = list(reader.columns)
    progress = _Progress(desc, os.path.getsize(path))
    row = 1
    for lines in _parquet_lines(path, columns, chunk_rows):
      out = reader.parse(lines, row, lambda n: _where(path, n, 'row'), bad)
      row += len(lines)
      progress.update(0, len(lines))
      yield out
    progress.close()
    return
  f, raw = _open_binary(path)
  progress = _Progress(desc, os.path.getsize(path))
  with raw, f:
    number = 1
    first = f.readline()
    if first and not reader.has_header(first, path):
      lines = [first, *itertools.islice(f, chunk_rows - 1)]
    else:
      number, lines = 2, list(itertools.islice(f, chunk_rows))
    while lines:
      yield reader.parse(lines, number, lambda n: _where(path, n, 'line'), bad)
      number += len(lines)
      progress.update(raw.tell(), len(lines))
      lines = list(itertools.islice(f, chunk_rows))
  progress.close()


def _ctr_files(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Source files: {'all': path} (random split) or train / valid / test."""
  name = config.name
  if not config.path:
    raise DataError(
      f'config.dataset.path: set it to the {name} file (e.g.'
      ' --config.dataset.path=/data/criteo/train.txt).'
    )
  path = os.path.abspath(os.path.expanduser(config.path))
  valid, test = config.valid_path, config.test_path
  if os.path.isdir(path):
    found = {}
    for entry in sorted(os.listdir(path)):
      full = os.path.join(path, entry)
      if entry.startswith('.') or not os.path.isfile(full):
        continue
      low = entry.lower()
      role = (
        'train'
        if 'train' in low
        else 'valid'
        if 'valid' in low or (name == 'libfm' and 'dev' in low)
        else 'test'
        if 'test' in low and name == 'libfm'
        else None
      )
      if role:
        found.setdefault(role, []).append(full)
    if any(len(v) > 1 for v in found.values()) or 'train' not in found:
      raise DataError(
        f'config.dataset.path: {path} is a directory; expected exactly one'
        f' file with "train" in its name, found {found.get("train", [])}.'
        ' Name the file itself instead.'
      )
    path = found['train'][0]
    if name == 'libfm' and not (valid or test):
      if 'valid' in found and 'test' in found:
        valid, test = found['valid'][0], found['test'][0]
  files = {'all': path}
  if valid or test:
    if not (valid and test):
      raise DataError(
        'config.dataset.valid_path and config.dataset.test_path: set both'
        ' (predefined splits) or neither (random split of the path).'
      )
    files = {'train': path, 'valid': valid, 'test': test}
  for role, file in files.items():
    file = os.path.abspath(os.path.expanduser(file))
    files[role] = file
    if not os.path.isfile(file):
      key = {'valid': 'valid_path', 'test': 'test_path'}.get(role, 'path')
      raise DataError(f'config.dataset.{key}: {file} does not exist.')
  return files


def column_list(value: str | Sequence[str]) -> tuple[str, ...]:
  """Column names of a config value: `('a', 'b')`, or `'a,b'` from a flag."""
  if isinstance(value, str):
    value = (value,)
  return tuple(
    name.strip() for item in value for name in item.split(',') if name.strip()
  )


def _check_columns(path: str, header: list[str], config) -> None:
  for key in ('label_column', 'categorical_columns', 'numeric_columns'):
    for column in column_list(config[key]):
      if column not in header:
        raise DataError(
          f'config.dataset.{key}: column {column!r} is not in the header of'
          f' {path}: {", ".join(header)}.'
        )


def _csv_reader(path: str, config: ml_collections.ConfigDict):
  """The `_Table` of one generic CSV (or Parquet) file, from its header."""
  if not config.label_column:
    raise DataError(
      'config.dataset.label_column: name the 0/1 label column of the CSV.'
    )
  sep = config.sep or ','
  if _is_parquet(path):
    header = _parquet_columns(path)
  else:
    first = _first_line(path)
    if not first.strip():
      raise DataError(f'{path}:1: expected a header line with column names')
    header = [c.strip() for c in _split_line(first, sep, True)]
  _check_columns(path, header, config)
  numeric = column_list(config.numeric_columns)
  categorical = column_list(config.categorical_columns) or tuple(
    c for c in header if c != config.label_column and c not in numeric
  )
  both = set(numeric) & set(categorical) | {config.label_column} & (
    set(numeric) | set(categorical)
  )
  if both:
    raise DataError(
      f'config.dataset: column(s) {sorted(both)} named twice among'
      ' label_column, numeric_columns and categorical_columns.'
    )
  fields = tuple(
    (c, 'int' if c in numeric else 'cat', c)
    for c in header
    if c in numeric or c in categorical
  )
  if not fields:
    raise DataError(f'{path}: no feature columns besides the label.')
  if _is_parquet(path):
    # Parquet batches come back as CSV text of just the used columns.
    header = [config.label_column] + [c for _, _, c in fields]
    sep = ','
  return _Table(
    columns=tuple(header),
    label=config.label_column,
    fields=fields,
    sep=sep,
    quoting=True,
    log_bucket=config.log_bucket,
    hint=f'{sep!r}-separated, header of {path}',
    header=not _is_parquet(path),
  )


def _ctr_reader(config: ml_collections.ConfigDict, path: str):
  """The parser of `path` for dataset `config.name`."""
  if config.name == 'criteo':
    return _Table(
      columns=CRITEO_COLUMNS,
      label='label',
      fields=tuple(
        (c, 'int' if c.startswith('I') else 'cat', c)
        for c in CRITEO_COLUMNS[1:]
      ),
      sep='\t',
      quoting=False,
      log_bucket=config.log_bucket,
      hint='label, 13 integer and 26 categorical, tab-separated',
      header=False,
    )
  if config.name == 'avazu':
    fields = [('id', 'cat', 'id')] if not config.drop_id else []
    if config.hour_features:
      fields += [('hour_of_day', 'hour_of_day', 'hour')]
      fields += [('weekday', 'weekday', 'hour')]
    else:
      fields += [('hour', 'cat', 'hour')]
    fields += [(c, 'cat', c) for c in AVAZU_COLUMNS[3:]]
    return _Table(
      columns=AVAZU_COLUMNS,
      label='click',
      fields=tuple(fields),
      sep=',',
      quoting=False,
      log_bucket=False,
      hint='id, click, hour and 21 categorical; the Kaggle test file has no'
      ' click column',
      header=None,
    )
  if config.name == 'csv':
    return _csv_reader(path, config)
  field_dims = tuple(int(d) for d in config.field_dims)
  if any(d <= 0 for d in field_dims):
    raise DataError(
      f'config.dataset.field_dims must be positive, got {field_dims}'
    )
  num_fields = len(field_dims)
  if not num_fields:
    for line in _text_lines(path):
      if line.strip():
        num_fields = len(line.split()) - 1
        break
    if num_fields <= 0:
      raise DataError(f'{path}: no libFM line with features found.')
  return _LibFM(num_fields, field_dims)


def _ctr_readers(config: ml_collections.ConfigDict, files: dict) -> dict:
  """The parser of each source file; their fields must agree."""
  train = files.get('all') or files['train']
  main = _ctr_reader(config, train)
  readers = {}
  for role, path in files.items():
    reader = main
    if config.name == 'csv' and path != train:
      reader = _ctr_reader(config, path)
      if reader.field_names != main.field_names:
        raise DataError(
          f'{path}: fields {reader.field_names} differ from those of'
          f' {train}: {main.field_names}.'
        )
    readers[role] = reader
  return readers


def _text_lines(path: str):
  f, raw = _open_binary(path)
  with raw, f:
    yield from f


class _NpyWriter:
  """Appends rows to a `.npy` file whose final shape is known up front.

  Plain buffered writes rather than a memory map: written pages then count
  in the page cache, not in this process's resident memory.
  """

  def __init__(self, path: str, dtype, shape: tuple[int, ...]):
    self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
    self.rows = 0
    self.file = open(path, 'wb')  # Closed in close().
    np.lib.format.write_array_header_1_0(
      self.file,
      {
        'descr': np.lib.format.dtype_to_descr(self.dtype),
        'fortran_order': False,
        'shape': shape,
      },
    )

  def write(self, rows: np.ndarray) -> None:
    rows = np.ascontiguousarray(rows, self.dtype)
    if rows.shape[1:] != self.shape[1:]:
      raise ValueError(f'{self.path}: rows of shape {rows.shape}')
    self.rows += len(rows)
    if self.rows > self.shape[0]:
      raise DataError(f'{self.path}: more rows than counted in pass 1')
    self.file.write(rows.tobytes())

  def close(self) -> None:
    if not self.file.closed:
      self.file.flush()
      os.fsync(self.file.fileno())
      self.file.close()

  def check(self) -> None:
    if self.rows != self.shape[0]:
      raise DataError(
        f'{self.path}: {self.rows} rows written, {self.shape[0]} counted in'
        ' pass 1; did the source change during preprocessing?'
      )


def _permutation(n: int, rng: np.random.Generator) -> np.ndarray:
  """`rng.permutation(n)`: the same order, in int32 when `n` allows."""
  if n >= 2**31:
    return rng.permutation(n)
  perm = np.arange(n, dtype=np.int32)
  rng.shuffle(perm)
  return perm


def split_assignment(
  n: int, fractions: Sequence[float], seed: int
) -> np.ndarray:
  """The split of each row (0 train, 1 valid, 2 test), int8 `[n]`.

  The same partition as `split_indices(n, fractions, seed)`, kept as one
  byte per row so that a pass over the rows in file order can route each to
  its split. Memory: `n` bytes, plus `4 n` (`8 n` past 2**31 rows) while
  the permutation is drawn.
  """
  n_train, n_valid, _ = split_sizes(n, fractions)
  perm = _permutation(n, np.random.default_rng(seed))
  out = np.full(n, 2, np.int8)
  out[perm[:n_train]] = 0
  out[perm[n_train : n_train + n_valid]] = 1
  return out


def ctr_spec(config: ml_collections.ConfigDict, files: dict) -> dict:
  """Everything the encoded arrays depend on: the cache key's input."""
  name = config.name
  spec = {
    'name': name,
    'encoding': _CTR_ENCODING,
    'sources': {role: fingerprint(path) for role, path in files.items()},
    'min_count': config.min_count
    if config.min_count >= 0
    else DEFAULT_MIN_COUNT[name],
    'skip_bad_lines': config.skip_bad_lines,
  }
  if 'all' in files:
    spec.update(split=list(config.split), seed=config.seed)
  if name in ('criteo', 'csv'):
    spec['log_bucket'] = config.log_bucket
  if name == 'avazu':
    spec.update(hour_features=config.hour_features, drop_id=config.drop_id)
  if name == 'csv':
    spec.update(
      label_column=config.label_column,
      categorical_columns=list(column_list(config.categorical_columns)),
      numeric_columns=list(column_list(config.numeric_columns)),
      sep=config.sep or ',',
    )
  if name == 'libfm':
    spec['field_dims'] = [int(d) for d in config.field_dims]
  return spec


def _build_ctr(config: ml_collections.ConfigDict) -> Dataset:
  """Loads or preprocesses CTR dataset `config.name` (see module section)."""
  files = _ctr_files(config)
  if 'all' in files:
    split_sizes(1, config.split)  # Validates the fractions before any work.
  if config.chunk_rows <= 0:
    raise DataError(
      f'config.dataset.chunk_rows must be positive, got {config.chunk_rows}'
    )
  spec = ctr_spec(config, files)
  directory = os.path.join(
    cache_dir(config), 'encoded', f'{config.name}-{cache_key(spec)}'
  )
  meta_path = os.path.join(directory, 'meta.json')
  if not os.path.isfile(meta_path):
    _preprocess_ctr(config, files, spec, directory)
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get('skipped_lines'):
    logging.warning(
      '%s: %d malformed lines were skipped (config.dataset.skip_bad_lines)',
      config.name,
      meta['skipped_lines'],
    )
  return read_cache(directory)


def _preprocess_ctr(config, files: dict, spec: dict, directory: str) -> None:
  """The two passes; writes the cache `directory` atomically."""
  start = time.perf_counter()
  train_role = 'all' if 'all' in files else 'train'
  readers = _ctr_readers(config, files)
  field_names = readers[train_role].field_names
  identity = config.name == 'libfm' and len(config.field_dims) > 0
  min_count = spec['min_count']
  logging.info(
    'Preprocessing %s from %s (min_count %d) into %s',
    config.name,
    ', '.join(files.values()),
    min_count,
    directory,
  )

  # Pass 1: validate, count rows, count the training values of each field.
  counts = [_Counts() for _ in field_names]
  bad = _BadLines(config.skip_bad_lines)
  rows = {}
  for role, path in files.items():
    rows[role] = 0
    desc = f'{config.name} pass 1/2 (count) {os.path.basename(path)}'
    for keys, _ in _chunks(readers[role], path, config.chunk_rows, bad, desc):
      rows[role] += len(keys)
      if role == train_role and not identity:
        for f, counter in enumerate(counts):
          counter.add(keys[:, f])
    if rows[role] == 0:
      raise DataError(f'{path}: no examples found.')
  if identity:
    vocabulary = None
    field_dims = tuple(int(d) for d in config.field_dims)
  else:
    vocabulary = [counter.kept(min_count) for counter in counts]
    field_dims = tuple(len(v) + 1 for v in vocabulary)
  del counts
  if 'all' in files:
    assignment = split_assignment(rows['all'], config.split, config.seed)
    sizes = np.bincount(assignment, minlength=3)
  else:
    assignment = None
    sizes = [rows['train'], rows['valid'], rows['test']]
  logging.info(
    '%s: %d examples, %d/%d/%d train/valid/test, field_dims %s',
    config.name,
    sum(rows.values()),
    *sizes,
    field_dims,
  )

  # Pass 2: encode and append each chunk's rows to its split's files.
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_tmp(parent)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.tmp-{config.name}-')
  owner = os.path.join(tmp, _OWNER)
  with open(owner, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getpid()}, f)
  writers = []
  try:
    for s, split in enumerate(('train', 'valid', 'test')):
      writers.append(
        (
          _NpyWriter(
            os.path.join(tmp, f'{split}_ids.npy'),
            np.int32,
            (int(sizes[s]), len(field_names)),
          ),
          _NpyWriter(
            os.path.join(tmp, f'{split}_labels.npy'),
            np.float32,
            (int(sizes[s]),),
          ),
        )
      )
    quiet = _BadLines(config.skip_bad_lines, log=False)
    for role, path in files.items():
      row = 0
      desc = f'{config.name} pass 2/2 (encode) {os.path.basename(path)}'
      for keys, labels in _chunks(
        readers[role], path, config.chunk_rows, quiet, desc
      ):
        ids = _encode_chunk(vocabulary, keys)
        if assignment is None:
          target = ('train', 'valid', 'test').index(role)
          writers[target][0].write(ids)
          writers[target][1].write(labels)
        else:
          where = assignment[row : row + len(keys)]
          if len(where) != len(keys):
            raise DataError(f'{path}: more lines than in pass 1 (changed?)')
          for s in range(3):
            mask = where == s
            writers[s][0].write(ids[mask])
            writers[s][1].write(labels[mask])
        row += len(keys)
    for pair in writers:
      for writer in pair:
        writer.close()
        writer.check()
    for role, path in files.items():
      if fingerprint(path) != spec['sources'][role]:
        raise DataError(f'{path} changed during preprocessing; run again.')
    meta = {
      'name': config.name,
      'field_names': list(field_names),
      'field_dims': list(field_dims),
      'spec': spec,
      'examples': {
        split: int(sizes[s])
        for s, split in enumerate(('train', 'valid', 'test'))
      },
      'skipped_lines': bad.count,
      'seconds': round(time.perf_counter() - start, 1),
    }
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.remove(owner)
    _publish(tmp, directory)
  finally:
    for pair in writers:
      for writer in pair:
        writer.file.close()
    shutil.rmtree(tmp, ignore_errors=True)
  if bad.count:
    logging.warning(
      '%s: skipped %d malformed lines (config.dataset.skip_bad_lines)',
      config.name,
      bad.count,
    )
  logging.info(
    'Preprocessed %s in %.1f s', config.name, time.perf_counter() - start
  )


# Written into a temporary cache directory: who is filling it.
_OWNER = 'owner.json'


def _remove_stale_tmp(parent: str) -> None:
  """Deletes temporary cache directories of dead runs on this host.

  A killed preprocessing run leaves its `.tmp-*` directory (up to the size
  of the encoded data); its `owner.json` names the host and process, so a
  later run on the same host removes it once that process is gone.
  """
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    try:
      with open(os.path.join(path, _OWNER)) as f:
        owner = json.load(f)
    except (OSError, ValueError):
      continue  # Not ours, or being created.
    if (
      not entry.startswith('.tmp-') or owner.get('host') != socket.gethostname()
    ):
      continue
    try:
      os.kill(int(owner['pid']), 0)
    except ProcessLookupError:
      logging.info('Removing %s, left by a run that died', path)
      shutil.rmtree(path, ignore_errors=True)
    except (PermissionError, KeyError, ValueError, TypeError, OverflowError):
      pass  # Alive (another user's process) or unreadable: leave it.


def _encode_chunk(vocabulary, keys: np.ndarray) -> np.ndarray:
  """int32 ids `[n, fields]` of int64 keys (as they are without vocabulary)."""
  if vocabulary is None:
    return keys.astype(np.int32)
  ids = np.empty(keys.shape, np.int32)
  for f, table in enumerate(vocabulary):
    ids[:, f] = encode_keys(table, keys[:, f])
  return ids


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
  # int32 below 2**31 rows: the same order as `permutation(n)` (int64) at
  # half the memory, 160 MB for Criteo's 40M training rows.
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
