"""Parsing a file's chunks in worker processes, results in file order.

Parsing (pandas' reader and the key of every value) is most of the work of
preprocessing a text source, and it holds the GIL. `parsed` hands each chunk
of lines to a pool of worker processes and yields the chunks' results in
file order, so counting, encoding and the cache's bytes are the same as
parsing in this process. The lines are read here; a worker returns the
parsed chunk and its malformed lines, which are reported here, in order,
as if this process had parsed it.

The workers come from a fork server (they never fork this process, whose
JAX threads may hold locks), ignore Ctrl-C (this process stops them) and
end when this process ends, however it ends.
"""

import collections
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import time
from typing import Any

from datasets import core

# 'auto' (config.dataset.parse_workers = -1) uses workers for files of this
# many bytes or more (about 1.1M Criteo lines, 11 chunks): below, starting
# them (the fork server imports main.py's modules) costs about what they
# save.
AUTO_MIN_BYTES = 256 << 20
# ... and at most this many: each holds a parsed chunk (about 300 MB at
# 100,000 Criteo lines), and this process's own share of the work (reading,
# counting, encoding) bounds the gain.
AUTO_MAX_WORKERS = 4
# This repository and its programs, which do their work under `if __name__
# == '__main__':` (files of its directories, or these files).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRAMS = (
  *('benchmarks', 'tools', 'tests'),
  *('main.py', 'predict.py', 'export.py'),
)
# Modules the fork server imports once, so that each worker starts parsing
# at once; '__main__' (main.py) too, or each worker would run its imports
# again (multiprocessing's start of a process that is not forked).
_PRELOAD = ('__main__', 'pandas', 'datasets.text')


def workers_for(setting: int, path: str) -> int:
  """Worker processes to parse `path` with (0: parse in this process).

  Args:
    setting: `config.dataset.parse_workers`: -1 one per core, at most
      `AUTO_MAX_WORKERS`, for files of `AUTO_MIN_BYTES` or more (0 below)
      when `main_is_importable()`; 0 none; n > 0 that many.
    path: the source file.
  """
  if setting >= 0:
    return setting
  if not main_is_importable():
    return 0
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 1
  if cores < 2 or os.path.getsize(path) < AUTO_MIN_BYTES:
    return 0
  return min(cores, AUTO_MAX_WORKERS)


def main_is_importable() -> bool:
  """Whether worker processes may import this program's main module.

  They do (multiprocessing starts them so), and a main module that
  preprocesses at its top level, not under `if __name__ == '__main__':`,
  would then build the cache again in the fork server, which waits for
  this process's lock while this process waits for it. True without a
  main module file (an interpreter, `python -c`, a notebook), for a
  package's `__main__` (pytest's; multiprocessing does not import those)
  and for this repository's programs; False for any other script.
  """
  main = sys.modules.get('__main__')
  name = getattr(getattr(main, '__spec__', None), 'name', None)
  if name is not None:  # Run with -m.
    ours = name.split('.')[0] in _PROGRAMS
    return ours or name == '__main__' or name.endswith('.__main__')
  path = getattr(main, '__file__', None)
  if path is None:
    return True
  path = os.path.relpath(os.path.abspath(path), _ROOT)
  return path.split(os.sep)[0] in _PROGRAMS


def refuse_while_starting() -> None:
  """Raises DataError in a worker process that imports the main program.

  A script without `if __name__ == '__main__':` that loads its data with
  workers runs again there at its start, and would wait for the build lock
  that its parent holds while the parent waits for it.
  """
  if getattr(multiprocessing.current_process(), '_inheriting', False):
    raise core.DataError(
      'config.dataset.parse_workers: the worker processes that parse the'
      ' data import the main program, and this one loads its data as it is'
      " imported. Put its work under `if __name__ == '__main__':`, or set"
      ' parse_workers=0.'
    )


def picklable(reader: Any) -> bool:
  """Whether `reader` can travel to a worker process."""
  try:
    pickle.dumps(reader)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def parsed(
  reader: core.Reader,
  chunks: Iterable[tuple[list[bytes], int, Any]],
  where: Callable[[int], str],
  bad: core.BadLine,
  workers: int,
) -> Iterator[tuple[tuple, Any]]:
  """`reader.parse` of each chunk, in worker processes, in chunk order.

  Args:
    reader: the file's parser (picklable, `picklable`).
    chunks: `(lines, number of the first line, tag)`; the tag (e.g. the
      file position after the chunk) comes back with the chunk's result.
    where: `where(line number)` names a line in messages (picklable).
    bad: called here, in line order, for each malformed line of a chunk
      before the chunk is yielded; may raise.
    workers: processes, at least 1.

  Yields:
    `(reader.parse(...), tag)` per chunk.

  Raises:
    DataError: a worker process could not start, or died (e.g. killed for
      memory).
  """
  executor = concurrent.futures.ProcessPoolExecutor(
    workers,
    mp_context=_context(),
    initializer=_start_worker,
    initargs=(os.getpid(),),
  )
  pending = collections.deque()
  try:
    for lines, first, tag in chunks:
      try:
        future = executor.submit(_parse, reader, lines, first, where)
      except OSError as e:  # No process to be had (`ulimit -u`, memory).
        raise core.DataError(
          f'Could not start the processes that parse the data ({e}). Set'
          ' config.dataset.parse_workers=0 to parse in this process.'
        ) from e
      pending.append((future, tag))
      del lines
      if len(pending) > workers:  # One chunk waits beside each worker's.
        yield _result(*pending.popleft(), bad)
    while pending:
      yield _result(*pending.popleft(), bad)
  except BaseException:  # An error, a Ctrl-C or the caller stopping early.
    _stop(executor)
    raise
  executor.shutdown(wait=True)


def _result(future, tag, bad):
  try:
    result, issues = future.result()
  except concurrent.futures.process.BrokenProcessPool as e:
    raise core.DataError(
      'A worker process parsing the data died: killed for memory (lower'
      ' config.dataset.parse_workers, 0 parses in this process, or'
      ' config.dataset.chunk_rows), or its import of the main program'
      ' failed (its error is above).'
    ) from e
  for where, reason in issues:
    bad(where, reason)
  return result, tag


def _stop(executor: concurrent.futures.ProcessPoolExecutor) -> None:
  """Ends the workers now, without waiting for the chunks they parse."""
  processes = list((getattr(executor, '_processes', None) or {}).values())
  executor.shutdown(wait=False, cancel_futures=True)
  for process in processes:
    if process.is_alive():
      process.kill()
  for process in processes:
    process.join(timeout=5)


def _context():
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload(list(_PRELOAD))
  return context


def _start_worker(parent: int) -> None:
  """Ignores Ctrl-C (the parent stops the workers) and exits when the
  parent is gone: a parent killed outright cannot stop its workers, and a
  worker waiting for chunks would wait forever."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  server = os.getppid()  # The fork server: it exits with the parent.
  host = socket.gethostname()

  def watch():
    while True:
      time.sleep(0.5)
      if os.getppid() != server or core.process_gone(host, parent):
        os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def _parse(reader, lines, first, where):
  """In a worker: the parsed chunk and its malformed lines, in order."""
  issues = []
  result = reader.parse(lines, first, where, lambda *i: issues.append(i))
  return result, issues
