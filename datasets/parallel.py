"""Parsing a file's chunks in worker processes, results in file order.

Parsing (pandas' reader and the key of every value) is most of the work of
preprocessing a text source, and it holds the GIL. `parsed` hands each chunk
of lines to a worker process and yields the chunks' results in file order,
so counting, encoding and the cache's bytes are the same as parsing in this
process. The lines are read here; a worker returns the parsed chunk (or
what the caller's `then` makes of it there: its keys' counts, its ids) and
its malformed lines, which are reported here, in order, as if this process
had parsed it.

The workers are new interpreters (`serve`) fed through pipes: they import
this package and the reader's modules, never this process's main program,
so any script may use them, guarded by `if __name__ == '__main__':` or not,
and no process that has imported JAX is forked. They run in a session of
their own (a terminal's Ctrl-C reaches this process, which stops them) and
exit as soon as their pipe from this process closes, however it ends. A
worker stopped by a signal (SIGSTOP) for `STOPPED_S` seconds of this
process's time is ended, and the build with it: this process would wait for
its next result for ever.
"""

import collections
from collections.abc import Callable, Iterable, Iterator
import contextlib
import functools
import io
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Any, NoReturn

from datasets import core

# 'auto' (config.dataset.parse_workers = -1) uses workers for files of this
# many bytes of text or more (about 550K Criteo lines, 6 chunks; a `.gz`
# file's text is 3-4 times its size): below, starting them (each imports
# pandas) costs about what they save.
AUTO_MIN_BYTES = 128 << 20
# ... and at most this many: each holds a parsed chunk (about 300 MB at
# 100,000 Criteo lines), and this process's own share of the work (reading
# lines, summing counts, writing) bounds the gain.
AUTO_MAX_WORKERS = 4
# What a caller may send to every worker with the reader (e.g. pass 2's
# vocabulary, to look keys up there), at most: each worker holds a copy.
MAX_SENT_BYTES = 64 << 20
# A worker stopped (state T: SIGSTOP, not a debugger's stop) this long is
# ended; counted in checks `_CHECK_S` apart, so that this process's own
# stops (a suspended job, resumed) do not count.
STOPPED_S = 60.0
_CHECK_S = 1.0
# How a worker starts: its replies go to a pipe of their own (the first
# argument), never stdout, where anything may print as Python starts; its
# `sys.path` is this process's (the next arguments, after where this
# package is) from its first import, so that it finds numpy and the
# reader's modules where this process did.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERVE = (
  'import sys; sys.path[:] = sys.argv[2:]; '
  'from datasets import parallel; parallel.serve(int(sys.argv[1]))'
)
# A message is its length then its bytes; an empty one ends a worker.
_LENGTH = struct.Struct('<Q')
_END = b''
# How a user stops the workers: main.py's config key, predict.py's flag.
_OFF = (
  'Set config.dataset.parse_workers=0 (predict.py: --parse_workers=0) to'
  ' parse in this process.'
)


def workers_for(setting: int, path: str) -> int:
  """Worker processes to parse `path` with (0: parse in this process).

  Args:
    setting: `config.dataset.parse_workers`: -1 one per core, at most
      `AUTO_MAX_WORKERS`, for `AUTO_MIN_BYTES` of text or more (0 below,
      and where `sys.executable` is not this Python, as in an application
      that embeds it); 0 none; n > 0 that many.
    path: the source file.
  """
  if setting >= 0:
    return setting
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 1
  if cores < 2 or _text_bytes(path) < AUTO_MIN_BYTES:
    return 0
  if not _startable(sys.executable):
    logging.info(
      'Parsing %s in this process: %r is not this Python, so no worker'
      ' process can start.',
      path,
      sys.executable,
    )
    return 0
  return min(cores, AUTO_MAX_WORKERS)


def _text_bytes(path: str) -> int:
  """The bytes of text in `path`: for a `.gz` file, what its trailer says
  (its last member's size, modulo 4 GiB), if more than its own size."""
  size = os.path.getsize(path)
  if path.endswith('.gz'):
    with contextlib.suppress(OSError), open(path, 'rb') as f:
      f.seek(-4, os.SEEK_END)
      size = max(size, int.from_bytes(f.read(4), 'little'))
  return size


@functools.cache
def _startable(executable: str) -> bool:
  """Whether `executable` runs as this Python (its version), as a worker
  must; an application that embeds Python may name itself there."""
  if not executable:
    return False
  try:
    said = subprocess.run(
      [executable, '-S', '-c', 'import sys; print(sys.hexversion)'],
      stdin=subprocess.DEVNULL,
      capture_output=True,
      timeout=60,
      check=False,
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return False
  return said.strip() == str(sys.hexversion).encode()


def picklable(reader: Any) -> bool:
  """Whether `reader` can travel to a worker process.

  It must pickle, and not by reference to the main program's names: the
  workers do not import the main program.
  """
  try:
    pickled = pickle.dumps(reader)
  except Exception:  # pylint: disable=broad-except
    return False
  return b'__main__' not in pickled


def parsed(
  reader: core.Reader,
  chunks: Iterable[tuple[list[bytes], int, Any]],
  where: Callable[[int], str],
  bad: core.BadLine,
  workers: int,
  then: Callable[[tuple], Any] | None = None,
) -> Iterator[tuple[Any, Any]]:
  """`reader.parse` of each chunk, in worker processes, in chunk order.

  Args:
    reader: the file's parser (`picklable`).
    chunks: `(lines, number of the first line, tag)`; the tag (e.g. the
      file position after the chunk) comes back with the chunk's result.
    where: `where(line number)` names a line in messages (picklable).
    bad: called here, in line order, for each malformed line of a chunk
      before the chunk is yielded; may raise.
    workers: processes, at least 1.
    then: if given (picklable), applied to each parsed chunk in its worker,
      e.g. to count or look up its keys there rather than here.

  Yields:
    `(then(reader.parse(...)), tag)` per chunk (without `then`, the parse).

  Raises:
    DataError: a worker process could not start, could not load the
      reader, died (e.g. killed for memory), stayed stopped `STOPPED_S`,
      or returned what cannot be loaded here.
    Whatever `reader.parse` or `then` raises in a worker, raised here.
  """
  setup = pickle.dumps((reader, where, then))
  pool, pending = [], collections.deque()
  watched = threading.Event()  # Set: the watch ends.
  threading.Thread(target=_watch, args=(pool, watched), daemon=True).start()
  try:
    for i, (lines, first, tag) in enumerate(chunks):
      if len(pool) < workers:  # Started as chunks come: a small file
        pool.append(_Worker())  # needs fewer. Watched (`_watch`) as it
        pool[-1].send(setup)  # takes its setup, which may fill the pipe.
      worker = pool[i % workers]  # Each parses its chunks in turn, so
      pending.append((worker, tag))  # results come back in order.
      # The lines as one string: 4x cheaper to send than a list of them.
      worker.send(pickle.dumps((b''.join(lines), first), protocol=5))
      del lines
      if len(pending) > workers:  # One chunk waits beside each worker's.
        yield _result(*pending.popleft(), bad)
    while pending:
      yield _result(*pending.popleft(), bad)
    for worker in pool:
      worker.finish()
  except BaseException:  # An error, a Ctrl-C or the caller stopping early.
    for worker in pool:
      worker.kill()
    raise
  finally:
    watched.set()


def _watch(pool: list['_Worker'], done: threading.Event) -> None:
  """Ends the workers of `pool` that stay stopped `STOPPED_S`, until `done`."""
  checks = collections.Counter()  # Of each worker, stopped in a row.
  while not done.wait(_CHECK_S):
    for worker in list(pool):
      if core.process_state(worker.process.pid) == 'T':
        checks[worker] += 1
        if checks[worker] * _CHECK_S >= STOPPED_S and not worker.stopped:
          worker.stopped = True  # Its reader's EOF then says why.
          worker.process.kill()
      else:
        checks.pop(worker, None)


def _result(worker, tag, bad):
  reply = worker.receive()
  try:
    result, error, issues = pickle.loads(reply)
  except Exception as e:  # pylint: disable=broad-except
    raise core.DataError(  # A class whose instances do not load again.
      'A worker process parsed the data into what this process cannot'
      f' load ({type(e).__name__}: {e}). {_OFF}'
    ) from None
  for where, reason in issues:
    bad(where, reason)
  if error is not None:
    raise error
  return result, tag


class _Worker:
  """A worker process (`serve`), its pipes and its stderr."""

  def __init__(self):
    self.stderr = self.replies = writes = None
    self.stopped = False  # Ended by `_watch`.
    try:
      self.stderr = tempfile.TemporaryFile()  # Read if the worker dies.
      reads, writes = os.pipe()
      self.replies = open(reads, 'rb')
      # Not `-c`'s path: the working directory (a `csv.py` there?), then
      # the environment's, which may lack what this process added.
      path = [_ROOT, *(p for p in sys.path if isinstance(p, str))]
      self.process = subprocess.Popen(
        [sys.executable, '-c', _SERVE, str(writes), *path],
        stdin=subprocess.PIPE,
        stdout=self.stderr,  # What prints there is not a reply.
        stderr=self.stderr,
        pass_fds=(writes,),
        start_new_session=True,
      )
    except OSError as e:  # No process to be had (`ulimit -u`, memory).
      for f in (self.stderr, self.replies):
        if f:
          f.close()
      raise core.DataError(
        f'Could not start the processes that parse the data ({e}). {_OFF}'
      ) from e
    finally:  # The worker's end: held here too, its death would be no EOF.
      if writes is not None:
        os.close(writes)

  def send(self, message: bytes) -> None:
    try:
      self.process.stdin.write(_LENGTH.pack(len(message)))
      self.process.stdin.write(message)
      self.process.stdin.flush()
    except BrokenPipeError:
      raise self._died() from None

  def receive(self) -> bytes:
    try:
      return _read(self.replies)
    except EOFError:
      raise self._died() from None

  def finish(self) -> None:
    """Ends the worker once it has sent every result."""
    try:
      self.send(_END)
    except core.DataError:  # It died since its last result: nothing lost.
      pass
    self.process.stdin.close()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      pass
    self.kill()

  def kill(self) -> None:
    """Ends the worker now, without waiting for the chunk it parses."""
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    for stream in (self.process.stdin, self.replies, self.stderr):
      try:
        stream.close()
      except OSError:  # A pipe whose worker is gone.
        pass

  def _died(self) -> core.DataError:
    try:
      code = self.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      code = None
    if self.stopped:
      return core.DataError(
        f'A worker process parsing the data (pid {self.process.pid}) stayed'
        f' stopped (SIGSTOP) for {STOPPED_S:.0f} s, so this run ended it;'
        f' resume (SIGCONT) a worker paused on purpose sooner. {_OFF}'
      )
    if code == -signal.SIGKILL:  # As the kernel does when memory runs out
      return core.DataError(  # (and its stderr does not say why).
        'A worker process parsing the data was killed (signal 9): out of'
        ' memory? Lower config.dataset.parse_workers (0 parses in'
        ' this process) or config.dataset.chunk_rows (predict.py:'
        ' --parse_workers, --chunk_rows).'
      )
    end = self.stderr.seek(0, os.SEEK_END)  # Its last line, e.g. the
    self.stderr.seek(max(0, end - 4096))  # end of a traceback.
    said = self.stderr.read().decode(errors='replace').strip().splitlines()
    last = f' (its last words: {said[-1]})' if said else ''
    how = f'exit status {code}' if code is not None else 'still running'
    if code is not None and code < 0:
      how = f'signal {-code}'
    return core.DataError(
      f'A worker process parsing the data died ({how}){last}. {_OFF}'
    )


def _read(stream) -> bytes:
  """One message of `stream`; EOFError at its end."""
  length = stream.read(_LENGTH.size)
  if len(length) < _LENGTH.size:
    raise EOFError
  (size,) = _LENGTH.unpack(length)
  message = stream.read(size)
  if len(message) < size:
    raise EOFError
  return message


def _write(stream, message: bytes) -> None:
  stream.write(_LENGTH.pack(len(message)))
  stream.write(message)
  stream.flush()


def serve(replies: int) -> None:
  """A worker process: parses the chunks that come on stdin, in turn.

  Each reply, `(result, exception, malformed lines)`, goes to the file
  descriptor `replies` (a pipe to the parent). A thread reads stdin at all
  times: the parent's next chunk never waits for this process's reply to
  be read (which would deadlock the two), and this process exits at once
  when stdin closes before the empty message that ends the work, as it
  does when the parent is gone.
  """
  replies = os.fdopen(replies, 'wb')  # pylint: disable=consider-using-with
  inbox = queue.SimpleQueue()

  def read():
    try:
      while (message := _read(sys.stdin.buffer)) != _END:
        inbox.put(message)
    except EOFError:
      os._exit(1)  # pylint: disable=protected-access
    except BaseException as e:  # pylint: disable=broad-except
      _end(e)  # No memory for a chunk: none would read stdin, a hang.
    inbox.put(_END)

  threading.Thread(target=read, daemon=True).start()
  try:
    try:
      reader, where, then = pickle.loads(inbox.get())
      failed = None
    except Exception as e:  # pylint: disable=broad-except
      failed = core.DataError(
        f'A worker process could not load the reader of the data ({e}). {_OFF}'
      )
    while (message := inbox.get()) != _END:
      text, first = pickle.loads(message)
      lines = io.BytesIO(text).readlines()  # As the parent read them: at \n.
      del message, text
      issues, error, result = [], failed, None
      if not failed:
        try:
          result = reader.parse(lines, first, where, _collect(issues))
          if then is not None:
            result = then(result)
        except Exception as e:  # pylint: disable=broad-except
          error = e
      del lines
      try:
        reply = pickle.dumps((result, error, issues), protocol=5)
        if error is not None:  # It must load in the parent too: not so
          pickle.loads(reply)  # an error whose __init__ takes other args.
      except Exception as e:  # pylint: disable=broad-except
        what = error if error is not None else e  # Of the result, else.
        error = core.DataError(f'{type(what).__name__}: {what}')
        reply = pickle.dumps((None, error, issues), protocol=5)
      _write(replies, reply)
  except BaseException as e:  # pylint: disable=broad-except
    _end(e)  # A reader's sys.exit, no memory to load a chunk, ...


def _end(error: BaseException) -> NoReturn:
  """Ends this worker now, its last words `error` on stderr."""
  # Not by raising: the interpreter's exit would abort (SIGABRT, the error
  # unsaid) while `serve`'s thread that reads stdin waits there.
  traceback.print_exception(error)
  os._exit(1)  # pylint: disable=protected-access


def _collect(issues: list) -> core.BadLine:
  return lambda where, reason: issues.append((where, reason))
