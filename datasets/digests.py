"""A memo of the digests of big source files, so a launch need not reread them.

`cache.fingerprint` reads a whole source to hash it: seconds per GiB. This
module records, in one small JSON file per source under
`<cache_dir>/digests`, the digest with the file's identity `(st_dev, st_ino,
st_size, st_mtime_ns, st_ctime_ns)`, and reuses the digest while all five
are unchanged. A write to the file changes its ctime, which `touch` and
`os.utime` cannot set back, so a same-size edit that restores the
modification time is still a change; a replaced file has another inode.

As git does for its index, an identity is trusted only if the file's mtime
and ctime are at least `RACY_SECONDS` older than the hashing: on a
filesystem with coarse timestamps, an edit made just after hashing could
otherwise keep both. A file written that recently is hashed again next time.

Memo files are written to a temporary name and renamed, so concurrent runs
never leave a torn one (the last rename wins). One that cannot be read or
parsed is ignored and rewritten; one that cannot be written is skipped
silently (an unwritable cache directory fails later, with its own message).
"""

import contextlib
import datetime
import hashlib
import json
import logging
import os
import secrets
import time

from datasets import cache
from datasets import core

# Smaller files are hashed on every load, as before: cheap, and nothing but
# their content is trusted.
MIN_BYTES = 64 << 20

# How much older than the hashing a file's mtime and ctime must be.
RACY_SECONDS = 2.0

# Part of every entry: the digest's meaning changes with the piece size.
SCHEME = f'sha256-of-{cache.PIECE_BYTES}-byte-pieces'

_TEMP = '.tmp-'


def _now() -> float:
  return time.time()  # A function, so that tests can move the clock.


def identity(stat: os.stat_result) -> list[int]:
  """`(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)` of `stat`."""
  return [
    stat.st_dev,
    stat.st_ino,
    stat.st_size,
    stat.st_mtime_ns,
    stat.st_ctime_ns,
  ]


def _racy(ident: list[int], hashed_at: float) -> bool:
  """Whether the mtime or ctime is too close to (or after) `hashed_at`."""
  return max(ident[3], ident[4]) / 1e9 > hashed_at - RACY_SECONDS


def memo_path(directory: str, real: str) -> str:
  name = hashlib.sha256(real.encode(errors='surrogateescape')).hexdigest()
  return os.path.join(directory, name[:24] + '.json')


def _load(path: str, real: str) -> dict | None:
  """The entry of `path` for source `real`, or None if absent or unusable."""
  try:
    with open(path, encoding='utf-8') as f:
      entry = json.load(f)
    ok = (
      entry['path'] == real
      and entry['scheme'] == SCHEME
      and isinstance(entry['sha256'], str)
      and isinstance(entry['hashed_at'], int | float)
      and 0 < entry['hashed_at'] <= _now()  # Not from the future.
      and len(entry['identity']) == 5
    )
    return entry if ok else None
  except (OSError, ValueError, KeyError, TypeError):
    return None  # UnicodeDecodeError and JSONDecodeError are ValueErrors.


def _save(path: str, entry: dict) -> None:
  """Writes `entry` to `path` atomically; gives up silently on OSError."""
  directory = os.path.dirname(path)
  temp = os.path.join(
    directory, f'{_TEMP}{core.owner_tag()}.{secrets.token_hex(6)}'
  )
  try:
    os.makedirs(directory, exist_ok=True)
    core.remove_orphans(directory, _TEMP)
    # The umask's permissions (not mkstemp's 0600): a shared cache_dir.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(entry, f)
    os.replace(temp, path)
  except OSError as e:
    logging.debug('Not recording the digest in %s: %s', path, e)
    with contextlib.suppress(OSError):
      os.remove(temp)


def fingerprint(path: str, directory: str) -> dict:
  """`cache.fingerprint(path)`, from the memo in `directory` if it holds.

  Files under `MIN_BYTES` are always hashed. A bigger one is hashed only if
  the memo has no trustworthy entry of its current identity; the result is
  recorded if the identity did not change while hashing and is not racy.
  """
  with core.reading(path), open(path, 'rb') as f:
    # fstat of an open file: NFS revalidates its attributes on open.
    before = os.fstat(f.fileno())
  if before.st_size < MIN_BYTES:
    return cache.fingerprint(path)
  real = os.path.realpath(path)
  memo = memo_path(directory, real)
  ident = identity(before)
  entry = _load(memo, real)
  if (
    entry is not None
    and entry['identity'] == ident
    and not _racy(ident, entry['hashed_at'])
  ):
    since = datetime.datetime.fromtimestamp(entry['hashed_at'])
    logging.info(
      'Source %s unchanged since %s (size, times, inode): hash reused',
      path,
      since.isoformat(sep=' ', timespec='seconds'),
    )
    return {'size': before.st_size, 'sha256': entry['sha256']}
  hashed_at = _now()
  result = cache.fingerprint(path)
  with core.reading(path):
    after = identity(os.stat(path))
  if after == ident and result['size'] == ident[2]:
    if not _racy(ident, hashed_at):
      entry = dict(path=real, scheme=SCHEME, identity=ident)
      _save(memo, dict(entry, sha256=result['sha256'], hashed_at=hashed_at))
  return result
