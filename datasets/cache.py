"""The cache of encoded datasets: written atomically, checked on every read.

A cache is one directory: `{split}_ids.npy`, `{split}_labels.npy`,
`vocab.npy` (every field's keys in id order, end to end) and `meta.json`,
which records each file's size and SHA-256, computed while writing, and
its own content's (`meta_sha256`: a hand-edited `field_dims` is damage;
an older cache without it is trusted as before). A dataset with
multi-hot fields adds `{split}_multi_ids.npy` and `multi_vocab.npy`, one
with numeric fields `{split}_dense.npy`
(standardised, see datasets/side.py; the statistics are in meta.json).
`read` checks all of it and the data's invariants (ids inside `field_dims`,
multi-hot ids inside `multi_field_dims` or -1 padding, finite numeric
values, labels exactly 0 or 1) in one parallel pass over the bytes, and
raises `Damaged` rather than serve a cache that fails a check; data.py then
rebuilds it.

Sources are identified by a SHA-256 of their whole content (`fingerprint`,
memoised for big files by datasets/digests.py): any change is another key.
"""

from collections.abc import Iterable
import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket

import numpy as np

from datasets import core
from datasets import housekeeping
from datasets import side
import utils

# Bump when the cache's files or any encoding change: part of every key.
VERSION = 4

SPLITS = ('train', 'valid', 'test')

# Files are hashed in pieces of whole rows of about this size, in parallel:
# the SHA-256 of a file is that of its pieces' SHA-256s, end to end.
PIECE_BYTES = 16 << 20


class Damaged(Exception):
  """A cache directory that fails a check; the message says which."""


def _pieces(size: int, start: int, row_bytes: int) -> list[tuple[int, int]]:
  """(offset, length) of the pieces of a file: `[0, start)`, then rows."""
  row_bytes = max(1, row_bytes)  # As NpyWriter: `[n, 0]` has no row bytes.
  step = max(1, PIECE_BYTES // row_bytes) * row_bytes
  out = [(0, start)] if start else []
  return out + [(o, min(step, size - o)) for o in range(start, size, step)]


def _scan(
  path: str, pieces: list[tuple[int, int]], check=None, start: int = 0
) -> tuple[str, list]:
  """The SHA-256 of `path` read in `pieces`, and `check(bytes)` of the rows.

  Threads read and hash the pieces at once: hashlib and numpy release the
  GIL, so this runs at the speed of the disk or of all the cores.

  Returns:
    (hex digest, `check`'s result for each piece from offset `start` on).
  """
  workers = min(8, os.cpu_count() or 1)
  with open(path, 'rb') as f:

    def one(piece):
      data = os.pread(f.fileno(), piece[1], piece[0])
      result = check(data) if check and piece[0] >= start else None
      return hashlib.sha256(data).digest(), result

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      results = list(pool.map(one, pieces))
  digest = hashlib.sha256(b''.join(d for d, _ in results)).hexdigest()
  pairs = zip(pieces, results, strict=True)
  return digest, [r for (o, _), (_, r) in pairs if o >= start]


def fingerprint(path: str) -> dict:
  """Identifies a source file by its size and the SHA-256 of its content.

  Reads the whole file (`_scan` spreads the hashing over the cores), so any
  change is noticed; data.py goes through datasets/digests.py, which reuses
  the digest of a big file whose size, times and inode have not changed.
  """
  with core.reading(path):
    size = os.stat(path).st_size
    if size > 1 << 30:
      logging.info('Hashing %s (%.1f GiB) for its cache', path, size / 2**30)
    digest, _ = _scan(path, _pieces(size, 0, 1))
  return {'size': size, 'sha256': digest}


def source_stat(path: str) -> tuple[int, int, int]:
  """(size, mtime, inode): changes when a source is written to or replaced."""
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns, stat.st_ino


def key(spec: dict) -> str:
  """A short stable hash of a JSON-able description of the preprocessing."""
  blob = json.dumps(spec, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def meta_digest(meta: dict) -> str:
  """The SHA-256 of meta.json's content but its own `meta_sha256`.

  Of the parsed JSON, keys sorted: only a change of content changes it,
  not indentation or the order of keys.
  """
  content = {k: v for k, v in meta.items() if k != 'meta_sha256'}
  blob = json.dumps(content, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def ids_problem(ids: np.ndarray, field_dims: np.ndarray) -> str | None:
  """What is wrong with ids `[n, fields]` (outside `[0, field_dims)`)."""
  outside = ids.view(np.uint32) >= field_dims  # Negative ids are huge here.
  if not outside.any():
    return None
  fields = np.flatnonzero(outside.any(axis=0)).tolist()
  return f'ids outside [0, field_dims) in field(s) {fields}'


def labels_problem(labels: np.ndarray) -> str | None:
  """What is wrong with labels `[n]` (anything but exactly 0 or 1)."""
  wrong = (labels != 0) & (labels != 1)
  if not wrong.any():
    return None
  return f'labels other than 0 and 1 (e.g. {labels[wrong][0]})'


class NpyWriter:
  """Appends rows to a `.npy` file whose final shape is known up front.

  Plain buffered writes rather than a memory map: written pages then count
  in the page cache, not in this process's resident memory. The SHA-256 of
  the file (as `_scan` computes it) is computed on the way.
  """

  def __init__(self, path: str, dtype, shape: tuple[int, ...]):
    self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
    self.rows = 0
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
      header,
      {
        'descr': np.lib.format.dtype_to_descr(self.dtype),
        'fortran_order': False,
        'shape': shape,
      },
    )
    header = header.getvalue()
    self.bytes = len(header)
    self.file = open(path, 'wb')  # Closed in close().
    self.file.write(header)
    self.digests = [hashlib.sha256(header).digest()]
    row_bytes = max(1, self.dtype.itemsize * math.prod(shape[1:]))
    self.step = max(1, PIECE_BYTES // row_bytes) * row_bytes  # As _pieces.
    self.piece, self.filled = hashlib.sha256(), 0

  def write(self, rows: np.ndarray) -> None:
    rows = np.ascontiguousarray(rows, self.dtype)
    if rows.shape[1:] != self.shape[1:]:
      raise ValueError(f'{self.path}: rows of shape {rows.shape}')
    self.rows += len(rows)
    if self.rows > self.shape[0]:
      raise core.DataError(f'{self.path}: more rows than counted in pass 1')
    data = memoryview(rows.reshape(-1)).cast('B')
    self.file.write(data)
    self.bytes += len(data)
    while len(data):
      take = min(len(data), self.step - self.filled)
      self.piece.update(data[:take])
      self.filled, data = self.filled + take, data[take:]
      if self.filled == self.step:
        self.digests.append(self.piece.digest())
        self.piece, self.filled = hashlib.sha256(), 0

  def close(self) -> dict:
    """Flushes to disk; returns the file's `{'bytes': ..., 'sha256': ...}`."""
    if not self.file.closed:
      self.file.flush()
      os.fsync(self.file.fileno())
      self.file.close()
    if self.rows != self.shape[0]:
      raise core.DataError(
        f'{self.path}: {self.rows} rows written, {self.shape[0]} counted in'
        ' pass 1; did the source change during preprocessing?'
      )
    if self.filled:
      self.digests.append(self.piece.digest())
      self.filled = 0
    digest = hashlib.sha256(b''.join(self.digests)).hexdigest()
    return {'bytes': self.bytes, 'sha256': digest}


def _publish(tmp: str, directory: str, replace: bool) -> None:
  """Renames `tmp` to `directory`, first moving a damaged one aside."""
  parent, name = os.path.split(directory)
  while replace:  # Again if another run's remove_stale took `aside` first.
    aside = core.make_temp_dir(parent, f'.damaged-{name}-')
    with contextlib.suppress(FileNotFoundError):  # Or another run replaced it.
      os.rename(directory, os.path.join(aside, name))
    replace = not os.path.isdir(aside)
    shutil.rmtree(aside, ignore_errors=True)
  try:
    os.rename(tmp, directory)
  except OSError:
    # A concurrent writer (another process of a multi-host run) finished
    # first; its cache holds the same arrays.
    if not os.path.isfile(os.path.join(directory, 'meta.json')):
      raise


def write(
  directory: str,
  encoded: core.Encoded,
  sizes: tuple[int, int, int],
  parts: Iterable[tuple[int, np.ndarray, np.ndarray]],
  spec: dict,
  replace: bool = False,
  paths: dict[str, str] | None = None,
) -> None:
  """Writes the splits of `encoded` to `directory`, atomically.

  The files go to a temporary directory beside it, renamed into place only
  when complete, so an interrupted or failed run never leaves a cache that
  a later run would trust, nor touches another cache.

  Args:
    directory: the cache directory.
    encoded: the source's rows (fields, vocabulary, skipped lines).
    sizes: rows of train, valid and test.
    parts: `(split index, ids, labels)` pieces, in row order per split, and
      their `multi_ids` and raw `dense` (see `core.Chunk`) when `encoded`
      has such fields.
    spec: the cache key's input, recorded in meta.json.
    replace: `directory` exists and is damaged: replace it.
    paths: `{role: path}` of the sources, recorded as their real paths
      (see datasets/housekeeping.py).

  Raises:
    DataError: the cache directory is not writable or the disk is full.
    RuntimeError: the rows break the data contract (a bug of the source).
  """
  parent, name = os.path.dirname(directory), spec['name']
  writers, tmp = {}, None  # {file name without .npy: its writer}

  def add(file: str, dtype, shape: tuple[int, ...]) -> NpyWriter:
    writers[file] = NpyWriter(os.path.join(tmp, f'{file}.npy'), dtype, shape)
    return writers[file]

  try:
    os.makedirs(parent, exist_ok=True)
    housekeeping.remove_stale(parent)
    tmp = core.make_temp_dir(parent, f'.tmp-{name}-')
    with open(os.path.join(tmp, housekeeping.OWNER), 'w') as f:
      json.dump({'host': socket.gethostname(), 'pid': os.getpid()}, f)
    num_fields = len(encoded.field_names)
    dims = np.array(encoded.field_dims, np.uint32)
    multi_dims = np.array(encoded.multi_field_dims, np.int64)
    num_multi, num_dense = len(multi_dims), len(encoded.dense_names)
    for split, size in zip(SPLITS, sizes, strict=True):
      add(f'{split}_ids', np.int32, (size, num_fields))
      add(f'{split}_labels', np.float32, (size,))
      if num_multi:
        add(f'{split}_multi_ids', np.int32, (size, num_multi, encoded.max_len))
      if num_dense:  # Raw, NaN where missing: standardised once complete.
        add(f'{split}_dense_raw', np.float64, (size, num_dense))
    need = sum(w.dtype.itemsize * math.prod(w.shape) for w in writers.values())
    core.check_free_space(tmp, need, 'the cache')  # Before pass 2 starts.
    for s, ids, labels, *extra in parts:
      multi, dense = extra or (None, None)
      ids = np.ascontiguousarray(ids, np.int32)
      problem = ids_problem(ids, dims) or labels_problem(labels)
      if (multi is None, dense is None) != (not num_multi, not num_dense):
        problem = problem or 'multi-hot or numeric arrays but not such fields'
      if num_multi and not problem:
        problem = side.multi_problem(np.asarray(multi), multi_dims)
      if num_dense and not problem:
        problem = side.dense_problem(np.asarray(dense), allow_missing=True)
      if problem:
        raise RuntimeError(f'{name}: encoded {SPLITS[s]} rows have {problem}')
      writers[f'{SPLITS[s]}_ids'].write(ids)
      writers[f'{SPLITS[s]}_labels'].write(labels)
      if num_multi:
        writers[f'{SPLITS[s]}_multi_ids'].write(multi)
      if num_dense:
        writers[f'{SPLITS[s]}_dense_raw'].write(dense)
    mean, std = side.write_standardised(
      writers, add, SPLITS, sizes, num_dense, encoded.dense_names
    )
    for file, keys in (
      ('vocab', encoded.vocabulary),
      ('multi_vocab', encoded.multi_vocabulary if num_multi else None),
    ):
      if keys is None:
        continue
      keys = [np.asarray(v, np.int64) for v in keys]
      writer = add(file, np.int64, (sum(len(v) for v in keys),))
      for part in keys:
        writer.write(part)
    meta = {
      'version': VERSION,
      'name': name,
      'field_names': list(encoded.field_names),
      'field_dims': [int(d) for d in encoded.field_dims],
      # Field f's keys are vocab.npy[sum(sizes[:f]):][:sizes[f]]; its ids
      # from sizes[f] on are out of vocabulary.
      'vocabulary_sizes': [len(v) for v in encoded.vocabulary],
      'multi_field_names': list(encoded.multi_field_names),
      'multi_field_dims': [int(d) for d in encoded.multi_field_dims],
      # As vocabulary_sizes, of multi_vocab.npy.
      'multi_vocabulary_sizes': [len(v) for v in encoded.multi_vocabulary],
      'max_len': int(encoded.max_len) if num_multi else 0,
      'dense_names': list(encoded.dense_names),
      'dense_mean': mean,
      'dense_std': std,
      'spec': spec,
      'source_paths': housekeeping.source_paths(paths or {}),
      'examples': dict(zip(SPLITS, sizes, strict=True)),
      'skipped_lines': encoded.skipped,
      'files': {f: w.close() for f, w in writers.items()},
    }
    meta = json.loads(json.dumps(meta))  # As `read` will see it.
    meta['meta_sha256'] = meta_digest(meta)
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    _publish(tmp, directory, replace)  # Owned till then: see remove_stale.
    with contextlib.suppress(OSError):  # Or another run's, which won.
      os.remove(os.path.join(directory, housekeeping.OWNER))
    logging.info('Wrote %s', directory)
  except OSError as e:
    raise core.DataError(  # os_problem: EFBIG is a limit, not the space.
      f'Could not write the dataset cache {directory}: {utils.os_problem(e)}.'
      ' Free some space or set config.dataset.cache_dir to a writable'
      ' directory.'
    ) from e
  finally:
    for writer in writers.values():
      with contextlib.suppress(OSError):  # A full disk's, raised already.
        writer.file.close()
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def read(directory: str, spec: dict) -> core.Dataset:
  """Opens a cache written by `write`, after checking every byte of it.

  Returns:
    The dataset, its arrays memory-mapped.

  Raises:
    Damaged: a file is missing, has another size, shape or checksum than
      meta.json says, or holds ids outside `field_dims` or labels not 0/1;
      or meta.json's content differs from its own checksum.
  """
  try:
    with open(os.path.join(directory, 'meta.json')) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise Damaged(f'meta.json: {e}') from e
  try:
    return _checked(directory, meta, json.loads(json.dumps(spec)))
  except (KeyError, TypeError, ValueError, OSError) as e:
    raise Damaged(f'{type(e).__name__}: {e}') from e


def _checked(directory: str, meta: dict, spec: dict) -> core.Dataset:
  """`read` once meta.json is parsed; a missing key raises KeyError."""
  # A cache written before meta.json had its checksum is served as then:
  # rebuilding every user's caches once (minutes for a big file) for a
  # check of hand edits costs more than it saves.
  recorded = meta.get('meta_sha256') if isinstance(meta, dict) else None
  if recorded is not None and recorded != meta_digest(meta):
    raise Damaged('meta.json: its content differs from its checksum')
  if meta['version'] != VERSION or meta['spec'] != spec:
    raise Damaged('meta.json describes other data than its key')
  num_fields = len(meta['field_names'])
  dims = np.array(meta['field_dims'], np.uint32)
  if len(dims) != num_fields:
    raise Damaged('meta.json: field_dims and field_names differ in length')
  # Absent from caches written before multi-hot and numeric fields.
  multi_dims = np.array(meta.get('multi_field_dims', []), np.int64)
  num_multi, max_len = len(multi_dims), meta.get('max_len', 0)
  num_dense = len(meta.get('dense_names', []))
  if len(meta.get('multi_field_names', [])) != num_multi or (
    num_multi and max_len < 1
  ):
    raise Damaged('meta.json: multi-hot names, dims and max_len disagree')

  def labels_check(data):
    return labels_problem(np.frombuffer(data, np.float32))

  def ids_check(data):
    ids = np.frombuffer(data, np.int32).reshape(-1, num_fields)
    return ids_problem(ids, dims)

  def multi_check(data):
    ids = np.frombuffer(data, np.int32).reshape(-1, num_multi, max_len)
    return side.multi_problem(ids, multi_dims)

  def dense_check(data):
    return side.dense_problem(
      np.frombuffer(data, np.float32).reshape(-1, num_dense)
    )

  expected = {'vocab': (np.int64, (sum(meta['vocabulary_sizes']),), None)}
  if num_multi:
    size = sum(meta['multi_vocabulary_sizes'])
    expected['multi_vocab'] = (np.int64, (size,), None)
  for s in SPLITS:
    n = meta['examples'][s]
    expected[f'{s}_ids'] = (np.int32, (n, num_fields), ids_check)
    expected[f'{s}_labels'] = (np.float32, (n,), labels_check)
    if num_multi:
      shape = (n, num_multi, max_len)
      expected[f'{s}_multi_ids'] = (np.int32, shape, multi_check)
    if num_dense:
      expected[f'{s}_dense'] = (np.float32, (n, num_dense), dense_check)
  arrays = {}
  for name, (dtype, shape, check) in expected.items():
    path = os.path.join(directory, f'{name}.npy')
    record = meta['files'][name]
    size = os.stat(path).st_size
    if size != record['bytes']:
      raise Damaged(
        f'{name}.npy has {size} bytes, meta.json says {record["bytes"]}'
      )
    with open(path, 'rb') as f:  # Version 1.0, as NpyWriter writes.
      if np.lib.format.read_magic(f) != (1, 0):
        raise Damaged(f'{name}.npy: not a version 1.0 .npy header')
      header, start = np.lib.format.read_array_header_1_0(f), f.tell()
    if header != (shape, False, np.dtype(dtype)):
      raise Damaged(f'{name}.npy holds {header}, expected {shape} {dtype}')
    row_bytes = np.dtype(dtype).itemsize * math.prod(shape[1:])
    if start + row_bytes * shape[0] != size:
      raise Damaged(f'{name}.npy: {size} bytes do not hold shape {shape}')
    pieces = _pieces(size, start, row_bytes)
    digest, results = _scan(path, pieces, check, start)
    if digest != record['sha256']:
      raise Damaged(f'{name}.npy: its checksum differs from meta.json')
    for problem in results:
      if problem:
        raise Damaged(f'{name}.npy: {problem}')
    arrays[name] = np.load(path, mmap_mode='r')
  if meta['skipped_lines']:
    logging.warning(
      '%s: skipped %d malformed lines (config.dataset.skip_bad_lines)',
      meta['name'],
      meta['skipped_lines'],
    )
  if set(meta['files']) != set(expected):
    raise Damaged('meta.json lists other files than its fields need')

  def vocabulary(file, sizes):
    return tuple(np.split(arrays[file], np.cumsum(sizes)[:-1])) if sizes else ()

  return core.Dataset(
    name=meta['name'],
    field_names=tuple(meta['field_names']),
    field_dims=tuple(meta['field_dims']),
    **{
      s: core.Split(
        arrays[f'{s}_ids'],
        arrays[f'{s}_labels'],
        arrays.get(f'{s}_multi_ids'),
        arrays.get(f'{s}_dense'),
      )
      for s in SPLITS
    },
    vocabulary=vocabulary('vocab', meta['vocabulary_sizes']),
    multi_field_names=tuple(meta.get('multi_field_names', [])),
    multi_field_dims=tuple(int(d) for d in multi_dims),
    multi_vocabulary=vocabulary(
      'multi_vocab', meta.get('multi_vocabulary_sizes', [])
    ),
    dense_names=tuple(meta.get('dense_names', [])),
    dense_mean=tuple(meta.get('dense_mean', [])),
    dense_std=tuple(meta.get('dense_std', [])),
    sources=spec.get('sources', {}),
  )
