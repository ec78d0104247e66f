"""The checkpoints of a run: the latest states to resume from, and the best.

`workdir/checkpoints/latest` keeps the states of the last `KEEP_LATEST`
epochs, and the best epoch's while it is older, so that a damaged newest one
falls back to the one before and a lost best one can be recovered.
`workdir/checkpoints/best` keeps the state of the best validation AUC, which
the test split scores. Each is an orbax step directory named by its epoch,
holding the `TrainState` and a JSON `meta` (epoch, best AUC and epoch, bad
epochs, wall time, the run's device count: `run_meta`).

Nothing on disk is trusted without a check: a complete step records the
checksums of its files, which a restore verifies first (`step_files`).

Each save is a synchronous orbax save, so that an error (a full disk, a
directory made read-only) raises in the code that saved instead of leaving
orbax's background threads waiting for each other until the process is
killed. With `background=True` the saves run in that order on a thread of
our own while training goes on: an error raises at the next save or at
`wait`, and the saves after a failed one are skipped, so the directories
hold what a synchronous run killed at that save would hold. A save waits
while `MAX_QUEUED` others wait to start (an epoch's best and latest
states): a kill loses four epochs at most (one save being written, two
queued, one waiting), and training holds a bounded number of copies of
the state, however short its epochs. An epoch's best and latest states,
the same, are written once: the latest copies the best's files.

The state is replicated: in a multi-process run process 0 saves it alone,
and every process learns the outcome before it goes on
(`multihost.errors_shared`). With orbax's collective save, a write that
failed on one process (its `checksums.json`, its part of the state) left
the others waiting in their next collective until they were aborted.
"""

from collections.abc import Callable
import logging as std_logging
import os
import threading
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

import legacy
import multihost
import orbax_logs
import step_files
import utils
from utils import UserError

KEEP_LATEST = 2
# Background saves that may wait to start, beyond the one being written.
MAX_QUEUED = 2


def manager(
  directory: str, *, read_only: bool = False
) -> ocp.CheckpointManager:
  """A synchronous orbax manager of `directory`; we delete its old steps.

  In a multi-process run only process 0's manager writes (the others' read
  only), and no orbax call is a collective: each process's orbax counts it
  as the only process (its `MultiprocessingOptions`).
  """
  alone = {}
  if jax.process_count() > 1:
    me = jax.process_index()
    alone['multiprocessing_options'] = ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}
    )
    read_only = read_only or me != 0
  if read_only:
    options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0, **alone
    )
    # orbax warns that the directory it was asked to only read is read-only.
    with orbax_logs.without(
      std_logging.WARNING, 'Given directory is read only'
    ):
      return ocp.CheckpointManager(directory, options=options)
  # Made here: orbax makes none for one process of several, and otherwise
  # reports its failure from a thread, at the first save.
  os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(
    create=False,
    enable_async_checkpointing=False,
    # A process killed while saving leaves a temporary directory behind.
    cleanup_tmp_directories=True,
    **alone,
  )
  mgr = ocp.CheckpointManager(directory, options=options)
  # orbax deletes them on a thread that only its first save waits for (not
  # close()): an exit before it ends printed its traceback, and a copy into
  # `<step>.orbax-checkpoint-tmp` could have been deleted under it.
  getattr(mgr, '_maybe_await_cleanup_tmp_directory', lambda: None)()
  return mgr


def _step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mgr.directory), str(step))


def restore(
  mgr: ocp.CheckpointManager, step: int, target: Any = None
) -> tuple[Any, dict]:
  """The verified state (shaped as `target`; None: as saved) and meta.

  Raises:
    ValueError: the step's files are damaged or cannot be restored (every
      process raises when any does).
  """
  problem = step_files.damage(_step_dir(mgr, step))
  restored = None

  def read(target):
    return mgr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
      ),
    )

  if problem is None:
    try:
      try:
        restored = read(target)
      except Exception as first:  # pylint: disable=broad-except
        # Saved by an earlier version of the model (legacy.py)?
        old = None if target is None else legacy.with_old_biases(target)
        if old is None:
          raise
        try:
          restored = read(old)
        except Exception:  # pylint: disable=broad-except
          raise first from None
      restored = legacy.upgrade(restored['state']), restored['meta']
    except Exception as e:  # pylint: disable=broad-except
      lines = str(e).splitlines()  # None: a bare `assert`.
      problem = type(e).__name__ + (f': {lines[0][:300]}' if lines else '')
  # Every process restores the same step, or none does.
  failed = multihost.allgather(np.int32(problem is not None))
  if failed.any():
    raise ValueError(problem or 'another process could not read it')
  return restored


def save(
  mgr: ocp.CheckpointManager,
  step: int,
  state: Any,
  meta: dict,
  keep: Callable[[list[int]], set[int]],
  copy_of: str | None = None,
) -> None:
  """Saves `state` (host arrays) and `meta` as `step`, then prunes old steps.

  Steps at or after `step` (a redone epoch, or steps that a fallback skipped)
  are deleted first: orbax saves nothing at or below its latest step. After
  the save, steps outside `keep(all steps)` are deleted. `copy_of`, a
  complete step of this process's holding the same state and meta, is
  copied instead of writing the state again (`step_files.copy_step`).

  In a multi-process run (the state is replicated) process 0 saves alone,
  and the others then list its steps; an error of either raises on all.

  Raises:
    UserError: the directory cannot be written (full disk, permissions).
  """
  with multihost.errors_shared():  # No collective in it: process 0 alone.
    if jax.process_index() == 0:
      with orbax_logs.quiet_if_refused():
        _save(mgr, step, state, meta, keep, copy_of)
  if jax.process_count() > 1:
    with multihost.errors_shared():  # A host's own listing may fail.
      if jax.process_index() != 0:
        _reload(mgr)


def _reload(mgr: ocp.CheckpointManager) -> None:
  """Lists the steps that process 0 wrote and deleted."""
  try:
    mgr.reload()
  except OSError as e:
    raise UserError(
      f'Cannot read the checkpoints in {mgr.directory}:'
      f' {utils.os_problem(e)}. Check that this host sees the shared'
      ' workdir, then start the run again: it resumes from the last'
      ' checkpoint saved.'
    ) from e


def _save(mgr, step, state, meta, keep, copy_of) -> None:
  try:
    for old in mgr.all_steps():
      if old >= step:
        mgr.delete(old)
    if copy_of is not None:
      step_files.copy_step(copy_of, _step_dir(mgr, step))
      mgr.reload()  # orbax lists the steps it saved, and these on reload.
    else:
      args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
      )
      if not mgr.save(step, args=args):
        raise RuntimeError(f'orbax skipped step {step} in {mgr.directory}')
      mgr.wait_until_finished()
      step_files.write_checksums(_step_dir(mgr, step))
    kept = keep(sorted(mgr.all_steps()))
    for old in mgr.all_steps():
      if old not in kept:
        mgr.delete(old)
  except Exception as e:
    problem = utils.os_problem(e)
    if problem is None:
      raise
    raise UserError(
      f'Cannot save the checkpoint of epoch {step} in {mgr.directory}:'
      f' {problem}. Free space or restore write access there, then start'
      ' the run again: it resumes from the last checkpoint saved.'
    ) from e


def run_meta(meta: dict | None, workdir: str) -> dict:
  """A new run's meta (None), or a resumed run's, with this run's devices.

  A resume is logged, with a warning when the checkpoint was saved by a run
  on another device count: dropout masks are drawn per device, so the
  epochs that follow differ from those of the run uninterrupted. Checkpoints
  of earlier versions record no count and resume silently.
  """
  devices = jax.device_count()
  if meta is None:
    new = {'epoch': 0, 'best_auc': -1.0, 'best_epoch': 0, 'bad_epochs': 0}
    return dict(new, num_devices=devices)
  scale = meta.get('lr_scale', 1)  # Below 1 after plateaus.
  rates = f' at x{scale:g} the learning rates' if scale != 1 else ''
  logging.info('Resumed from epoch %d of %s%s', meta['epoch'], workdir, rates)
  saved = meta.get('num_devices', devices)
  if saved != devices:
    logging.warning(
      'Resuming on %s a run saved on %s: dropout masks are drawn per'
      ' device, so the epochs from here differ from those of a run on %s.',
      *(f'{n} device{"s" * (n > 1)}' for n in (devices, saved, saved)),
    )
  return dict(meta, num_devices=devices)


class Checkpoints:
  """The `latest` and `best` managers of a workdir, with their policies.

  A context manager: leaving it waits for the saves still running and
  closes the managers; an error of those saves raises then, unless another
  error is already on its way (it is logged instead). An interrupt during
  that wait skips the saves not started and waits for the one being written.
  """

  def __init__(self, workdir: str, *, background: bool = False):
    """Opens `workdir/checkpoints/{latest,best}`.

    Args:
      workdir: the run's directory.
      background: save on a thread while the caller goes on (see the module
        docstring); the saved states are copied first.
    """
    root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    # Process 0 alone makes the directories: its error stops every process.
    with multihost.errors_shared(), utils.writing('checkpoints', root):
      self.latest = manager(os.path.join(root, 'latest'))
      try:
        self.best = manager(os.path.join(root, 'best'))
      except BaseException:
        self.latest.close()
        raise
    self.background = background
    # Saves not started, in order, run by one thread.
    self._queue: list[Callable[[], None]] = []
    self._changed = threading.Condition()
    self._worker: threading.Thread | None = None
    self._failed = False  # A save failed: the later ones are skipped.
    self._error: BaseException | None = None  # Its error, until raised.
    self._last_copy: tuple[Any, Any] | None = None  # (state, its copy).
    self._best_saved: tuple | None = None  # (epoch, state, meta) of the last.

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, kind, error, tb) -> None:
    try:
      try:
        self.wait()
      except KeyboardInterrupt:  # Ctrl-C again: the save being written ends.
        self._skip_queued()
        self.wait()
        raise
    except Exception as e:  # pylint: disable=broad-except
      if error is None:
        raise
      logging.error('A checkpoint save failed too: %s', e)
    finally:
      self.close()

  def _submit(self, job: Callable[[], None]) -> None:
    """Runs `job()` now, or queued after the saves before it (waiting while
    `MAX_QUEUED` saves wait to start)."""
    if not self.background:
      job()
      return
    self._raise_error()
    with self._changed:
      self._changed.wait_for(lambda: len(self._queue) < MAX_QUEUED)
      self._queue.append(job)
      if self._worker is None:  # Not a daemon: exiting waits for the saves.
        self._worker = threading.Thread(target=self._work, name='ckpt-save')
        self._worker.start()

  def _work(self) -> None:
    """Runs the queued saves in order, until none is left or one fails."""
    while True:
      with self._changed:
        if self._failed or not self._queue:
          self._queue, self._worker = [], None
          self._changed.notify_all()
          return
        job = self._queue.pop(0)
        self._changed.notify_all()  # A waiting save may queue.
      try:
        job()
      except BaseException as e:  # pylint: disable=broad-except
        with self._changed:
          self._failed, self._error = True, e

  def _skip_queued(self) -> None:
    """Drops the saves not started; the one being written goes on.

    Closing the managers under it, the exit would break it: orbax's
    threads fail once the interpreter shuts down, with a traceback.
    """
    with self._changed:
      skipped, self._queue = len(self._queue), []
      writing = self._worker is not None
      self._changed.notify_all()
    if not writing:  # It ended as the interrupt came.
      return
    logging.warning(
      'Interrupted during the checkpoint saves: skipping the %d not'
      ' started, finishing the one being written (interrupt again to'
      ' abandon it; a rerun resumes from the last complete one).',
      skipped,
    )

  def _raise_error(self) -> None:
    """Raises the first failed save's error, once."""
    error, self._error = self._error, None
    if error is not None:
      raise error

  def wait(self) -> None:
    """Blocks until every queued save is on disk; raises a save's error."""
    with self._changed:
      self._changed.wait_for(lambda: self._worker is None)
    self._raise_error()

  def restore_latest(self, target: Any) -> tuple[Any, dict | None]:
    """The newest readable latest state and meta; `(target, None)` if none.

    A damaged step is skipped with a warning naming what is wrong.

    Raises:
      UserError: there are steps but none can be read.
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    problems = []
    for step in steps:
      try:
        state, meta = restore(self.latest, step, target)
      except ValueError as e:
        problems.append(f'epoch {step}: {e}')
        logging.warning(
          'Checkpoint %s is damaged (%s); falling back to an older one.',
          _step_dir(self.latest, step),
          e,
        )
        continue
      return state, meta
    if steps:
      raise UserError(
        f'No checkpoint in {self.latest.directory} can be read: '
        + '; '.join(problems)
        + '. Restore the directory from a backup, or delete'
        f' {os.path.dirname(str(self.latest.directory))} to train this run'
        ' again from the start.'
      )
    return target, None

  def save_latest(self, epoch: int, state: Any, meta: dict) -> None:
    """Saves the state after `epoch`; keeps the last two and the best.

    Right after `save_best` of the same epoch, state (unchanged) and meta,
    the best's files are copied instead of written again.
    """
    best, saved = meta['best_epoch'], self._best_saved or (None, None, None)
    same = saved[0] == epoch and saved[1] is state and saved[2] == meta
    source = None
    if same:
      source = _step_dir(self.best, epoch)
    state, meta = self._copy(state, meta)
    self._last_copy = self._best_saved = None  # Shared with that save_best.

    def keep(steps: list[int]) -> set[int]:
      return set(steps[-KEEP_LATEST:]) | {best}

    def job():
      save(self.latest, epoch, state, meta, keep, source)
      logging.info('Saved the checkpoint of epoch %d', epoch)

    self._submit(job)

  def save_best(self, epoch: int, state: Any, meta: dict) -> None:
    """Saves the new best state, `epoch`'s; deletes the former best."""
    self._best_saved = epoch, state, dict(meta)
    state, meta = self._copy(state, meta)

    def job():
      save(self.best, epoch, state, meta, lambda steps: {epoch})

    self._submit(job)

  def _copy(self, state: Any, meta: dict) -> tuple[Any, dict]:
    """What a background save needs: its own copies, as the caller goes on.

    The state of a `save_best` and the `save_latest` after it (an epoch's
    two saves) is copied once: the caller does not change it in between.
    """
    if not self.background:
      return state, meta
    if self._last_copy is None or self._last_copy[0] is not state:
      self._last_copy = state, jax.tree.map(np.array, state)
    return self._last_copy[1], dict(meta)

  def restore_best(self, meta: dict, target: Any) -> Any:
    """The best state, epoch `meta['best_epoch']`.

    A missing or damaged best checkpoint is recovered, with a warning, from
    the latest states (which keep the best epoch's) and saved again.

    Raises:
      UserError: neither directory holds a readable state of that epoch.
    """
    self.wait()
    epoch = meta['best_epoch']
    problems = []
    for mgr in (self.best, self.latest):
      if epoch not in mgr.all_steps():
        problems.append(f'{_step_dir(mgr, epoch)} does not exist')
        continue
      try:
        state, _ = restore(mgr, epoch, target)
      except ValueError as e:
        problems.append(f'{_step_dir(mgr, epoch)}: {e}')
        continue
      if mgr is self.latest:
        logging.warning(
          'The best checkpoint is unusable (%s); recovered epoch %d from %s.',
          problems[0],
          epoch,
          _step_dir(mgr, epoch),
        )
        self.save_best(epoch, state, dict(meta, epoch=epoch))
        self._last_copy = self._best_saved = None  # No save_latest follows.
      return state
    raise UserError(
      f'The best checkpoint, of epoch {epoch} (validation AUC'
      f' {meta["best_auc"]:.5f}), is lost: ' + '; '.join(problems) + '. The'
      ' test split is scored with it. Restore'
      f' {self.best.directory} from a backup, or delete'
      f' {os.path.dirname(str(self.best.directory))} to train this run again'
      ' from the start.'
    )

  def close(self) -> None:
    """Closes the managers (after `wait`, when saving in the background)."""
    try:
      self.latest.close()
    finally:
      self.best.close()
