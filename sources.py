"""The record of the data files a run trains on: `workdir/sources.json`.

A run's config names its files by path (`workdir.PATH_KEYS`); the checkpoints
were trained on their bytes. `record` writes each file's size and SHA-256
(the digests that key the data cache, datasets/cache.py) when a run starts,
so that a resumed run may name the same files at another path: `check`
accepts the move when the files there have the recorded digests, and
refuses it otherwise, before the data is encoded or anything written.
"""

from collections.abc import Callable
import json
import os

from absl import logging

import utils
from utils import UserError
import workdir as workdir_lib

FILE = 'sources.json'


def check(
  workdir: str, changes: list[dict], digests: Callable[[], dict]
) -> None:
  """Refuses a resume whose moved data files hold other bytes than before.

  Args:
    workdir: the run's directory.
    changes: `workdir.check_resume`'s entries, given `moved=True`.
    digests: gives the files that the run names, `{role: {'size',
      'sha256'}}` (`data.source_digests`); called only if a path moved.

  Raises:
    UserError: a path of `workdir.PATH_KEYS` changed, and `FILE` records
      other files, or none (a run begun before it was written).
  """
  moved = [e for e in changes if e['key'] in workdir_lib.PATH_KEYS]
  if not moved:
    return
  what = '; '.join(
    f'{e["key"]} {_show(e, "old")} -> {_show(e, "new")}' for e in moved
  )
  path = os.path.join(workdir, FILE)
  recorded = _recorded(path)
  sources = {} if recorded is None else digests()
  if sources and recorded == sources:
    logging.info('Resumed with %s: the same files, by their SHA-256.', what)
    return
  if recorded is None:
    why = (
      f'{path} is missing or unreadable (a run begun before it was written:'
      ' a resume at the recorded paths writes it), so the files cannot be'
      ' compared'
    )
  else:
    why = ', '.join(
      f'{role} {_digest(recorded.get(role))} -> {_digest(sources.get(role))}'
      for role in sorted(set(recorded) | set(sources))
      if recorded.get(role) != sources.get(role)
    )
    why = f'the files there differ from those recorded in {path} ({why})'
  raise UserError(
    f'workdir {workdir} holds checkpoints of a run whose data files moved:'
    f' {what}; {why}. Name the files it was trained on to resume; to train'
    ' on these, use another workdir or delete this one.'
  )


def record(workdir: str, sources: dict, resuming: bool) -> None:
  """Writes the digests of the files a run trains on, if they changed.

  Args:
    workdir: the run's directory.
    sources: the loaded dataset's files, `{role: {'size', 'sha256'}}`.
    resuming: the run has checkpoints: files changed at their recorded
      paths are warned of (they gave the same ids: `encoder.save`).

  Raises:
    UserError: the record cannot be written.
  """
  path = os.path.join(workdir, FILE)
  recorded = _recorded(path)
  if not sources or recorded == sources:
    return
  if resuming and recorded is not None:
    logging.warning(
      'The data files (%s) changed since %s was written: the run resumes'
      ' on their new rows, which give the same ids.',
      ', '.join(sorted(r for r in sources if recorded.get(r) != sources[r])),
      path,
    )
  with utils.writing(FILE, workdir, f'{FILE}.tmp-*'):
    workdir_lib.write_atomic(path, json.dumps(sources, indent=2) + '\n')


def _recorded(path: str) -> dict | None:
  """The record at `path`; None if missing, unreadable or damaged."""
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  ok = isinstance(record, dict) and all(
    isinstance(v, dict) and isinstance(v.get('sha256'), str)
    for v in record.values()
  )
  return record if ok else None


def _digest(source: dict | None) -> str:
  return f'sha256 {source["sha256"][:12]}' if source else '(absent)'


def _show(entry: dict, key: str) -> str:
  return json.dumps(entry[key]) if key in entry else '(absent)'
