"""The types that data.py and every source module share.

A source module (`datasets/<format>.py`) turns raw files into `Encoded`
rows; data.py splits them, caches them and hands out `Dataset`s. A source
module exposes:

- `NAMES`: the values of `config.dataset.name` it serves.
- `DEFAULTS`: its format keys, `config.dataset.<format>`, and their defaults.
- `MIN_COUNT`: its default of `config.dataset.min_count`.
- `files(config) -> {role: path}`: its source files (downloading them if
  need be), role `'all'` (split at random) or `'train'`, `'valid'`, `'test'`;
  any other role is a file of side information (MovieLens `movies`), part
  of the cache key like the others.
- `SIDE_FEATURES` (optional): `{dataset name: the values that
  config.dataset.side_features accepts}`.
- `build(config, options, paths) -> Encoded`: the encoded rows of the
  files that `files` returned; `options` is its `config.dataset.<format>`
  section and `config.min_count` is resolved.

A text source writes `reader(options, path) -> Reader` and takes
`files = encode.source_files` and `build = encode.build_from(reader)`:
datasets/encode.py then makes the out-of-core passes with its readers.
Adding a source is one such module and its name in `data.FORMATS`.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import gc
import gzip
import logging
import os
import re
import secrets
import shutil
import socket
import time
from typing import NamedTuple, Protocol
import zlib

import ml_collections
import numpy as np

import utils

# A process that holds the lock of a build and stays stopped (SIGSTOP, a
# shell's Ctrl-Z) this long makes the others build too: they would wait for
# it for ever. Counted in polls `_POLL_S` apart, while this process runs.
HOLDER_STOPPED_S = 60.0
_POLL_S = 0.2


class DataError(utils.UserError, ValueError):
  """Bad input data or dataset config; the message names the file or key."""


class DownloadError(utils.UserError, RuntimeError):
  """A download failed or did not match its checksum."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: the model's inputs and the labels of its `n` examples.

  The arrays may be read-only memory maps.

  Attributes:
    ids: int32 `[n, fields]`, one id per one-hot field.
    labels: float32 `[n]`, 0 or 1.
    multi_ids: int32 `[n, multi_fields, max_len]`, the ids of each
      multi-hot field's values, padded with -1 at the end; None without
      multi-hot fields.
    dense: float32 `[n, dense_fields]`, each numeric field standardised
      with the training split's mean and standard deviation (a missing
      value is 0); None without numeric fields.
  """

  ids: np.ndarray
  labels: np.ndarray
  multi_ids: np.ndarray | None = None
  dense: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An encoded dataset: its fields, its three splits and its vocabulary.

  One-hot fields (`ids`) come first; multi-hot fields (`multi_ids`) and
  numeric fields (`dense`) are optional and empty by default.

  Attributes:
    vocabulary: per field, the keys of its ids in id order (int64 `[n_f]`):
      the raw value (MovieLens, libFM) or the key of a CTR value (see
      datasets/text.py); ids from `len(vocabulary[f])` on are
      out-of-vocabulary. None when not known.
    multi_field_names: one name per multi-hot field.
    multi_field_dims: ids of multi-hot field `m` are in
      `[0, multi_field_dims[m])`; the last is its out-of-vocabulary id.
    multi_vocabulary: per multi-hot field, the keys of its ids in id order
      (int64), as `vocabulary`.
    dense_names: one name per numeric field.
    dense_mean: per numeric field, the mean of its training values.
    dense_std: per numeric field, the standard deviation of its training
      values (1 where it is 0 or undefined): `dense` holds
      `(value - mean) / std`.
    sources: per role of a file it was encoded from (`all`, `train`, ...),
      that file's `{'size', 'sha256'}` (datasets/cache.py, `fingerprint`);
      empty when not known.
  """

  name: str
  field_names: tuple[str, ...]
  field_dims: tuple[int, ...]
  train: Split
  valid: Split
  test: Split
  vocabulary: tuple[np.ndarray, ...] | None = None
  multi_field_names: tuple[str, ...] = ()
  multi_field_dims: tuple[int, ...] = ()
  multi_vocabulary: tuple[np.ndarray, ...] = ()
  dense_names: tuple[str, ...] = ()
  dense_mean: tuple[float, ...] = ()
  dense_std: tuple[float, ...] = ()
  sources: dict[str, dict] = dataclasses.field(default_factory=dict)


# (role of the file, ids int32 [n, fields], labels float32 [n]), and when
# the source has multi-hot or numeric fields, then multi_ids int32
# [n, multi_fields, max_len] (-1 padding) and raw dense float64
# [n, dense_fields] (NaN: missing), each None when the source has none.
Chunk = tuple


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A source's encoded rows, before the split and the cache.

  Attributes:
    field_names: one name per field.
    field_dims: ids of field `f` are in `[0, field_dims[f])`.
    vocabulary: per field, the keys of its ids in id order (int64).
    rows: examples per role (`'all'`, or `'train'`, `'valid'`, `'test'`).
    chunks: yields the rows, in file order, as `Chunk`s; called once.
    in_memory: the rows come in one chunk, so a random split can keep them
      in the order of the seeded permutation (as MovieLens always has).
    skipped: malformed lines skipped (`config.dataset.skip_bad_lines`).
    multi_field_names: one name per multi-hot field.
    multi_field_dims: ids of multi-hot field `m` are in
      `[0, multi_field_dims[m])`.
    multi_vocabulary: per multi-hot field, its keys in id order (int64).
    max_len: the last dimension of the chunks' `multi_ids`.
    dense_names: one name per numeric field; the chunks hold raw values,
      which the cache standardises with the training split's statistics.
  """

  field_names: tuple[str, ...]
  field_dims: tuple[int, ...]
  vocabulary: tuple[np.ndarray, ...]
  rows: dict[str, int]
  chunks: Callable[[], Iterator[Chunk]]
  in_memory: bool = False
  skipped: int = 0
  multi_field_names: tuple[str, ...] = ()
  multi_field_dims: tuple[int, ...] = ()
  multi_vocabulary: tuple[np.ndarray, ...] = ()
  max_len: int = 0
  dense_names: tuple[str, ...] = ()


class BadLine(Protocol):
  """Called with where a malformed line is (`'file:12'`) and why."""

  def __call__(self, where: str, reason: str) -> None: ...


# The key after the last value of a multi-hot field's list, up to max_len.
PAD_KEY = np.iinfo(np.int64).min + 1


class Side(NamedTuple):
  """The multi-hot and numeric values of parsed lines (`Reader.parse`).

  Attributes:
    multi: int64 keys `[n, multi_fields, max_len]`, `PAD_KEY` after each
      list's values; None without multi-hot fields.
    dense: float64 raw values `[n, dense_fields]`, NaN where missing; None
      without numeric fields.
  """

  multi: np.ndarray | None
  dense: np.ndarray | None


class Reader(Protocol):
  """Parses the lines of one source file to int64 keys, for encode.py.

  A reader of a file that is not text lines (Parquet) also has
  `line_batches(path, chunk_rows)`, yielding lists of lines. A reader with
  multi-hot or numeric fields has non-empty `multi_field_names` (lists of
  at most `max_len` values) or `dense_names`, and its `parse` returns a
  third element, the lines' `Side`.
  """

  field_names: tuple[str, ...]

  def has_header(self, first_line: bytes, path: str) -> bool:
    """Whether `first_line` of `path` is a header (checked if it is)."""

  def parse(
    self,
    lines: list[bytes],
    first: int,
    where: Callable[[int], str],
    bad: BadLine,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Keys int64 `[n, fields]` and 0/1 labels float32 `[n]` of the lines.

    Args:
      lines: raw lines, with their newlines; blank lines carry no example.
      first: number of the first line, 1-based.
      where: `where(number)` names a line in messages.
      bad: called for each malformed line, in line order.
    """


def shown(value: object, limit: int = 60) -> str:
  """`repr` of a value quoted in a message, cut to about `limit` characters.

  A binary file or a line with no separators would otherwise put all of it
  into the one-line error.
  """
  if isinstance(value, bytes):
    value = value.decode('utf-8', 'replace')
  value = str(value)
  if len(value) > limit:
    return f'{value[:limit]!r}... ({len(value)} characters)'
  return repr(value)


def name_list(value: str | Sequence[str]) -> tuple[str, ...]:
  """Names of a config value: `('a', 'b')`, or `'a,b'` from a flag."""
  if isinstance(value, str):
    value = (value,)
  return tuple(  # A number is the column of that name (`1` from a flag).
    name.strip()
    for item in value
    for name in str(item).split(',')
    if name.strip()
  )


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


def make_temp_dir(parent: str, prefix: str) -> str:
  """A new directory `parent/prefix<random>`, with the umask's permissions.

  Unlike `tempfile.mkdtemp` (always 0700), it honours the umask (0755 with
  the usual 022), so a cache directory renamed from it serves every user
  of a shared `cache_dir`.
  """
  while True:
    path = os.path.join(parent, prefix + secrets.token_hex(6))
    try:
      os.mkdir(path, 0o777)  # Minus the umask.
      return path
    except FileExistsError:
      continue


def owner_tag() -> str:
  """`<pid>@<host>` of this process, for the names of its temporary files."""
  return f'{os.getpid()}@{socket.gethostname()}'


def process_gone(host: str, pid: int) -> bool:
  """Whether process `pid` of `host` is known to have ended.

  Only a process of this host can be known to have ended; one that exists
  but belongs to another user counts as alive.
  """
  if host != socket.gethostname():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError, ValueError):
    pass
  return False


def check_free_space(directory: str, need: int, what: str) -> None:
  """Raises OSError(ENOSPC) unless `directory`'s disk has `need` bytes free.

  Called before a long write whose size is known, so that a disk too small
  stops it at once rather than after minutes of work.
  """
  free = shutil.disk_usage(directory).free
  if hasattr(os, 'geteuid') and os.geteuid() == 0:  # And the reserved blocks.
    stat = os.statvfs(directory)
    free = stat.f_bfree * stat.f_frsize
  if free < need:
    raise OSError(
      errno.ENOSPC,
      f'No space left on device: {what} needs at least'
      f' {need / 2**20:,.2f} MiB, {free / 2**20:,.2f} MiB free',
    )


def release_memory() -> None:
  """Hands the heap's free pages back to the system (glibc's malloc_trim).

  Preprocessing frees many small buffers (parsed chunks, counts) that the
  allocator would keep for the rest of a run that trains next. A no-op
  where the C library has no `malloc_trim`.
  """
  gc.collect()
  try:
    trim = ctypes.CDLL(None).malloc_trim  # The process's own C library.
  except (AttributeError, OSError, TypeError):
    return
  trim(0)


def remove_orphans(parent: str, prefix: str) -> None:
  """Deletes `parent/<prefix><owner_tag()>.<random>` of ended processes.

  A run killed while downloading or unpacking leaves such a file or
  directory behind; a later run removes it, not those of live runs.
  """
  owned = re.compile(re.escape(prefix) + r'(\d+)@(.*)\.[^.]+$')
  with contextlib.suppress(OSError):
    for entry in os.listdir(parent):
      match = owned.match(entry)
      if match and process_gone(match[2], int(match[1])):
        path = os.path.join(parent, entry)
        logging.info('Removing %s, left by a run that died', path)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(OSError):
            os.remove(path)


def _read_error(where: str, e: BaseException) -> str:
  if isinstance(e, gzip.BadGzipFile) and 'Not a gzipped' in str(e):
    return (
      f'{where}: not gzip data although the name ends in .gz ({e}). Compress'
      ' it, or rename it without .gz if it is plain text.'
    )
  if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
    return (
      f'{where}: the compressed data is truncated or corrupt ({e}). Copy or'
      ' download the file again.'
    )
  if isinstance(e, PermissionError):
    return (
      f'{where}: permission denied. Make it readable (chmod a+r), or copy it'
      ' to a readable place and point config.dataset.path at the copy.'
    )
  if isinstance(e, IsADirectoryError):
    return (
      f'{where}: is a directory, where a file was expected. Point'
      ' config.dataset.path at the file.'
    )
  if isinstance(e, FileNotFoundError):
    return f'{where}: does not exist. Check config.dataset.path.'
  return f'{where}: could not be read ({e}).'


@contextlib.contextmanager
def reading(*paths: str) -> Iterator[None]:
  """Turns errors of reading source files into a `DataError` naming the file.

  A truncated or fake `.gz`, a permission or a directory where a file was
  expected become one message with a remedy instead of a bare exception.
  """
  try:
    yield
  except (EOFError, zlib.error, OSError) as e:
    where = getattr(e, 'filename', None) or (
      paths[0] if len(paths) == 1 else 'one of ' + ', '.join(paths)
    )
    raise DataError(_read_error(str(where), e)) from e


@contextlib.contextmanager
def building(path: str, lock_dir: str) -> Iterator[None]:
  """Holds a lock on `path` (`lock_dir/<its name>.lock`) while the caller
  builds it; waits while another process holds it.

  `fcntl.flock`: the kernel frees it when its holder ends, however it ends.
  Where the lock file cannot be made (a read-only cache) or locks are not
  supported, the caller goes on unlocked: publishing is atomic anyway, and
  only the work may be done twice; so does a caller whose lock's holder
  (named in the file) stays stopped `HOLDER_STOPPED_S`. The file goes when
  its holder is done.
  """
  try:
    os.makedirs(lock_dir, exist_ok=True)
    name = os.path.basename(path)
    lock_path = os.path.join(lock_dir, f'{name}.lock')
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError:
    yield
    return
  passed = False  # A stopped holder's lock, left to it.
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('Waiting for another process to build %s', path)
      passed = not _wait_for_lock(fd, path)
    except OSError:
      pass  # No lock support here.
    if not passed:
      with contextlib.suppress(OSError):  # Who holds it, for the others.
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner_tag().encode(), 0)
    yield
  finally:
    # Removed while held: a process that opens it later makes a new one and
    # may build too, but finds the cache first (publishing is atomic).
    if not passed:
      with contextlib.suppress(OSError):
        os.remove(lock_path)
    os.close(fd)  # Releases the lock.


def _wait_for_lock(fd: int, path: str) -> bool:
  """Takes the lock of `fd` once its holder releases it (True); False once
  the holder has stayed stopped `HOLDER_STOPPED_S`, without it."""
  stopped = 0
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      pass
    owner = re.fullmatch(rb'(\d+)@(.*)', os.pread(fd, 1024, 0))
    host = owner and owner[2].decode(errors='replace')
    if host == socket.gethostname() and process_state(int(owner[1])) == 'T':
      stopped += 1
    else:
      stopped = 0
    if stopped * _POLL_S >= HOLDER_STOPPED_S:
      logging.warning(
        'Process %s, which builds %s, has been stopped for %.0f s (Ctrl-Z?):'
        ' building it here as well. Resume it (kill -CONT %s) or end it.',
        owner[1].decode(),
        path,
        HOLDER_STOPPED_S,
        owner[1].decode(),
      )
      return False
    time.sleep(_POLL_S)


def process_state(pid: int) -> str | None:
  """Process `pid`'s state (`R`, `S`, `T` stopped, ...); None if unknown."""
  with contextlib.suppress(OSError, IndexError):
    with open(f'/proc/{pid}/stat', 'rb') as f:  # `pid (name) state ...`
      return f.read().rsplit(b')', 1)[1].split()[0].decode()
  return None
