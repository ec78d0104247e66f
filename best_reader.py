"""The best checkpoint of another run, which may be training still.

`load_best` reads `workdir/checkpoints/best` for predict.py (and export) and
`config.init_from` (`warm_start` copies its parameters into a new state).
The run that owns it may replace its best step while it is read (a newer
best, or the same epoch saved again by a resumed run): the read waits for
the new step, up to `READ_WAIT_S` seconds, instead of calling the best lost
or damaged. Only while a run may hold the workdir's lock
(`lock.may_be_held`): without one (a copy of a run, a run that ended), a
best that fails to read is reported at once.
"""

import itertools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import checkpoints
import lock
import multihost
import orbax_logs
import step_files
from utils import UserError

# How long `load_best` reads again a best step that a run replaces.
READ_WAIT_S = 120.0
# A step that orbax is writing: `<step>` plus this. One not written to for
# `STALE_S` seconds, or a directory of steps left empty that long ago, is
# what a killed run left.
SAVING = step_files.SAVING
STALE_S = 30.0


def load_best(workdir: str) -> tuple[Any, dict]:
  """The best state (as saved, host arrays) and meta of another run.

  The run may be training still: a step it replaces while it is read (by a
  newer best, or by the same epoch's when it resumed) is read again once the
  new one is saved. Where no run may hold the workdir's lock, asked after
  each failed read (a run may start as we read), none can replace the step:
  the failure is reported at once.

  Raises:
    UserError: `workdir` has no readable best checkpoint.
  """
  # orbax reads absolute paths only; a relative one is of this directory.
  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  directory = os.path.join(path, 'checkpoints', 'best')
  again = (
    f' Run training again in {workdir} with its config: it recovers the best'
    ' checkpoint from checkpoints/latest while that holds it.'
  )
  if holder := lock.running(path):
    logging.warning(
      '%s is still training (%s): its best checkpoint so far is read.',
      workdir,
      holder,
    )
  if not os.path.isdir(directory):
    raise UserError(f'No best checkpoint in {directory}.{again}')
  deadline = time.monotonic() + READ_WAIT_S
  for attempt in itertools.count():
    mgr, step, seen = None, None, None
    last = time.monotonic() > deadline
    try:
      mgr = checkpoints.manager(directory, read_only=True)
      step = mgr.latest_step()
      if step is None:
        if not last and _replaced_by_a_run(path, directory, None, None):
          _wait(directory, attempt)
          continue  # Listed as the run swapped its best: none seen.
        raise UserError(f'No best checkpoint in {directory}.{again}')
      seen = _identity(directory, step)
      return checkpoints.restore(mgr, step)
    except (ValueError, OSError) as e:
      if not last and _replaced_by_a_run(path, directory, step, seen):
        orbax_logs.quiet_cut_reads(directory)
        _wait(directory, attempt)
        continue
      if step is None or isinstance(e, OSError):
        raise UserError(
          f'Cannot read the best checkpoint in {directory}: {e}.{again}'
        ) from e
      raise UserError(
        f'The best checkpoint {os.path.join(directory, str(step))} is damaged:'
        f' {e}.{again}'
      ) from e
    finally:
      if mgr is not None:
        mgr.close()


def _wait(directory: str, attempt: int) -> None:
  """Sleeps before the read `attempt + 1` of a best step a run replaces."""
  if not attempt:
    logging.info(
      'A run is saving %s: reading it once saved (waiting %d s at most).',
      directory,
      READ_WAIT_S,
    )
  time.sleep(min(0.01 * 2**attempt, 1.0))


def _replaced_by_a_run(
  workdir: str, directory: str, step: int | None, seen: tuple | None
) -> bool:
  """Whether a run in `workdir` replaced `step` of its best `directory`;
  False at once where no run may hold the workdir (`lock.may_be_held`)."""
  return lock.may_be_held(workdir) and _replaced(directory, step, seen)


def _identity(directory: str, step: int) -> tuple[int, int] | None:
  """The inode and change time of step `step`'s directory; None if none."""
  try:
    info = os.stat(os.path.join(directory, str(step)))
  except OSError:
    return None
  return info.st_ino, info.st_ctime_ns


def _replaced(directory: str, step: int | None, seen: tuple | None) -> bool:
  """Whether a run replaced `step` (`seen`: its `_identity` when read).

  It saved a newer step, deleted `step`, or saves it again (a resumed run
  redoes the epoch: it deletes the step, then writes it): also while the
  step's files go, and until its new save begins (for `STALE_S` seconds
  after the directory changed).
  """
  names = os.listdir(directory) if os.path.isdir(directory) else []
  steps = {int(n) for n in names if n.isdigit()}
  if not steps:
    return (
      step is not None
      or _recent(directory, tree=False)
      or _saving(directory, names)
    )
  if step is None or step not in steps or max(steps) > step:
    return True
  path = os.path.join(directory, str(step))
  return _identity(directory, step) != seen or _recent(path)


def _saving(directory: str, names: list[str]) -> bool:
  """Whether a step of `names` (in `directory`) is being written now."""
  return any(_recent(os.path.join(directory, n)) for n in names if SAVING in n)


def _recent(path: str, tree: bool = True) -> bool:
  """Whether `path` (with `tree`, or a folder or file under it) changed in
  the last `STALE_S` seconds, or went as it was looked at."""
  now = time.time()
  for root, _, files in os.walk(path) if tree else [(path, (), ())]:
    for name in [root, *(os.path.join(root, f) for f in files)]:
      try:
        if now - os.stat(name).st_mtime < STALE_S:
          return True
      except OSError:
        return True  # Renamed as orbax finishes it, or deleted.
  return False


def warm_start(state: Any, workdir: str) -> Any:
  """`state` (a train.TrainState) with every parameter whose path and shape
  match copied from the best checkpoint of run `workdir`, and a new
  optimizer state.

  Used e.g. for FNN's FM pre-training: `--config.init_from=<fm workdir>`.
  Every process reads it; all stop unless all read the same epoch.
  """
  with multihost.errors_shared():  # Unshared storage fails on one alone.
    restored, meta = load_best(workdir)
  multihost.assert_same_on_all_processes(
    meta['epoch'], 'best checkpoints (config.init_from)', workdir
  )
  keystr, leaves = jax.tree_util.keystr, jax.tree_util.tree_leaves_with_path
  source = {keystr(path): value for path, value in leaves(restored['params'])}
  copied, skipped = [], []

  def take(path, value):
    old = source.get(keystr(path))
    if old is None or np.shape(old) != np.shape(value):
      if old is not None:
        skipped.append(f'{keystr(path)} {np.shape(old)} -> {np.shape(value)}')
      return value
    copied.append(keystr(path))
    return jnp.asarray(old, value.dtype)

  params = jax.tree_util.tree_map_with_path(take, state.params)
  if not copied:
    raise UserError(
      f'config.init_from: no parameter of {workdir} matches this model.'
    )
  logging.info('Warm start from %s: %s', workdir, ', '.join(copied))
  if skipped:  # E.g. another embed_dim: the user expected these copied.
    msg = 'not copied, shapes differ (match e.g. embed_dim to copy them)'
    logging.warning('Warm start from %s: %s: %s', workdir, msg, skipped)
  return state.replace(params=params, opt_state=state.tx.init(params))
