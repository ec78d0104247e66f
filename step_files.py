"""The files of a checkpoint step, verified before they are read.

Once a step is complete, a `checksums.json` beside its files records their
sizes and SHA-256; a restore verifies them first (orbax itself reads a
flipped bit without complaint). A step without the file, from a run killed
between the two writes, is read unverified. `copy_step` copies a complete
step: the files orbax would write again for the same state and meta.
"""

import hashlib
import json
import os
import shutil

CHECKSUMS = 'checksums.json'
# What orbax appends to the name of a step it writes; it deletes such
# directories, which a killed run left, when it opens theirs.
SAVING = '.orbax-checkpoint-tmp'


def checksums(directory: str) -> dict[str, list]:
  """`{relative path: [size, sha256 hex]}` of every file under `directory`."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative.startswith(CHECKSUMS):
        continue  # The record itself, or its copy being written.
      digest = hashlib.sha256()
      with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
          digest.update(chunk)
      found[relative] = [os.path.getsize(path), digest.hexdigest()]
  return found


def write_checksums(directory: str) -> None:
  """Records the checksums of a complete step directory (atomic)."""
  files = checksums(directory)
  path = os.path.join(directory, CHECKSUMS)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump({'files': files}, f, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def damage(directory: str) -> str | None:
  """What is wrong with a step directory's files; None if they match.

  Files that `checksums.json` lists must exist with their recorded size and
  content. Without the file nothing can be checked: None.
  """
  if not os.path.isdir(directory):
    return 'it does not exist'
  path = os.path.join(directory, CHECKSUMS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      expected = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{CHECKSUMS} is unreadable ({e})'
  for relative, (size, _) in sorted(expected.items()):
    file = os.path.join(directory, relative)
    if not os.path.isfile(file):
      return f'{relative} is missing'
    if os.path.getsize(file) != size:
      return f'{relative} has {os.path.getsize(file)} bytes, not {size}'
  actual = checksums(directory)
  for relative, (_, digest) in sorted(expected.items()):
    if actual[relative][1] != digest:
      return f'the content of {relative} changed (SHA-256 mismatch)'
  return None


def copy_step(source: str, target: str) -> None:
  """Copies the complete step directory `source` to `target` (absent).

  The files go to `target` + `SAVING`, synced, and must match the
  checksums of `source`, copied with them; then the directory is renamed,
  as orbax finishes a step. The copy shares no file with `source`: a file
  damaged in one is not damaged in the other.

  Raises:
    ValueError: `source` has no checksums, or the copy does not match them.
    OSError: the copy could not be written.
  """
  if not os.path.exists(os.path.join(source, CHECKSUMS)):
    raise ValueError(f'{source} has no {CHECKSUMS} to check a copy with')
  tmp = target + SAVING
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    # Not shutil.copytree: it copies the other files after a refused one
    # and raises a list of every error, not the first OSError.
    for root, _, files in os.walk(source, onerror=_raise):
      into = os.path.normpath(os.path.join(tmp, os.path.relpath(root, source)))
      os.mkdir(into)
      for name in files:
        _copy_synced(os.path.join(root, name), os.path.join(into, name))
      _sync(into)
    problem = damage(tmp)
    if problem is not None:
      raise ValueError(f'the copy of {source} is damaged: {problem}')
    os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _sync(os.path.dirname(target))


def _raise(error: OSError) -> None:
  raise error


def _copy_synced(source: str, target: str) -> None:
  shutil.copyfile(source, target)
  _sync(target)


def _sync(path: str) -> None:
  """Flushes the file or directory `path` to the disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
