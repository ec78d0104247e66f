"""The record of the data files a run trains on: `workdir/sources.json`.

A run's config names its files by path (`workdir.PATH_KEYS`); the checkpoints
were trained on their bytes. `record` writes each file's size and SHA-256
(the digests that key the data cache, datasets/cache.py) when a run starts,
so that a resumed run may name the same files at another path: `check`
accepts the move when the files there have the recorded digests, and
refuses it otherwise, as it refuses files changed in place, before the
data is encoded or anything written.
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
  workdir: str,
  changes: list[dict],
  digests: Callable[[], dict],
  resuming: bool | None = None,
) -> None:
  """Refuses a resume whose data files hold other bytes than recorded.

  Args:
    workdir: the run's directory.
    changes: `workdir.check_resume`'s entries, given `moved=True`.
    digests: gives the files that the run names, `{role: {'size',
      'sha256'}}` (as `data.load_dataset` gives them to its `check_sources`);
      called only if there is a record to compare them with.
    resuming: whether the workdir holds checkpoints; None:
      `workdir.has_checkpoints`. A new run compares nothing.

  Raises:
    UserError: on a resume, the files differ from `FILE`'s record; or a
      path of `workdir.PATH_KEYS` changed and there is no record (a run
      begun before it was written).
  """
  if resuming is None:
    resuming = workdir_lib.has_checkpoints(workdir)
  if not resuming:
    return
  moved = [e for e in changes if e['key'] in workdir_lib.PATH_KEYS]
  what = '; '.join(map(workdir_lib.change_text, moved))
  path = os.path.join(workdir, FILE)
  recorded = _recorded(path)
  if recorded is None:
    if moved:
      raise UserError(
        f'workdir {workdir} holds checkpoints of a run whose data files'
        f' moved: {what}; {path} is missing or unreadable (a run begun'
        ' before it was written: a resume at the recorded paths writes it),'
        ' so the files cannot be compared. Name the files it was trained on'
        ' to resume; to train on these, use another workdir.'
      )
    return  # Recorded by this run, once its data is accepted.
  sources = digests()
  if recorded == sources:
    if moved:
      logging.info('Resumed with %s: the same files, by their SHA-256.', what)
    return
  differ = ', '.join(
    f'{role} {_digest(recorded.get(role))} -> {_digest(sources.get(role))}'
    for role in sorted(set(recorded) | set(sources))
    if recorded.get(role) != sources.get(role)
  )
  if moved:
    what = f'moved: {what}; the files there differ'
  else:
    what = 'changed: they differ'
  raise UserError(
    f'workdir {workdir} holds checkpoints of a run whose data files {what}'
    f' from those recorded in {path} ({differ}). Resumed, the run would'
    ' train and be scored on other rows: name the files it was trained on'
    ' to resume; to train on these, use another workdir'
    f' (--config.init_from={workdir} starts from its best parameters).'
  )


def record(workdir: str, sources: dict) -> None:
  """Writes the digests of the files a run trains on, if they changed.

  Args:
    workdir: the run's directory.
    sources: the loaded dataset's files, `{role: {'size', 'sha256'}}`.

  Raises:
    UserError: the record cannot be written.
  """
  path = os.path.join(workdir, FILE)
  if not sources or _recorded(path) == sources:
    return
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
