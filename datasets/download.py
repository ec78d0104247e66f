"""Verified, atomic downloads of a dataset's archive into the cache.

`download` writes the bytes to a temporary file beside the destination and
renames it only when the transfer is complete and its MD5 matches: an
interrupted, stalled or corrupt transfer never leaves a file that a later
run would trust. Every failure is a `DownloadError` whose message says what
to do.
"""

import hashlib
import http.client
import logging
import os
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


def _content_length(response) -> int | None:
  """The bytes the server announced, or None (absent or not a number)."""
  try:
    return int(response.headers.get('Content-Length'))
  except (TypeError, ValueError):
    return None


def _copy(response, out, digest, url: str, expected: int | None) -> int:
  """Copies `response` into `out` and `digest`; the bytes received.

  Reads what has arrived (`read1`), so that a server trickling bytes is
  caught: fewer than `MIN_BYTES_PER_TIMEOUT` in `TIMEOUT_S` seconds raise.
  """
  read = getattr(response, 'read1', response.read)
  received = window_bytes = 0
  window_start = last_log = time.monotonic()
  while chunk := read(1 << 20):
    out.write(chunk)
    digest.update(chunk)
    received += len(chunk)
    now = time.monotonic()
    if now - window_start >= TIMEOUT_S:
      if received - window_bytes < MIN_BYTES_PER_TIMEOUT:
        raise core.DownloadError(
          f'Download of {url} stalled: {received - window_bytes} bytes in'
          f' {now - window_start:.0f} s ({received} in all). Run again'
          ' later; or download and unzip the archive yourself and set'
          ' config.dataset.path to its directory.'
        )
      window_start, window_bytes = now, received
    if now - last_log >= PROGRESS_S:
      of = f' of {expected / 1e6:.1f}' if expected else ''
      logging.info('Downloaded %.1f%s MB of %s', received / 1e6, of, url)
      last_log = now
  return received


def download(
  url: str,
  dest: str,
  *,
  md5: str | None = None,
  sha256: str | None = None,
  key: str = 'url',
) -> str:
  """Downloads `url` to `dest`, verifying its MD5 or SHA-256; atomic.

  The bytes go to a temporary file beside `dest` that is renamed only when the
  transfer is complete and its checksum matches, so an interrupted or corrupt
  download never leaves a file that a later run would trust.

  Args:
    url: what to fetch.
    dest: final path of the file.
    md5: expected hex MD5 of the content, or None to skip the check.
    sha256: expected hex SHA-256 of the content, or None (used if `md5` is).
    key: the config.dataset key that gives `url`, for messages.

  Returns:
    `dest`.

  Raises:
    DownloadError: a URL urllib cannot open, network failure, a stalled,
      truncated or corrupt transfer, or a checksum mismatch.
  """
  directory = os.path.dirname(dest)
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.basename(dest) + '.partial-'
    core.remove_orphans(directory, prefix)
    fd, tmp = tempfile.mkstemp(
      dir=directory, prefix=f'{prefix}{core.owner_tag()}.'
    )
    digest, want = hashlib.md5(), md5
    if md5 is None and sha256 is not None:
      digest, want = hashlib.sha256(), sha256
    with os.fdopen(fd, 'wb') as out:
      try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
      except ValueError as e:  # No scheme, or one urllib does not know.
        raise urllib.error.URLError(e) from e
      with response:
        expected = _content_length(response)
        received = _copy(response, out, digest, url, expected)
    if expected is not None and received != expected:
      raise core.DownloadError(
        f'Download of {url} ended after {received} of {expected} bytes;'
        ' the partial file was discarded. Run again; or download and unzip'
        ' the archive yourself and set config.dataset.path to its directory.'
      )
    if want is not None and digest.hexdigest() != want.lower():
      raise core.DownloadError(
        f'Checksum mismatch for {url}: {digest.name.upper()}'
        f' {digest.hexdigest()}, expected {want}. The file was discarded:'
        f' run again, and if it persists, config.dataset.{key} serves'
        ' another file'
        + (" (a mirror must serve GroupLens's own)" if key == 'url' else '')
        + '; or download and unzip the archive yourself and set'
        ' config.dataset.path to its directory.'
      )
    os.replace(tmp, dest)
    return dest
  except (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    ssl.SSLError,
  ) as e:
    raise core.DownloadError(
      f'Could not download {url}: {e}. Check the network and'
      f' config.dataset.{key}, then run again; or download and unzip the'
      ' archive yourself and set config.dataset.path to its directory.'
    ) from e
  except OSError as e:  # Not the network's: the cache directory's.
    raise core.DownloadError(
      f'Could not write the download of {url} into {directory}: {e}. Set'
      ' config.dataset.cache_dir to a writable directory with free space.'
    ) from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
