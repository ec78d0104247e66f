"""Host-side utilities shared by training and preprocessing.

One progress bar (training steps and preprocessing passes alike), a
background prefetcher, file opening that understands `.gz`, the persistent
compilation cache, and the error type of problems the user can fix (among
them a write that a full disk or a permission refuses: `writing`), with
the entry-point wrapper that prints them.
"""

from collections.abc import Callable, Iterator
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
import traceback
from typing import IO, Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections.config_flags import config_flags as config_flags_lib


class ProgressBar:
  """One line of progress on a terminal: bar, amount done, rate, caption.

  Used for training epochs (`done` in steps, the rate in examples/s) and for
  preprocessing passes (`done` in bytes shown as MiB, the rate in lines/s).
  Off the terminal it draws nothing; `close` logs one summary line when
  `log_summary` is set.
  """

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
      enabled: draw at all (e.g. only on process 0).
      interval: minimum seconds between redraws.
      log_summary: log `desc`, the count and the rate on `close`.
    """
    self.desc, self.total = desc, max(total, 1)
    self.rate_unit, self.scale, self.scale_unit = rate_unit, scale, scale_unit
    self.enabled = enabled and sys.stderr.isatty()
    self.interval, self.log_summary = interval, log_summary
    self.start = self.last = time.perf_counter()
    self.count = 0

  def update(self, done: int, count: int, caption: str = '') -> None:
    """Redraws with `done` of `total` and `count` items so far in total."""
    self.count = count
    now = time.perf_counter()
    if not self.enabled or now - self.last < self.interval:
      return
    self.last = now
    rate = count / max(now - self.start, 1e-9)
    filled = int(30 * min(done / self.total, 1.0))
    amount = (
      f'{done / self.scale:,.0f}/{self.total / self.scale:,.0f}'
      f'{" " + self.scale_unit if self.scale_unit else ""}'
    )
    sys.stderr.write(
      f'\r{self.desc} [{"#" * filled}{"." * (30 - filled)}] {amount}'
      f' {rate:,.0f} {self.rate_unit}/s{" " + caption if caption else ""}'
    )
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
  in the consumer.
  """
  items = queue.Queue(maxsize=size)
  end = object()

  def produce():
    try:
      for item in iterator:
        items.put(item)
    except BaseException as e:  # Re-raised in the consumer.
      items.put(e)
    else:
      items.put(end)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  while (item := items.get()) is not end:
    if isinstance(item, BaseException):
      raise item
    yield item


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


def enable_compilation_cache(cache_dir: str) -> None:
  """Keeps every compiled program in `cache_dir/jax` for the next runs.

  JAX's persistent compilation cache, for programs of any size and compile
  time: a run on small data spends most of its time compiling, and a
  restart or a second run with the same shapes then loads the programs
  instead. A directory set in `JAX_COMPILATION_CACHE_DIR` is used instead
  of `cache_dir/jax`, and a threshold set in its own environment variable
  is kept; `JAX_ENABLE_COMPILATION_CACHE=false` disables the cache.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top

  for name, value in (
    ('jax_persistent_cache_min_entry_size_bytes', -1),
    ('jax_persistent_cache_min_compile_time_secs', 0.0),
  ):
    if name.upper() not in os.environ:
      jax.config.update(name, value)
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  directory = os.path.abspath(os.path.join(cache_dir, 'jax'))
  if jax.config.jax_compilation_cache_dir == directory:
    return
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:  # The data's own cache reports an unusable cache_dir.
    logging.warning('No compilation cache in %s: %s', directory, e)
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  cc.reset_cache()  # Another directory may already be in use.


class UserError(Exception):
  """A problem the user can fix: config, data, workdir or permissions.

  The message is one paragraph that names the file (and line), the config
  key or the path, and says what to do. `run_main` prints it as one line,
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


# Set (to anything but 0) to see the traceback of a UserError.
TRACEBACK_ENV = 'FLAX_FM_TRACEBACK'


def run_main(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)`, with a `UserError` printed as one line, status 2.

  So are a flag or config file that `_parse_flags` cannot read, and running
  out of memory (what to lower). `--verbosity=1` (or higher) or
  `$FLAX_FM_TRACEBACK` also prints a UserError's traceback. Other
  exceptions reach absl unchanged: traceback, status 1.
  """

  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      # XLA's out of memory: jax.errors.JaxRuntimeError, RESOURCE_EXHAUSTED.
      xla_oom = str(e).startswith('RESOURCE_EXHAUSTED')
      if not isinstance(e, (UserError, MemoryError)) and not xla_oom:
        raise
      verbose = os.environ.get(TRACEBACK_ENV, '') not in ('', '0')
      if verbose or flags.FLAGS.verbosity >= 1:
        traceback.print_exc()
      if not isinstance(e, UserError):
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        fail(
          f'Out of memory ({reason}). Lower'
          ' config.dataset.chunk_rows (while preprocessing), config.batch_size'
          ' or --batch_size, make the tables smaller (a larger'
          ' config.dataset.min_count), or run where more memory is free.'
        )
      fail(str(e))

  keep_interrupts()
  app.run(guarded, flags_parser=_parse_flags)


def keep_interrupts() -> None:
  """Makes Ctrl-C stop the program even when it lands in a gc callback.

  CPython drops an exception raised in a garbage collector's callback
  (`Exception ignored in: <function _xla_gc_callback>`), and JAX's runs at
  every collection: about one Ctrl-C in twelve during preprocessing went
  unheard and the run trained on. A SIGINT that arrives there is sent
  again a moment later instead. Python's own handler only is replaced.
  """
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
  callbacks = {getattr(c, '__code__', None) for c in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks:
      threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
      return
    frame = frame.f_back
  raise KeyboardInterrupt


def fail(message: str) -> NoReturn:
  """Prints `<program>: error: <message>` as one line and exits with 2."""
  logging.flush()
  sys.stdout.flush()
  program = os.path.basename(sys.argv[0])
  sys.stderr.write(f'{program}: error: {message}\n')
  sys.stderr.flush()
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or override as one line.

  absl prints a malformed flag in two lines with Python's words for the
  value and exits with 1 (here: the type a config key takes); ml_collections
  lets through as tracebacks `--config.<key>` for a key the config lacks,
  the config file's own exception (here: `file:line`), a file without
  get_config() or one returning no ConfigDict. Returns the other arguments.
  """
  if (message := _config_file_unreadable(argv)) is not None:
    fail(message)  # ml_collections would raise at the config's first use.
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:
    # A config file's ValueError or TypeError reaches us as a flag error,
    # its traceback flattened into the message; the first error is the one.
    chain = [e]
    while cause := chain[-1].__cause__ or chain[-1].__context__:
      if cause in chain:
        break
      chain.append(cause)
    fail(_config_file_error(argv, chain[-1]) or _flag_error(argv, e))
  except Exception as e:  # pylint: disable=broad-except
    missing = "attribute 'get_config'" in str(e) and 'has no get_config()'
    message = _override_error(argv, e) or _config_file_error(argv, e)
    if not (message := message or _not_a_config(argv, missing or '')):
      raise
    fail(message)
  if message := _not_a_config(argv):
    fail(message)
  return args


# What a config key of each type takes on the command line (bool first: a
# bool is an int; ConfigDict holds a tuple as a list).
_TAKES = (
  (bool, 'True or False'),
  (int, 'an integer'),
  (float, 'a number'),
  ((tuple, list), 'a tuple, quoted for the shell'),
)


def _flag_error(argv: list[str], error: flags.Error) -> str:
  """absl's message for a flag it cannot parse, as one line."""
  message = ' '.join(str(error).split()).replace(' ?', '?')
  name = message.partition('=')[0].removeprefix('flag --')
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  if '.' in name and name in flags.FLAGS and values:
    current = flags.FLAGS[name].value
    for kind, takes in _TAKES:
      if isinstance(current, kind):
        if isinstance(current, list):
          current = f"'{tuple(current)}'"
        return (
          f'--{name}={values[-1]}: {name} takes {takes}, e.g.'
          f' {current}; {values[-1]!r} is not one.'
        )
  end = '' if message.endswith(('.', '?')) else '.'
  return f'{message}{end} Pass --helpshort to see the flags.'


def _config_files(argv: list[str]) -> list[tuple[str, str]]:
  """(flag, path) of each config-file flag on the command line."""
  found = []
  for i, arg in enumerate(argv[1:], 1):
    name, equals, value = arg.lstrip('-').partition('=')
    if not arg.startswith('-') or name not in flags.FLAGS:
      continue
    parser = flags.FLAGS[name].parser
    if not isinstance(parser, config_flags_lib.ConfigFileFlagParser):
      continue
    if not equals:  # `--config path`
      value = argv[i + 1] if i + 1 < len(argv) else ''
    if path := value.split(':', 1)[0]:  # `path:arg` passes arg to the file.
      found.append((name, path))
  return found


def _config_file_unreadable(argv: list[str]) -> str | None:
  """The message for a config-file flag whose file cannot be read, or None."""
  for name, path in _config_files(argv):
    if not os.path.isfile(path):
      why = 'does not exist'
    elif not os.access(path, os.R_OK):
      why = 'cannot be read'
    else:
      continue
    return (
      f'--{name}: {path} {why}. Give a config file, e.g.'
      f' --{name}=configs/fm.py (relative to the current directory).'
    )
  return None


def _not_a_config(argv: list[str], what: str = '') -> str | None:
  """The message for a config file with no ConfigDict from get_config()."""
  for name, path in _config_files(argv):
    flag = flags.FLAGS[name]
    if flag.present and not isinstance(flag.value, ml_collections.ConfigDict):
      what = what or f'gave {flag.value!r} from get_config()'
    if what:
      return (
        f'--{name}: {path} {what}; a'
        ' config file defines get_config(arg=None) returning an'
        ' ml_collections.ConfigDict, e.g. configs/fm.py.'
      )
  return None


def _missing_key(error: BaseException) -> tuple[str, str] | None:
  """(key, hint) of ml_collections' error for a missing key, else None."""
  while (
    isinstance(error, (AttributeError, KeyError))
    and error.args
    and isinstance(error.args[0], BaseException)
  ):
    error = error.args[0]  # ml_collections wraps the KeyError.
  if not isinstance(error, KeyError) or not error.args:
    return None
  first, _, hint = str(error.args[0]).partition('\n')
  hint = f' {hint.strip()}' if hint.strip() else ''
  return first.strip('\'"'), hint


def _override_error(argv: list[str], error: Exception) -> str | None:
  """The message for an override of a missing key, or None if it is not."""
  if (missing := _missing_key(error)) is None:
    return None
  key, hint = missing
  if found := re.search(r'does not exist .*lookup: ([\w.]+)', key):
    path = found.group(1)  # A key under a value: `model.embed_dim.x`.
    return (
      f'--config.{path}: config.{path.rsplit(".", 1)[0]} is a value, not a'
      ' group of keys.'
    )
  for arg in argv[1:]:
    name = arg.split('=', 1)[0]
    parts = name[2:].split('.')
    if name.startswith('--') and key in parts[1:]:  # Anywhere in the path.
      where = '.'.join(parts[: parts.index(key, 1)])
      return (
        f'{name}: {where} has no key {key!r}.{hint} Its keys are in the'
        ' config file and configs/default.py.'
      )
  return None


def _config_file_error(argv: list[str], error: Exception) -> str | None:
  """`file:line: error` when a config file named in `argv` raised `error`."""
  files = {os.path.abspath(path) for _, path in _config_files(argv)}
  frames = [
    f
    for f in traceback.extract_tb(error.__traceback__)
    if os.path.abspath(f.filename) in files
  ]
  if isinstance(error, SyntaxError) and error.filename:
    if os.path.abspath(error.filename) in files:
      return f'{error.filename}:{error.lineno}: {error.msg}'
  if not frames:
    return None
  frame = frames[-1]
  missing = _missing_key(error)
  what = (
    f'no config key {missing[0]!r}.{missing[1]}'
    if missing
    else f'{type(error).__name__}: {error}'
  )
  return f'{frame.filename}:{frame.lineno}: error in the config file: {what}'
