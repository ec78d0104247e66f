"""Dataset files named by URL: downloaded once into the cache, unpacked.

`config.dataset.path`, `valid_path` and `test_path` may be http(s) URLs, e.g.
the Criteo Kaggle archive's. Each is downloaded once into
`<cache_dir>/downloads/url-<hash of the URL>/` (atomic, verified, and
resumed after a cut: `download.download`); an archive (`.tar.gz`, `.tgz`,
`.tar`, `.zip`, ...) is unpacked there into a directory that takes the
archive's place, which the formats read as they read any directory
(Criteo's `train.txt`, a libFM directory, ...), or as its one file if it
holds one. An archive whose URL's name says none (the URL redirects to it,
or its server names it in Content-Disposition: `.../download?id=1`) is
told by its content; so is a gzip of one file there, kept as
`<name>/<name>.gz` for the formats to read it compressed. A
`#sha256=<hex>` or `#md5=<hex>` fragment is the content's checksum,
checked before anything is kept; the download's digest (that one, else
its SHA-256) is recorded beside the copy (`RECORD`), so that a later
run's fragment is checked against the copy it reads too. A whole
download that fails the fragment is kept aside (`<name>.unverified`, never
read unchecked) until the URL is fetched again: if the next fragment names
it (the first had a typo), it is used without a download; else it goes
(as a `.part` does, after 7 days). Later runs, and the other processes of
a run sharing the cache, read the copy without the network.

A download cut short keeps its bytes in `url-<hash>/<name>.part` for the
next run to resume. One that nothing has written for 7 days
(`PART_MAX_AGE_S`; config.dataset.path names another URL since, say) was
abandoned: a `fetch` of any other URL deletes it, unless a process holds
it. Complete files, unpacked directories and the URLs' directories stay
(a run that fetches that URL again may be creating its file there).
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.parse
import zipfile
import zlib

import ml_collections

from datasets import core
from datasets import download

KEYS = ('path', 'valid_path', 'test_path')
SCHEMES = ('http://', 'https://')
# Names of the archives that are unpacked; other files are kept as they are
# (a `.gz` of one file too: the formats read it compressed).
TAR = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tbz2', '.tar.xz', '.txz')
ZIP = ('.zip',)
# Whether tarfile has PEP 706's extraction filters (Python 3.11.4 on).
FILTERS = hasattr(tarfile, 'data_filter')
# What a disk that refuses a write raises (a damaged gzip is an OSError too).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
# In a URL's directory: `{algorithm: hex digest}` of the download checked.
RECORD = '.checksums.json'
# Seconds after which a `.part` that nothing has written is abandoned.
PART_MAX_AGE_S = 7 * 24 * 3600
# Beside a download's name: the whole file that failed the URL's checksum,
# kept until a run gives its URL again (a corrected checksum may name it).
UNVERIFIED = '.unverified'
# Beside the name of a download that names no archive, until its content
# has said whether it is one (`_sniff`).
UNNAMED = '.download'


def is_url(path: object) -> bool:
  """Whether `path` is an http(s) URL."""
  return isinstance(path, str) and path.lower().startswith(SCHEMES)


def localize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.dataset` with each URL of `KEYS` replaced by its local copy.

  Raises:
    DataError: a fragment that is not a checksum, or a URL of another
      scheme (`gs://`, `s3://`, `ftp://`: read as a relative path, it was
      said not to exist as `<cwd>/gs:/...`).
    DownloadError: the download or the unpacking failed.
  """
  for key in KEYS:
    value = config.get(key)
    if isinstance(value, str) and '://' in value and not is_url(value):
      raise core.DataError(
        f'config.dataset.{key}={value!r}: only http and https URLs'
        ' are downloaded; copy the file here yourself (e.g. gsutil cp,'
        ' aws s3 cp) and give its local path.'
      )
    _refuse_local_archive(key, config.get(key))
  if not any(is_url(config.get(key)) for key in KEYS):
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  for key in KEYS:
    if is_url(config.get(key)):
      config[key] = fetch(config[key], core.cache_dir(config), key)
  return config


def _refuse_local_archive(key: str, path: object) -> None:
  """Raises a DataError if `path` is a local archive (by its name).

  Only a URL's archive is unpacked; a local one would be read as text, its
  first line a tar header or a zip signature.
  """
  if not path or is_url(path) or not archive_kind(str(path)):
    return
  if os.path.isfile(os.path.expanduser(str(path))):
    raise core.DataError(
      f'config.dataset.{key}: {path} is an archive, which only an http(s)'
      ' URL unpacks (once, into the cache); unpack it yourself (tar xf,'
      ' unzip) and name the file or directory it holds.'
    )


def _checksum(url: str, key: str) -> tuple[str, str | None, str | None]:
  """`(url without its fragment, algorithm, hex digest)` of `url`."""
  url, _, fragment = url.partition('#')
  if not fragment:
    return url, None, None
  algorithm, _, value = fragment.partition('=')
  value = value.strip().lower()
  digits = {'sha256': 64, 'md5': 32}.get(algorithm)
  if len(value) != digits or set(value) - set('0123456789abcdef'):
    raise core.DataError(
      f'config.dataset.{key}: the URL fragment #{fragment} is not a'
      f' checksum; write #sha256=<64 hex digits> or #md5=<32 hex digits>,'
      ' or leave the fragment out.'
    )
  return url, algorithm, value


def archive_kind(name: str) -> str | None:
  """'tar', 'zip' or None (kept as it is) for the file name `name`."""
  low = name.lower()
  if low.endswith(TAR):
    return 'tar'
  return 'zip' if low.endswith(ZIP) else None


def _stem(name: str) -> str:
  """`name` without its archive suffix: the directory it unpacks into."""
  for suffix in sorted(TAR + ZIP, key=len, reverse=True):
    if name.lower().endswith(suffix):
      return name[: -len(suffix)] or 'archive'
  return name


def _unpack(archive: str, kind: str, into: str) -> None:
  """Unpacks `archive` into the directory `into`; nothing outside it."""
  if kind == 'zip':
    with zipfile.ZipFile(archive) as z:
      z.extractall(into)  # zipfile drops '..' and absolute names.
    return
  with tarfile.open(archive) as t:
    if FILTERS:
      # No links out, devices, absolute or '..' names (PEP 706).
      t.extractall(into, filter='data')
      return
    for member in t.getmembers():  # Python 3.11.0-3.11.3: no filters.
      parts = member.name.replace('\\', '/').split('/')
      if (
        not (member.isfile() or member.isdir())
        or '..' in parts
        or os.path.isabs(member.name)
      ):
        raise tarfile.TarError(f'{member.name!r} is not a plain file in it')
    t.extractall(into)


def disk_refused(error: BaseException) -> bool:
  """Whether `error` is the disk's (full, read-only, no permission), not a
  damaged archive's: then the verified archive is worth keeping."""
  return isinstance(error, OSError) and error.errno in DISK_ERRNOS


def unpack(
  archive: str, final: str, kind: str = 'zip', top: str | None = None
) -> None:
  """Unpacks `archive` into the new directory `final`, whole or not at all.

  Unpacked into a temporary directory beside `final` (the umask's mode),
  then renamed: the archive's folder `top`, or (None) its only entry if
  that is a folder, becomes `final`; else all it holds. The archive is
  removed once unpacked or found damaged; kept when the disk refused it
  (`disk_refused`), so that a rerun unpacks it without a new download.

  Raises:
    tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError: a damaged
      or unsafe archive.
    OSError: `final`'s directory cannot be written, or `final` exists (a
      racing run's).
  """
  root, base = os.path.split(final)
  tmp, keep = None, False
  try:
    core.remove_orphans(root, f'.{base}-')
    tmp = core.make_temp_dir(root, f'.{base}-{core.owner_tag()}.')
    _unpack(archive, kind, tmp)
    if top is None:
      entries = [e for e in os.listdir(tmp) if not e.startswith('.')]
      top = entries[0] if len(entries) == 1 else ''
    inner = os.path.join(tmp, top)
    os.rename(inner if top and os.path.isdir(inner) else tmp, final)
  except OSError as e:
    keep = disk_refused(e)
    raise
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    if not keep:
      with contextlib.suppress(FileNotFoundError):  # Another run's removal.
        os.remove(archive)


def _archive_in_place(
  archive: str, algorithm: str | None, digest: str | None
) -> bool:
  """Whether `archive` is in place, kept by a disk that could not unpack
  it, and is the file that the URL's checksum (if any) names; if not that
  file, it is removed."""
  if not os.path.exists(archive):
    return False
  if algorithm is None:
    return True  # Downloaded whole: only ever renamed into place so.
  with open(archive, 'rb') as f:
    if hashlib.file_digest(f, algorithm).hexdigest() == digest:
      return True
  logging.warning(
    '%s is not the file #%s= names: downloading it', archive, algorithm
  )
  os.remove(archive)
  return False


def _named(
  aside: str, archive: str, algorithm: str | None, digest: str | None
) -> bool:
  """Whether `aside`, a whole download that failed an earlier checksum, is
  the file that this one names: then it becomes `archive`. Else (no
  checksum, or another file) it is removed: it is never read unchecked."""
  try:
    if algorithm is not None:
      with open(aside, 'rb') as f:
        if hashlib.file_digest(f, algorithm).hexdigest() == digest:
          logging.info(
            '%s is the file #%s= names: not downloaded', aside, algorithm
          )
          os.replace(aside, archive)
          return True
    os.remove(aside)
  except OSError:  # None; or unwritable: the download says so.
    pass
  return False


def _sniff(path: str, name: str) -> str | None:
  """'zip', 'tar' or 'gz' (a gzip whose `name` lacks `.gz`) by the content
  of `path`, whose name says none (a URL that redirects to the archive, or
  names it in Content-Disposition: `.../download?id=...`); else None."""
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic in (b'PK\x03\x04', b'PK\x05\x06'):
    return 'zip'
  with contextlib.suppress(tarfile.TarError, OSError, EOFError, zlib.error):
    if tarfile.is_tarfile(path):  # Compressed or not.
      return 'tar'
  gz = magic[:2] == b'\x1f\x8b' and not name.lower().endswith('.gz')
  return 'gz' if gz else None


def _keep_as(path: str, final: str, name: str) -> None:
  """Moves file `path` into the new directory `final` as `name`, whole or
  not at all (read as the one file it holds, `_inside`)."""
  root, base = os.path.split(final)
  tmp = core.make_temp_dir(root, f'.{base}-{core.owner_tag()}.')
  try:
    os.replace(path, os.path.join(tmp, name))
    os.rename(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _inside(path: str) -> str:
  """The one file that directory `path` holds, if so (an archive of one
  file, e.g. a CSV: read as that file), else `path`."""
  if not os.path.isdir(path):
    return path
  entries = [e for e in os.listdir(path) if not e.startswith('.')]
  if len(entries) == 1 and os.path.isfile(os.path.join(path, entries[0])):
    return os.path.join(path, entries[0])
  return path


def fetch(url: str, cache_dir: str, key: str = 'path') -> str:
  """The local copy of `url`: a file, an archive's one file or directory.

  Args:
    url: http(s) URL, with an optional `#sha256=` or `#md5=` fragment.
    cache_dir: the dataset cache; the copy goes under its `downloads/`.
    key: the config key that holds `url`, for messages.

  Raises:
    DataError: a fragment that is not a checksum.
    DownloadError: the download or the unpacking failed.
  """
  url, algorithm, digest = _checksum(url, key)
  checksum = {algorithm: digest} if algorithm else {}
  name = os.path.basename(urllib.parse.urlsplit(url).path)
  if name in ('', '.', '..'):  # Else its copy would be the cache's folders.
    name = 'download'
  tag = hashlib.sha256(url.encode()).hexdigest()[:16]
  root = os.path.join(cache_dir, 'downloads', f'url-{tag}')
  _sweep_parts(os.path.dirname(root), os.path.basename(root))
  kind = archive_kind(name)
  final = os.path.join(root, _stem(name) if kind else name)
  if os.path.exists(final):  # Complete: only renamed into place whole.
    _check_copy(url, final, algorithm, digest, key)
    return _inside(final)
  # One process downloads; the others (runs started together) wait.
  with core.building(root, os.path.join(cache_dir, 'locks')):
    if os.path.exists(final):
      _check_copy(url, final, algorithm, digest, key)
      return _inside(final)
    # Unknown by its name, it is looked at before it takes its place.
    archive = os.path.join(root, name + ('' if kind else UNNAMED))
    digests = dict(checksum)  # Of the archive.
    aside = archive + UNVERIFIED
    if not _archive_in_place(archive, algorithm, digest) and not _named(
      aside, archive, algorithm, digest
    ):
      logging.info('Downloading %s into %s', url, root)
      digests = {}
      download.download(
        url, archive, key=key, digests=digests, mismatched=aside, **checksum
      )
    try:
      kind = kind or _sniff(archive, name)
      if not kind:
        os.replace(archive, final)
      elif kind == 'gz':  # A gzip of one file: read compressed, so named.
        _keep_as(archive, final, name + '.gz')
      else:
        unpack(archive, final, kind)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as e:
      raise core.DownloadError(
        f'Could not unpack {url} (config.dataset.{key}): {e}. The archive'
        ' was deleted: run again; or unpack it yourself and set'
        f' config.dataset.{key} to its directory.'
      ) from e
    except OSError as e:
      # Unlocked (`core.building`), a run that downloaded the same URL at
      # once put its copy in place first (and took the archive).
      if os.path.exists(final):
        return _inside(final)
      raise core.DownloadError(
        f'Could not unpack {url} into {root}: {e}. {unpack_advice(e, archive)}'
      ) from e
    _record(root, digests)
  return _inside(final)


def _recorded(root: str) -> dict[str, str]:
  """The digests recorded in `root` (`RECORD`); none if unreadable."""
  try:
    with open(os.path.join(root, RECORD)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def _record(root: str, digests: dict[str, str], add: bool = False) -> None:
  """Writes `digests` (`add`: besides those recorded) as `root`'s `RECORD`
  (atomic; skipped if unwritable); none: removes it."""
  path = os.path.join(root, RECORD)
  tmp = f'{path}.{core.owner_tag()}'
  try:
    if not digests:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      return
    with open(tmp, 'w') as f:
      json.dump({**(_recorded(root) if add else {}), **digests}, f)
    os.replace(tmp, path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def _check_copy(
  url: str, final: str, algorithm: str | None, digest: str | None, key: str
) -> None:
  """Raises a DataError unless the kept copy `final` of `url` is the file
  that the fragment's `digest` names (no fragment: nothing to check).

  The digest recorded when it was downloaded is compared; a file kept as it
  is, without one, is hashed (and recorded).
  """
  if algorithm is None:
    return
  root = os.path.dirname(final)
  got = _recorded(root).get(algorithm)
  if got is None and os.path.isfile(final):  # The download itself.
    with open(final, 'rb') as f:
      got = hashlib.file_digest(f, algorithm).hexdigest()
    _record(root, {algorithm: got}, add=True)
  if got is None:
    raise core.DataError(
      f'config.dataset.{key}: the copy of {url} in {root} was unpacked from'
      f' a download whose {algorithm} was not recorded, so #{algorithm}='
      f' cannot be checked against it: delete {root} to download it again'
      ' and check it, or leave the fragment out.'
    )
  if got != digest:
    raise core.DataError(
      f'config.dataset.{key}: the copy of {url} in {root} has'
      f' {algorithm.upper()} {got}, not the #{algorithm}={digest} of the URL:'
      ' correct the fragment; or, if the URL serves another file now,'
      f' delete {root} to download it again.'
    )


def _sweep_parts(downloads: str, current: str) -> None:
  """Deletes the abandoned `.part` and `UNVERIFIED` files of the `url-*`
  directories in `downloads` other than `current` (`_remove_abandoned`);
  nothing else."""
  try:
    tags = [
      t for t in os.listdir(downloads) if t.startswith('url-') and t != current
    ]
  except OSError:  # No downloads yet.
    return
  for tag in tags:
    root = os.path.join(downloads, tag)
    try:
      names = os.listdir(root)
      parts = [n for n in names if n.endswith(('.part', UNVERIFIED))]
    except OSError:  # Not a directory, or gone.
      continue
    for name in parts:
      _remove_abandoned(os.path.join(root, name))


def _remove_abandoned(part: str) -> None:
  """Deletes the file `part` and its `.json` if not modified for
  `PART_MAX_AGE_S` and held by no process (a download resuming it holds it
  with `flock`, as `download._locked`)."""
  try:
    if time.time() - os.stat(part).st_mtime < PART_MAX_AGE_S:
      return
    fd = os.open(part, os.O_RDONLY)
  except OSError:
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    info = os.fstat(fd)
    age = time.time() - info.st_mtime
    if age < PART_MAX_AGE_S or info.st_ino != os.stat(part).st_ino:
      return  # Written or replaced since.
    logging.info(
      'Removing %s: a download not resumed for %.0f days', part, age / 86400
    )
    os.remove(part)
    with contextlib.suppress(FileNotFoundError):
      os.remove(part + '.json')
  except OSError:  # Held, gone, or a cache this process cannot write.
    pass
  finally:
    os.close(fd)  # Releases the lock.


def unpack_advice(error: OSError, archive: str) -> str:
  """The advice of a failed unpacking: what is left, and what to do."""
  if disk_refused(error) and os.path.exists(archive):
    return (
      f'The downloaded archive is kept ({archive}): free space there (or'
      ' restore write access) and run again, and it is unpacked without'
      ' being downloaded again.'
    )
  return 'Set config.dataset.cache_dir to a writable directory with free space.'
