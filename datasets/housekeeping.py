"""What a directory of encoded caches accumulates, and what of it may go.

`remove_stale` deletes what no run can read: the `.tmp-*` directory of a
preprocessing run that died (its `owner.json` names the host and process)
and `.damaged-*` directories, caches that a rebuild moved aside.

`report_superseded` names the caches that changed sources leave behind. A
cache is keyed by its sources' content and the options (datasets/cache.py),
and its meta.json records the real paths of those sources
(`source_paths`). When a file is appended to or re-exported, the next run
builds a new cache; the old one, of the same paths and options, is read
again only by a config whose files hold its contents: the same files put
back, or a copy elsewhere (the key is the content, not the path). Neither
can be ruled out here, so it is not deleted: one warning names it, its
size and the command that removes it.
"""

import json
import logging
import os
import shlex
import shutil

from datasets import core

# Written into a temporary cache directory: who is filling it.
OWNER = 'owner.json'


def remove_stale(parent: str) -> None:
  """Deletes temporary and damaged cache directories of dead runs.

  A killed preprocessing run leaves its `.tmp-*` directory (up to the size
  of the encoded data); its `owner.json` names the host and process, so a
  later run on the same host removes it once that process is gone. A
  `.damaged-*` directory is a replaced cache that nothing reads any more.
  """
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    if entry.startswith('.damaged-'):
      shutil.rmtree(path, ignore_errors=True)
    if not entry.startswith('.tmp-'):
      continue
    try:
      with open(os.path.join(path, OWNER)) as f:
        owner = json.load(f)
    except (OSError, ValueError):
      continue  # Not ours, or being created.
    try:
      gone = core.process_gone(owner['host'], int(owner['pid']))
    except (KeyError, ValueError, TypeError):
      continue  # Unreadable: leave it.
    if gone:
      logging.info('Removing %s, left by a run that died', path)
      shutil.rmtree(path, ignore_errors=True)


def source_paths(paths: dict[str, str]) -> dict[str, str]:
  """`{role: real path}` of a cache's sources, as its meta.json records."""
  return {role: os.path.realpath(path) for role, path in paths.items()}


def superseded(directory: str, spec: dict, paths: dict[str, str]) -> list[str]:
  """Caches beside `directory` of the same source paths and options as its
  `spec`, built from other contents of those files.

  Caches whose meta.json cannot be read, or records no `source_paths`
  (written before it did), are left out.
  """
  parent, name = os.path.split(directory)
  spec = json.loads(json.dumps(spec))  # As meta.json holds it.
  options = {k: v for k, v in spec.items() if k != 'sources'}
  real = source_paths(paths)
  found = []
  for entry in sorted(os.listdir(parent)):
    other = os.path.join(parent, entry)
    if entry.startswith('.') or entry == name:
      continue
    try:
      with open(os.path.join(other, 'meta.json')) as f:
        meta = json.load(f)
      old = meta['spec']
      same = meta['source_paths'] == real and options == {
        k: v for k, v in old.items() if k != 'sources'
      }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      continue
    if same and old.get('sources') != spec['sources']:
      found.append(other)
  return found


def _size(directory: str) -> int:
  """Bytes of the files in `directory` (a cache holds no subdirectories)."""
  with os.scandir(directory) as entries:
    return sum(
      e.stat(follow_symlinks=False).st_size
      for e in entries
      if e.is_file(follow_symlinks=False)
    )


def report_superseded(
  directory: str, spec: dict, paths: dict[str, str]
) -> None:
  """Warns, in one line, of the caches that the new cache `directory`
  supersedes (`superseded`): each with its size, and how to remove them."""
  sizes = {}
  for old in superseded(directory, spec, paths):
    try:
      sizes[old] = _size(old)
    except OSError:
      continue  # Removed meanwhile.
  if not sizes:
    return
  listed = ', '.join(f'{d} ({size_text(n)})' for d, n in sizes.items())
  logging.warning(
    'Older caches of the same files (%s) and options remain, built from'
    ' contents these files no longer hold: %s. Only a config whose files'
    ' hold those contents again reads them; to free %s: rm -r %s',
    ', '.join(source_paths(paths).values()),
    listed,
    size_text(sum(sizes.values())),
    ' '.join(shlex.quote(d) for d in sizes),
  )


def size_text(size: int) -> str:
  """`size` bytes in MB, or kB below 1 MB, with one decimal."""
  return f'{size / 1e6:.1f} MB' if size >= 1e6 else f'{size / 1e3:.1f} kB'
