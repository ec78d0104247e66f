"""What orbax logs, cut to what a user of a run needs.

`quiet_info` keeps orbax's INFO lines (a dozen per checkpoint) out of the
log; `without` drops one expected warning; `quiet_if_refused` holds back
orbax's error tracebacks during a save, and drops them when the file
system refused the save (its UserError says it in one line);
`quiet_cut_reads` drops what a read that a writer cut short reports late.
What they install stays for the life of the process (a notebook's too):
the filters on absl's handler and logger (and asyncio's logger, after a
cut read), and a wrapper of `sys.unraisablehook` that passes on all but
"Event loop is closed" errors, which it drops while a save runs and, once
a save was refused or a read cut short, from then on.
"""

from collections.abc import Callable, Iterator
import contextlib
import logging as std_logging
import sys
from typing import Any

from absl import logging

from utils import UserError


class _OrbaxInfoFilter:
  """Drops orbax's INFO lines (a dozen per checkpoint) from the absl log."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def quiet_info() -> None:
  """Installs `_OrbaxInfoFilter` on absl's handler and logger, once.

  The handler's sees every record under `app.run` (main.py); the logger's,
  orbax's absl records when a script or notebook never attached that
  handler.
  """
  for where in (logging.get_absl_handler(), logging.get_absl_logger()):
    if not any(isinstance(f, _OrbaxInfoFilter) for f in where.filters):
      where.addFilter(_OrbaxInfoFilter())


@contextlib.contextmanager
def without(level: int, prefix: str) -> Iterator[None]:
  """Drops absl log records of `level` that start with `prefix`."""

  def keep(record: std_logging.LogRecord) -> bool:
    return not (record.levelno == level and str(record.msg).startswith(prefix))

  logger = logging.get_absl_logger()
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


# Saves running, whether one failed on the file system, and directories
# whose reads a writer cut short.
_saves = {'running': 0, 'refused': False, 'cut': set()}


@contextlib.contextmanager
def quiet_if_refused() -> Iterator[None]:
  """Drops orbax's error logs of a save that the file system refuses.

  Each of orbax's threads that a full disk stops logs its traceback (a
  hundred lines and more), and tensorstore's callbacks then find their
  event loop closed (unraisable exceptions, printed): the UserError of the
  save says it all in one line. Orbax's errors during a save that succeeds
  or fails otherwise are logged as usual, after it. A thread of a refused
  save that outlives it (one item refused while another's still writes)
  finds the interpreter shutting down: its report is dropped too.
  """
  held = []

  def hold(record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.ERROR and '/orbax/' in record.pathname:
      held.append(record)
      return False
    return True

  if not hasattr(sys.unraisablehook, 'quiet_after_refused_saves'):
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
  logger = logging.get_absl_logger()
  logger.addFilter(hold)
  _saves['running'] += 1
  try:
    yield
  except UserError:
    if not _saves['refused']:
      logger.addFilter(_after_refused)
    _saves['refused'] = True
    held.clear()
    raise
  finally:
    _saves['running'] -= 1
    logger.removeFilter(hold)
    for record in held:
      logger.handle(record)


def _after_refused(record: std_logging.LogRecord) -> bool:
  """Drops what orbax's threads report on finding the interpreter shut down
  (after a refused save: the run is ending with its one-line error)."""
  error = record.exc_info[1] if record.exc_info else None
  return not (
    '/orbax/' in record.pathname
    and isinstance(error, RuntimeError)
    and str(error).startswith('cannot schedule new futures after')
  )


def _unraisable_hook(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """`sys.unraisablehook` without the closed event loops of orbax's saves
  and cut reads (which may come after the save that failed)."""

  def hook(unraisable) -> None:
    error = unraisable.exc_value
    if not (
      (_saves['running'] or _saves['refused'] or _saves['cut'])
      and isinstance(error, RuntimeError)
      and str(error) == 'Event loop is closed'
    ):
      previous(unraisable)

  hook.quiet_after_refused_saves = True
  return hook


def quiet_cut_reads(directory: str) -> None:
  """Drops the late reports of reads in `directory` that were cut short.

  A run that replaces its best checkpoint as another process reads it cuts
  that read short; the reader reads the new one (`load_best`). Then
  asyncio logs each of tensorstore's failed reads ("Task exception was
  never retrieved", a traceback each) and its callbacks find their event
  loop closed, as the tasks are collected.
  """

  def keep(record: std_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and directory in str(error))

  if directory not in _saves['cut']:
    _saves['cut'].add(directory)
    std_logging.getLogger('asyncio').addFilter(keep)
  if not hasattr(sys.unraisablehook, 'quiet_after_refused_saves'):
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
