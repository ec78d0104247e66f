"""Verified, atomic, resumable downloads of a dataset's files into the cache.

`download` writes the bytes to `<dest>.part` beside the destination and
renames it only when the transfer is complete and its checksum matches: an
interrupted, stalled or corrupt transfer never leaves a file that a later
run would trust. When the server can send a range of the file (it says
`Accept-Ranges: bytes` and names its version with an ETag or
Last-Modified), a transfer cut short keeps what it received and the next
call asks only for the rest (HTTP `Range` with `If-Range`): a 4 GB archive
survives a dropped connection or Ctrl-C. The file's version and length sit
beside it in `<dest>.part.json`; a file changed on the server since (a
range of another version or length), a server that ignores the range, or
a checksum that does not match start it over. Every failure is a
`DownloadError` whose message says what to do.

A power cut can leave `<dest>.part` as long as what was written but with a
tail of zeros or garbage that never reached the disk. So every
`DURABLE_EVERY` bytes, and when a transfer is cut, the bytes are put on the
disk (`fsync`) and their count is recorded in `<dest>.part.json` (replaced
whole); a resume keeps only those and asks again for the rest.
"""

from collections.abc import Callable
import contextlib
import fcntl
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.request

from datasets import core

# Seconds a download may wait for the server to answer or send more bytes.
TIMEOUT_S = 60
# A download that receives fewer bytes than this in any TIMEOUT_S seconds has
# stalled (a server trickling bytes never times out a read).
MIN_BYTES_PER_TIMEOUT = 64 * 1024
# Seconds between two log lines of a download's progress.
PROGRESS_S = 30
# Bytes between two `fsync`s of a resumable transfer, each recorded in
# `<dest>.part.json` as the count a resume after a power cut may keep.
DURABLE_EVERY = 64 * 2**20
# `Content-Range: bytes <first>-<last>/<length or *>` of a 206 answer.
CONTENT_RANGE = re.compile(r'bytes (\d+)-(\d+)/(\d+|\*)$')
# The advice that ends the messages of a failed download.
BY_HAND = (
  'download and unpack the archive yourself (unzip, tar xf) and set'
  ' config.dataset.path to what it holds.'
)


class _Cut(Exception):
  """A transfer that stopped short: stalled, or fewer bytes than announced."""


def _content_length(response) -> int | None:
  """The bytes the server announced, or None (absent or not a number)."""
  try:
    return int(response.headers.get('Content-Length'))
  except (TypeError, ValueError):
    return None


def _copy(
  response,
  out,
  digest,
  url: str,
  expected: int | None,
  start: int = 0,
  sync: Callable[[], None] | None = None,
) -> int:
  """Copies `response` into `out` and `digest`; the bytes received.

  Reads what has arrived (`read1`), so that a server trickling bytes is
  caught: fewer than `MIN_BYTES_PER_TIMEOUT` in `TIMEOUT_S` seconds raise.
  The progress logged counts the `start` bytes a resumed transfer kept.
  `sync` (if any) is called after every `DURABLE_EVERY` bytes.
  """
  read = getattr(response, 'read1', response.read)
  received = window_bytes = synced = 0
  window_start = last_log = time.monotonic()
  while chunk := read(1 << 20):
    out.write(chunk)
    digest.update(chunk)
    received += len(chunk)
    if sync is not None and received - synced >= DURABLE_EVERY:
      sync()
      synced = received
    now = time.monotonic()
    if now - window_start >= TIMEOUT_S:
      if received - window_bytes < MIN_BYTES_PER_TIMEOUT:
        raise _Cut(
          f'stalled: {received - window_bytes} bytes in'
          f' {now - window_start:.0f} s ({received} in all)'
        )
      window_start, window_bytes = now, received
    if now - last_log >= PROGRESS_S:
      of = f' of {(start + expected) / 1e6:.1f}' if expected else ''
      done = (start + received) / 1e6
      logging.info('Downloaded %.1f%s MB of %s', done, of, url)
      last_log = now
  return received


def _validator(response) -> str | None:
  """The file's version by which a later range request is made, if the
  server can send ranges: its ETag (if strong) or Last-Modified; else None."""
  headers = response.headers
  if response.status != 206 and headers.get('Accept-Ranges') != 'bytes':
    return None
  etag = headers.get('ETag')
  if etag and not etag.startswith('W/'):  # If-Range takes no weak ETag.
    return etag
  return headers.get('Last-Modified')


def _resume_offset(part: str, url: str) -> tuple[int, str | None, int | None]:
  """`(bytes kept in part, their version, the file's length or None)` for
  `url`; (0, None, None) if none.

  Only the bytes recorded as durable are kept: past them, a power cut may
  have left zeros or garbage. A description without that count (written by
  an earlier version, which did not `fsync`) keeps none: starting over is
  slower, resuming after garbage would be wrong.
  """
  try:
    with open(part + '.json') as f:
      meta = json.load(f)
    durable = meta.get('durable', 0)
    if (
      meta['url'] == url
      and isinstance(meta['validator'], str)
      and type(durable) is int
      and durable > 0
    ):
      length = meta.get('length')
      length = length if type(length) is int else None
      return min(os.path.getsize(part), durable), meta['validator'], length
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    pass
  return 0, None, None


def _sync(
  out, path: str, url: str, validator: str, length: int | None = None
) -> None:
  """Puts `out` (the file `path`) on the disk, then records in
  `<path>.json` that its bytes are durable (`_resume_offset`)."""
  out.flush()
  os.fsync(out.fileno())
  _describe(path, url, validator, os.fstat(out.fileno()).st_size, length)


def _describe(
  path: str, url: str, validator: str, durable: int, length: int | None = None
) -> None:
  """Writes `<path>.json` (`length`: the whole file's bytes, if known),
  whole or not at all (a temporary file beside it, on the disk before it
  is renamed: a power cut leaves the old or the new; `core.remove_orphans`
  removes one that a killed run left)."""
  tmp = f'{path.removesuffix(".part")}.partial-{core.owner_tag()}.json'
  meta = {'url': url, 'validator': validator, 'durable': durable}
  meta.update({'length': length} if length is not None else {})
  try:
    with open(tmp, 'w') as f:
      json.dump(meta, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path + '.json')
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _open(
  url: str, offset: int, validator: str | None, length: int | None = None
):
  """The response to a GET of `url` from byte `offset` (if its version is
  still `validator`, and its length `length` if known), and where it
  starts: `offset` or 0 (all of it)."""
  headers = {}
  if offset:
    headers = {'Range': f'bytes={offset}-', 'If-Range': validator}
  try:
    response = urllib.request.urlopen(
      urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
    )
  except urllib.error.HTTPError as e:
    if not offset or e.code != 416:  # 416: nothing from `offset` on.
      raise
    return _open(url, 0, None)
  except ValueError as e:  # No scheme, or one urllib does not know.
    raise urllib.error.URLError(e) from e
  if response.status != 206:
    return response, 0  # All of it: a server without ranges, or changed.
  match = CONTENT_RANGE.match(response.headers.get('Content-Range', ''))
  # Else changed since. A 206 must repeat the ETag (RFC 9110 15.3.7), not
  # Last-Modified: one without the ETag may be another file's range.
  got = _validator(response)
  etag = (validator or '').startswith('"')
  same = got == validator or (got is None and not etag)
  if length is not None and match and match[3] not in ('*', str(length)):
    same = False  # Another length: another file, whatever its version.
  if not (match and int(match[1]) == offset and same):
    response.close()
    return _open(url, 0, None)
  return response, offset


@contextlib.contextmanager
def _locked(path: str):
  """`path` opened for update (created if absent) and held by this process;
  None if another process holds it (it is downloading the same file)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if os.fstat(fd).st_ino != os.stat(path).st_ino:  # Renamed since.
      raise BlockingIOError
  except OSError:  # Held, renamed, or no lock support here.
    os.close(fd)
    yield None
    return
  with os.fdopen(fd, 'r+b') as f:  # Closing it releases the lock.
    yield f


def _private(directory: str, dest: str):
  """A new temporary file beside `dest` (a transfer that is not resumed)."""
  prefix = os.path.basename(dest) + '.partial-'
  fd, path = tempfile.mkstemp(
    dir=directory, prefix=f'{prefix}{core.owner_tag()}.'
  )
  return os.fdopen(fd, 'r+b'), path


def download(
  url: str,
  dest: str,
  *,
  md5: str | None = None,
  sha256: str | None = None,
  key: str = 'url',
  digests: dict[str, str] | None = None,
  mismatched: str | None = None,
) -> str:
  """Downloads `url` to `dest`, verifying its MD5 or SHA-256; atomic.

  The bytes go to `<dest>.part`, renamed to `dest` only when the transfer
  is complete and its checksum matches, so an interrupted or corrupt
  download never leaves a file that a later run would trust. A transfer cut
  short by the network or the user keeps `<dest>.part` if the server can
  send the rest (a range of an unchanged file), and the next call resumes
  it; otherwise nothing is left.

  Args:
    url: what to fetch.
    dest: final path of the file.
    md5: expected hex MD5 of the content, or None to skip the check.
    sha256: expected hex SHA-256 of the content, or None (used if `md5` is).
    key: the config.dataset key that gives `url`, for messages.
    digests: if given, receives `{'md5' or 'sha256': hex digest}` of the
      content (SHA-256 when no checksum is expected).
    mismatched: if given, where a whole transfer that fails its checksum is
      moved (never `dest`): the caller may find it is the file that a
      corrected checksum names (a typo in it need not cost a download).

  Returns:
    `dest`.

  Raises:
    DownloadError: a URL urllib cannot open, network failure, a stalled,
      truncated or corrupt transfer, or a checksum mismatch.
  """
  directory = os.path.dirname(dest)
  part = dest + '.part'
  try:
    os.makedirs(directory, exist_ok=True)
    core.remove_orphans(directory, os.path.basename(dest) + '.partial-')
    with _locked(part) as out:
      if out is None:  # Another process resumes it: start a file of ours.
        out, tmp = _private(directory, dest)
        with out:
          _transfer(
            url, out, tmp, dest, md5, sha256, key, False, digests, mismatched
          )
      else:
        _transfer(
          url, out, part, dest, md5, sha256, key, True, digests, mismatched
        )
    return dest
  except OSError as e:  # Not the network's: the cache directory's.
    raise core.DownloadError(
      f'Could not write the download of {url} into {directory}: {e}. Set'
      ' config.dataset.cache_dir to a writable directory with free space.'
    ) from e


def _transfer(
  url,
  out,
  path,
  dest,
  md5,
  sha256,
  key,
  resume: bool,
  digests=None,
  mismatched=None,
) -> None:
  """Fills `out` (the file `path`) with `url`'s bytes, checks them and
  renames `path` to `dest`; `resume`: `path` may hold a cut transfer's
  first bytes and keeps them if this one is cut too; `digests` and
  `mismatched` as `download`'s."""
  digest, want = hashlib.md5(), md5
  if md5 is None:
    digest, want = hashlib.sha256(), sha256
  keep = done = False  # Whether `path` is left for the next call; renamed.
  validator = length = None  # Of the file whose bytes `path` holds.
  recorded = False  # Whether `record` ran (the message's `_kept`): once.

  def record() -> None:  # What a cut transfer keeps, on the disk.
    nonlocal recorded
    recorded = True
    _sync(out, path, url, validator, length)

  try:
    try:
      if resume:
        offset, validator, length = _resume_offset(path, url)
      else:
        offset = 0
      out.truncate(offset)  # Past the durable bytes: maybe garbage.
      keep = offset > 0  # Kept until the server says they are stale.
      response, offset = _open(url, offset, validator, length)
      with response:
        expected = _content_length(response)
        length = None if expected is None else offset + expected
        if expected:  # A disk too small stops it now, not hours later.
          _check_space(url, path, expected, keep and offset)
        if offset:  # The checksum covers the kept bytes too.
          logging.info('Resuming %s from %.1f MB', url, offset / 1e6)
          while chunk := out.read(min(1 << 20, offset - out.tell())):
            digest.update(chunk)
        out.truncate(offset)  # Where `out` stands: after the kept bytes.
        validator = _validator(response) if resume else None
        keep = bool(validator)
        sync = None
        if validator:  # Written before the bytes it describes.
          _describe(path, url, validator, offset, length)
          sync = functools.partial(_sync, out, path, url, validator, length)
        received = _copy(response, out, digest, url, expected, offset, sync)
      if expected is not None and received != expected:
        raise _Cut(f'ended after {received} of {expected} bytes')
    except _Cut as e:
      raise core.DownloadError(
        f'Download of {url} {e};'
        f' {_kept(out, keep, record) or "the partial file was discarded."}'
        f' Run again; or {BY_HAND}'
      ) from None
    except (
      urllib.error.URLError,
      http.client.HTTPException,
      ConnectionError,
      TimeoutError,
      ssl.SSLError,
    ) as e:
      why = str(e)
      if TimeoutError in (type(e), type(getattr(e, 'reason', None))):
        why += f' (nothing from the server for {TIMEOUT_S} s)'
      raise core.DownloadError(
        f'Could not download {url}: {why}.'
        + (
          f' {kept[0].upper()}{kept[1:]}'
          if (kept := _kept(out, keep, record))
          else ''
        )
        + f' Check the network and config.dataset.{key}, then run again; or'
        f' {BY_HAND}'
      ) from e
    if want is not None and digest.hexdigest() != want.lower():
      keep = False
      fate = 'The file was discarded'
      if mismatched is not None:  # Whole, but not what was asked for.
        with contextlib.suppress(OSError):  # Else discarded, as it was.
          out.flush()
          os.replace(path, mismatched)
          done = True
          fate = (
            f'The file is kept aside as {mismatched}, used only if a later'
            ' checksum names it'
          )
      raise core.DownloadError(
        f'Checksum mismatch for {url}: {digest.name.upper()}'
        f' {digest.hexdigest()}, expected {want}. {fate}:'
        f' run again, and if it persists, config.dataset.{key} serves'
        ' another file'
        + (" (a mirror must serve GroupLens's own)" if key == 'url' else '')
        + f'; or {BY_HAND}'
      )
    out.flush()
    os.fsync(out.fileno())  # Else a power cut may leave `dest` with garbage.
    os.replace(path, dest)
    keep, done = False, True
    if digests is not None:
      digests[digest.name] = digest.hexdigest()
  except OSError:
    keep = False  # A full disk: free what it took.
    raise
  except KeyboardInterrupt:
    if kept := _kept(out, keep, record):
      logging.warning('Interrupted: %s', kept)
    raise
  finally:
    if keep and not recorded:  # The next call resumes `path`: on the disk.
      with contextlib.suppress(OSError):  # Else it resumes from less.
        record()
    # The next call resumes `path`, or it goes with what describes it.
    for name in [] if keep else [path + '.json'] + [path] * (not done):
      with contextlib.suppress(FileNotFoundError):
        os.remove(name)


def _check_space(url: str, path: str, need: int, kept: int) -> None:
  """Raises DownloadError (not OSError: what is kept stays) unless the disk
  of `path` has `need` bytes free."""
  directory = os.path.dirname(path)
  try:
    core.check_free_space(directory, need, 'the download')
  except OSError as e:
    raise core.DownloadError(
      f'Could not download {url} into {directory}: {e}.'
      + (f' The {kept} bytes received are kept.' if kept else '')
      + ' Free space there, or set config.dataset.cache_dir to a disk with'
      ' room, then run again.'
    ) from e


def _kept(out, keep: bool, record: Callable[[], None]) -> str:
  """What a cut transfer keeps, as a sentence; '' if nothing. `record()`
  puts it on the disk first, and records its size for the next run."""
  out.flush()
  kept = os.fstat(out.fileno()).st_size
  if not (keep and kept):
    return ''
  try:
    record()
  except OSError as e:  # The next run resumes from an earlier record.
    return (
      f'the {kept} bytes received could not all be put on the disk ({e});'
      ' the next run resumes from those that were.'
    )
  return (
    f'the {kept} bytes received are kept and the next run resumes from there.'
  )
