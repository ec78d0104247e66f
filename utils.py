"""Host-side utilities shared by training and preprocessing.

One progress bar (training steps and preprocessing passes alike), a
background prefetcher, file opening that understands `.gz`, the persistent
compilation cache, and the error type of problems the user can fix (among
them a write that a full disk or a permission refuses: `writing`); the
entry points print them (`entry.run_main`).
"""

from collections.abc import Iterator
import contextlib
import errno
import gc
import glob
import gzip
import os
import queue
import re
import signal
import sys
import threading
import time
from typing import IO, Any
import zlib

from absl import logging


class ProgressBar:
  """One line of progress on a terminal: bar, amount done, rate, caption.

  Used for training epochs (`done` in steps, the rate in examples/s) and for
  preprocessing passes (`done` in bytes shown as MiB, the rate in lines/s).
  Off the terminal (a log file, a batch job) it logs the same numbers once
  every `LOG_EVERY` seconds instead, so that a pass or an epoch of many
  minutes is not silent; `close` logs one summary line when `log_summary`
  is set.
  """

  # Seconds between two progress lines in the log, off the terminal.
  LOG_EVERY = 60.0

  def __init__(
    self,
    desc: str,
    total: int,
    rate_unit: str,
    *,
    scale: int = 1,
    scale_unit: str = '',
    enabled: bool = True,
    interval: float = 0.0,
    log_summary: bool = False,
  ):
    """Starts the clock.

    Args:
      desc: text before the bar (`'epoch 3'`, `'count train.txt'`).
      total: the amount of work, in the unit of `update`'s `done`.
      rate_unit: what `update`'s `count` counts (`'ex'`, `'lines'`).
      scale: `done` and `total` are shown divided by this (2**20: MiB).
      scale_unit: the unit shown after them (`'MiB'`).
      enabled: show progress at all (e.g. only on process 0).
      interval: minimum seconds between redraws.
      log_summary: log `desc`, the count and the rate on `close`.
    """
    self.desc, self.total = desc, max(total, 1)
    self.rate_unit, self.scale, self.scale_unit = rate_unit, scale, scale_unit
    self.enabled = enabled and sys.stderr.isatty()  # Draws a bar.
    self.logs = enabled and not self.enabled
    self.interval, self.log_summary = interval, log_summary
    self.start = self.last = time.perf_counter()
    self.count = 0

  def due(self) -> bool:
    """Whether `update` would now draw the bar, or log a line."""
    wait = self.interval if self.enabled else self.LOG_EVERY
    return (self.enabled or self.logs) and (
      time.perf_counter() - self.last >= wait
    )

  def update(self, done: int, count: int, caption: str = '') -> None:
    """Redraws with `done` of `total` and `count` items so far in total."""
    self.count = count
    if not self.due():
      return
    now = self.last = time.perf_counter()
    rate = count / max(now - self.start, 1e-9)
    filled = int(30 * min(done / self.total, 1.0))
    amount = (
      f'{done / self.scale:,.0f}/{self.total / self.scale:,.0f}'
      f'{" " + self.scale_unit if self.scale_unit else ""}'
    )
    line = f'{amount} {rate:,.0f} {self.rate_unit}/s'
    line += f' {caption}' if caption else ''
    if self.logs:
      percent = 100 * min(done / self.total, 1.0)
      logging.info('%s: %.0f%%, %s', self.desc, percent, line)
      return
    bar = '#' * filled + '.' * (30 - filled)
    sys.stderr.write(f'\r{self.desc} [{bar}] {line}')
    sys.stderr.flush()

  def close(self) -> None:
    elapsed = time.perf_counter() - self.start
    if self.enabled:
      sys.stderr.write('\n')
    if self.log_summary:
      logging.info(
        '%s: %d %s in %.1f s (%.0f %s/s)',
        self.desc,
        self.count,
        self.rate_unit,
        elapsed,
        self.count / max(elapsed, 1e-9),
        self.rate_unit,
      )


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
  """Runs `iterator` in a background thread, `size` items ahead.

  Gathering rows (from a memory map, for large data) then overlaps with the
  device step instead of stalling it. An exception in the thread is raised
  in the consumer. A consumer that stops early (an error, or a caller that
  took the first items) stops the thread, which closes `iterator`.
  """
  items = queue.Queue(maxsize=size)
  end = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        items.put(item)
        if stop.is_set():
          return
    except BaseException as e:  # Re-raised in the consumer.
      items.put(e)
    else:
      items.put(end)
    finally:
      if hasattr(iterator, 'close'):  # A generator's files close.
        iterator.close()

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while (item := items.get()) is not end:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:  # Room for the one put the thread may still make before it stops.
    stop.set()
    with contextlib.suppress(queue.Empty):
      while True:
        items.get_nowait()


def open_binary(path: str) -> tuple[IO[bytes], IO[bytes]]:
  """Opens `path` (gzip if it ends in `.gz`) for reading bytes.

  Returns:
    (the file to read, the raw file whose `tell()` is the progress in bytes
    of the file on disk). The caller closes both.
  """
  raw = open(path, 'rb')
  if path.endswith('.gz'):
    return gzip.GzipFile(fileobj=raw, mode='rb'), raw
  return raw, raw


def open_text(path: str) -> IO[str]:
  """Opens `path` (gzip if it ends in `.gz`) as UTF-8 text."""
  if path.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8', errors='replace')
  return open(path, encoding='utf-8', errors='replace')


# The compilation cache directory that `enable_compilation_cache` set last.
_own_cache_dir = [None]


def enable_compilation_cache(cache_dir: str) -> None:
  """Keeps every compiled program in `cache_dir/jax` for the next runs.

  JAX's persistent compilation cache, for programs of any size and compile
  time: a run on small data spends most of its time compiling, and a
  restart or a second run with the same shapes then loads the programs
  instead. A directory set in `JAX_COMPILATION_CACHE_DIR` is used instead
  of `cache_dir/jax`, and so is one set with `jax.config.update` where the
  variable is unset (an empty one asks for `cache_dir/jax`); a threshold
  set in its own environment variable is kept;
  `JAX_ENABLE_COMPILATION_CACHE=false` disables the cache. The settings are
  JAX's, for the rest of the process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top

  for name, value in (
    ('jax_persistent_cache_min_entry_size_bytes', -1),
    ('jax_persistent_cache_min_compile_time_secs', 0.0),
  ):
    if name.upper() not in os.environ:
      jax.config.update(name, value)
  # With the persistent cache JAX turns on XLA's GPU autotuning cache, in a
  # directory under it, on every platform: that path enters each program's
  # compile options and so each entry's key, and a cache copied or moved
  # elsewhere (a CI cache, an image) misses entirely. Off GPUs it caches
  # nothing, so it is left off there.
  xla_caches = 'jax_persistent_cache_enable_xla_caches'
  if xla_caches.upper() not in os.environ and jax.default_backend() != 'gpu':
    jax.config.update(xla_caches, None)
  variable = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  current = jax.config.jax_compilation_cache_dir
  if variable or (
    variable is None and current not in (None, '', _own_cache_dir[0])
  ):
    return  # The user's: in the variable, or set by a caller.
  directory = os.path.abspath(os.path.join(cache_dir, 'jax'))
  if current == directory:
    return
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:  # The data's own cache reports an unusable cache_dir.
    logging.warning('No compilation cache in %s: %s', directory, e)
    return
  drop_torn_programs(directory)
  jax.config.update('jax_compilation_cache_dir', directory)
  _own_cache_dir[0] = directory  # Replaced by a later call's, if another.
  cc.reset_cache()  # Another directory may already be in use.


def init_compiler_options() -> dict[str, str | bool] | None:
  """XLA options of a run's `jit(init)` (`train.state_initializer`).

  On CPU, with jaxlib before 0.11.1 (later ones no longer have the option),
  init compiles without XLA:CPU's fusion emitters, at LLVM's level 2 as the
  train and eval programs: it runs once, beside the train program's
  compilation in a first run, and compiles in about two thirds of the CPU
  time, with the same bits (benchmarks/README.md, "A first run's
  compilations"). An option that `XLA_FLAGS` names is left to it (the tests
  set both). None: XLA's defaults.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib.version  # pylint: disable=g-import-not-at-top

  version = tuple(map(int, re.findall(r'\d+', jaxlib.version.__version__)))
  if jax.default_backend() != 'cpu' or version[:3] >= (0, 11, 1):
    return None
  options = {
    'xla_backend_optimization_level': '2',
    'xla_cpu_use_fusion_emitters': False,
  }
  flags = os.environ.get('XLA_FLAGS', '')
  return {k: v for k, v in options.items() if f'--{k}=' not in flags} or None


# Stamp file of `drop_torn_programs`: entries older than it were checked.
CHECKED_STAMP = '.checked'


def drop_torn_programs(directory: str) -> None:
  """Deletes the entries of JAX's compilation cache `directory` cut short.

  JAX writes an entry in place and never replaces one that exists: an
  entry cut short (a full disk, `ulimit -f`, a kill) failed to load with
  a warning, and compiled again, in every later run. Each entry written
  since the last check (the stamp's time) is decompressed once here.
  """
  stamp = os.path.join(directory, CHECKED_STAMP)
  started = time.time_ns()
  try:
    since = os.stat(stamp).st_mtime_ns
  except OSError:
    since = 0
  with contextlib.suppress(OSError):
    for entry in os.scandir(directory):
      if not entry.name.endswith('-cache'):
        continue
      try:
        if entry.stat().st_mtime_ns < since:
          continue
        with open(entry.path, 'rb') as f:
          if _whole(f.read()) is not False:
            continue
      except OSError:
        continue
      logging.warning(
        'Removing %s: a compiled program cut short (a full disk?)', entry.path
      )
      with contextlib.suppress(OSError):
        os.remove(entry.path)
    with open(stamp, 'wb'):
      pass
    os.utime(stamp, ns=(started, started))


def _whole(blob: bytes) -> bool | None:
  """Whether a compilation cache entry decompresses whole; None where its
  format is not known here (it is then kept).

  JAX compresses an entry with zstd where a zstd module is installed, else
  with zlib; each format is told by its own header, and no public JAX API
  reads an entry. Neither format fits a program in fewer than 8 bytes.
  """
  if len(blob) < 8:
    return False
  if blob[:4] == b'\x28\xb5\x2f\xfd':  # A zstd frame.
    try:
      from compression import zstd  # pylint: disable=g-import-not-at-top

      decompress = zstd.decompress
    except ImportError:  # Before Python 3.14.
      try:
        import zstandard  # pylint: disable=g-import-not-at-top
      except ImportError:
        return None  # Not JAX's either, then.
      decompress = zstandard.ZstdDecompressor().decompress
  elif blob[0] & 0x0F == 8 and int.from_bytes(blob[:2], 'big') % 31 == 0:
    decompress = zlib.decompress  # A zlib stream's header.
  else:
    return None
  try:
    decompress(blob)
  except Exception:  # pylint: disable=broad-except
    return False  # Each module has its own error; all mean cut short.
  return True


def resent_from_gc(signum: int, frame: Any) -> bool:
  """Whether a signal handler's `frame` runs in a gc callback; if so, the
  signal `signum` is sent again 10 ms later.

  CPython drops an exception raised in a garbage collector's callback
  (`Exception ignored in: <function _xla_gc_callback>`), and JAX's runs at
  every collection: a Ctrl-C during a long one went unheard.
  """
  callbacks = {getattr(c, '__code__', None) for c in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks:
      again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
      again.daemon = True  # A process on its way out is not held.
      again.start()
      return True
    frame = frame.f_back
  return False


def _interrupt(signum: int, frame: Any) -> None:
  if not resent_from_gc(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_heard() -> Iterator[None]:
  """Within: a Ctrl-C raises KeyboardInterrupt, even sent in a gc callback.

  For the library's calls (the programs have `entry.keep_interrupts`).
  Python's own SIGINT handler is replaced for the call and put back after;
  a handler of the caller's (or none, SIGINT ignored), a call from a thread
  other than the main one, and a call within another, are left as they are.
  A generator that uses it and is closed on another thread leaves it on
  (it acts as Python's, but for a gc callback's Ctrl-C).
  """
  if (
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
  ):
    yield
    return
  signal.signal(signal.SIGINT, _interrupt)
  try:
    yield
  finally:  # A generator may end on another thread: the handler stays.
    if (
      threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGINT) is _interrupt
    ):
      signal.signal(signal.SIGINT, signal.default_int_handler)


class UserError(Exception):
  """A problem the user can fix: config, data, workdir or permissions.

  The message is one paragraph that names the file (and line), the config
  key or the path, and says what to do. `entry.run_main` prints it as one line,
  without a traceback; any other exception is a bug and keeps its traceback.
  """


# What the file system says when a disk is full, a file outgrows the size
# limit (`ulimit -f`, or a file system's largest file) or a directory is
# read-only; tensorstore reports these in the text of its own errors.
_OS_FAULTS = (
  errno.ENOSPC,
  errno.EDQUOT,
  errno.EFBIG,
  errno.EACCES,
  errno.EPERM,
  errno.EROFS,
)


def os_problem(error: BaseException | None) -> str | None:
  """The file system fault in `error`'s chain of causes, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      if error.errno is None:  # numpy's short write: "10 requested and 5 ..."
        return f'{error} (a short write: is the disk full?)'
      name = errno.errorcode.get(error.errno, str(error.errno))
      where = f', {error.filename}' if error.filename else ''
      return f'{error.strerror or error} ({name}{where}){_hint(error.errno)}'
    for code in _OS_FAULTS:
      if os.strerror(code) in str(error):
        return (
          f'{os.strerror(code)} ({errno.errorcode[code]}): {error}'
          + _hint(code)
        )
    error = error.__cause__ or error.__context__
  return None


def _hint(code: int) -> str:
  """What else to look at for a fault that is not the disk's space."""
  if code != errno.EFBIG:
    return ''
  return (
    '; a file outgrew the size limit of one file (`ulimit -f`, or the'
    ' largest file the file system holds): raise it or write elsewhere'
  )


@contextlib.contextmanager
def replace_file(path: str, mode: str = 'w') -> Iterator[IO]:
  """Opens `path + '.tmp'` to write; on success renames it over `path`.

  A failure inside (an OSError, an interrupt) removes the copy and leaves
  `path` as it was.
  """
  temporary = path + '.tmp'
  try:
    with open(temporary, mode) as f:
      yield f
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


@contextlib.contextmanager
def writing(
  what: str, directory: str, temporary: str | None = None
) -> Iterator[None]:
  """Turns an OSError inside into a UserError naming `what` and `directory`.

  For files written into `directory` through temporary copies (the glob
  `temporary`, if given), each then renamed over its file: the copies that
  a failure leaves there are removed, and the files already written stay
  as they were.
  """
  try:
    yield
  except OSError as e:
    if temporary:
      for path in glob.glob(os.path.join(glob.escape(directory), temporary)):
        with contextlib.suppress(OSError):
          os.remove(path)
    raise UserError(
      f'Cannot write {what} in {directory}: {os_problem(e)}. Free space or'
      ' restore write access there, then start the run again: it resumes'
      ' from the last checkpoint saved.'
    ) from e
