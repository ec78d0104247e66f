"""The entry points' wrapper: a user's mistake is one line and status 2.

`run_main` runs main.py, predict.py and export.py under absl: a
`utils.UserError`, running out of memory, and a flag, config file or
override that absl or ml_collections cannot read each print one line
naming what to fix; a Ctrl-C stops the program wherever it lands, with
one line and status 130, and a SIGTERM (a scheduler's, `docker stop`'s,
`timeout`'s) as a Ctrl-C does, status 143.
"""

from collections.abc import Callable, Iterator
import gc
import os
import re
import signal
import sys
import traceback
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections.config_flags import config_flags as config_flags_lib

import coordinator
import utils
from utils import UserError

# Set (to anything but 0) to see the traceback of a UserError.
TRACEBACK_ENV = 'FLAX_FM_TRACEBACK'


class Terminated(KeyboardInterrupt):
  """A SIGTERM, raised where a Ctrl-C raises KeyboardInterrupt.

  So a run that a scheduler, `docker stop` or `timeout` ends unwinds as an
  interrupted one: the saves already queued finish, the workdir's lock is
  released, and the exit is bounded (main.py's grace).
  """


def run_main(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)`, with a `UserError` printed as one line, status 2.

  So are a flag or config file that `_parse_flags` cannot read, and running
  out of memory (what to lower). `--verbosity=1` (or higher) or
  `$FLAX_FM_TRACEBACK` also prints a UserError's traceback. A Ctrl-C prints
  one line, status 130; a SIGTERM too, status 143. Other exceptions reach
  absl unchanged: traceback, status 1.
  """

  def guarded(argv: list[str]) -> Any:
    # What the imports, flags and config made lives as long as the program:
    # frozen, no garbage collection walks it again (benchmarks/README.md,
    # "Time from launch").
    gc.freeze()
    try:
      try:
        return main(argv)
      finally:
        end_at_interrupts()
    except KeyboardInterrupt as e:
      if _verbose():
        traceback.print_exc()
      # 128 + the signal's number, as a shell says.
      if isinstance(e, Terminated):
        fail('terminated (SIGTERM).', status=128 + signal.SIGTERM)
      fail('interrupted (Ctrl-C).', status=128 + signal.SIGINT)
    except Exception as e:  # pylint: disable=broad-except
      # XLA's out of memory: jax.errors.JaxRuntimeError, RESOURCE_EXHAUSTED.
      xla_oom = str(e).startswith('RESOURCE_EXHAUSTED')
      if not isinstance(e, (UserError, MemoryError)) and not xla_oom:
        raise
      if _verbose():
        traceback.print_exc()
      if not isinstance(e, UserError):
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        fail(
          f'Out of memory ({reason}). Lower'
          ' config.dataset.chunk_rows (while preprocessing), config.batch_size,'
          ' config.eval_batch_size or --batch_size, make the tables smaller (a'
          ' larger config.dataset.min_count), or run where more memory is'
          ' free.'
        )
      fail(str(e))

  keep_interrupts()
  app.run(guarded, flags_parser=_parse_flags)


def keep_interrupts() -> None:
  """Makes Ctrl-C and SIGTERM stop the program, even in a gc callback.

  CPython drops an exception raised in a garbage collector's callback
  (`Exception ignored in: <function _xla_gc_callback>`), and JAX's runs at
  every collection: about one Ctrl-C in twelve during preprocessing went
  unheard and the run trained on. A signal that arrives there is sent
  again a moment later instead. A SIGTERM raises `Terminated` where it
  ended the process at once. Only Python's own handlers are replaced (not
  a signal ignored, e.g. SIGINT under `nohup` or `&`, or a host program's).
  """
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupt)
  if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _interrupt)


def end_at_interrupts() -> None:
  """Makes Ctrl-C and SIGTERM end the program at once, as by default.

  Once main has returned, only the interpreter's shutdown is left (atexit
  callbacks, JAX's among them): an exception raised there cannot stop it,
  and Python prints it with a traceback. Handlers other than
  `keep_interrupts`' stay.
  """
  for signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(signum) is _interrupt:
      signal.signal(signum, signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
  if utils.resent_from_gc(signum, frame):
    return
  raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def path_flags(*names: str) -> list[str]:
  """The values of the path flags `names`, `~` expanded.

  A shell leaves `--flag=~/x` unexpanded.

  Raises:
    UserError: one is empty, as `--output=$OUT` is with `$OUT` unset: it
      names no file, or the current directory.
  """
  values = []
  for name in names:
    flag = flags.FLAGS[name]
    if not flag.value:
      raise UserError(
        f'--{name} is empty: give the path it takes ({flag.help.rstrip(".")}).'
      )
    values.append(os.path.expanduser(flag.value))
  return values


def _verbose() -> bool:
  """Whether the user asked for tracebacks (`--verbosity`, TRACEBACK_ENV)."""
  verbose = os.environ.get(TRACEBACK_ENV, '') not in ('', '0')
  return verbose or flags.FLAGS.verbosity >= 1


def fail(
  message: str, status: int = 2, then: Callable[[], Any] | None = None
) -> NoReturn:
  """Prints `<program>: error: <message>` as one line and exits.

  `then`, if given, is called between the two.
  """
  logging.flush()
  sys.stdout.flush()
  program = os.path.basename(sys.argv[0])
  sys.stderr.write(f'{program}: error: {message}\n')
  sys.stderr.flush()
  if then is not None:
    then()
  sys.exit(status)


# The flags of a multi-process run (main.py's).
_RUN_FLAGS = ('coordinator_address', 'process_id', 'num_processes')


def _fail_at_start(argv: list[str], message: str) -> NoReturn:
  """`fail(message)`; in a multi-process run, the others hear it too.

  They would wait for this process the whole start-up timeout: process 0's
  lobby tells them (`coordinator.report_failure`, at most
  `coordinator.REPORT_SECONDS`). The flags are read from `argv` as given,
  since absl could not parse them.
  """
  given = {}
  if all(name in flags.FLAGS for name in _RUN_FLAGS):
    for i, arg in enumerate(argv[1:], 1):
      name, equals, value = arg.lstrip('-').partition('=')
      if arg.startswith('-') and name in _RUN_FLAGS:
        given[name] = value if equals else ''.join(argv[i + 1 : i + 2])
  address = given.get('coordinator_address')
  address = address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  process, count = given.get('process_id', ''), given.get('num_processes', '')
  if not (address and process.isdigit() and count.isdigit()):
    fail(message)
  fail(
    message,
    then=lambda: coordinator.report_failure(
      address, int(process), int(count), message
    ),
  )


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or override as one line.

  absl prints a malformed flag in two lines with Python's words for the
  value and exits with 1 (here: the type a config key takes); ml_collections
  lets through as tracebacks `--config.<key>` for a key the config lacks,
  the config file's own exception (here: `file:line`), a file without
  get_config() or one returning no ConfigDict. Returns the other arguments.
  """
  if (message := _config_file_unreadable(argv)) is not None:
    # ml_collections would raise at the config's first use.
    _fail_at_start(argv, message)
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
    _fail_at_start(
      argv,
      _config_file_error(argv, chain[-1])
      or _no_argument(argv, e)
      or _flag_error(argv, e),
    )
  except Exception as e:  # pylint: disable=broad-except
    missing = "attribute 'get_config'" in str(e) and 'has no get_config()'
    message = _override_error(argv, e) or _config_file_error(argv, e)
    if not (message := message or _not_a_config(argv, missing or '')):
      raise
    _fail_at_start(argv, message)
  if message := _not_a_config(argv) or _repeated_tuple(argv):
    _fail_at_start(argv, message)
  return args


def _repeated_tuple(argv: list[str]) -> str | None:
  """The message for a tuple key's override given twice, or None.

  ml_collections appends the values of each (`--config.dataset.split`
  twice gives six numbers). A scalar key keeps its last, as any absl flag.
  """
  args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  given = {}
  for i, arg in enumerate(args):
    if arg == '--':
      break
    name, equals, value = arg.lstrip('-').partition('=')
    top = name.split('.')[0]
    if not (arg.startswith('-') and '.' in name and name in flags.FLAGS):
      continue
    if top in flags.FLAGS and (
      isinstance(flags.FLAGS[name], flags.MultiFlag)
      and isinstance(
        flags.FLAGS[top].parser, config_flags_lib.ConfigFileFlagParser
      )
    ):
      value = value if equals else ''.join(args[i + 1 : i + 2])
      given.setdefault(name, []).append(repr(value))
  for name, values in given.items():
    if len(values) > 1:
      times = 'twice' if len(values) == 2 else f'{len(values)} times'
      return (
        f'--{name} is given {times} ({", then ".join(values)}), and'
        ' ml_collections would join them into one tuple of all their values.'
        ' Give it once.'
      )
  return None


# What a config key of each type takes on the command line (bool first: a
# bool is an int; ConfigDict holds a tuple as a list).
_TAKES = (
  (bool, 'True or False'),
  (int, 'an integer'),
  (float, 'a number'),
  ((tuple, list), 'a tuple, quoted for the shell'),
)
# The same for a key whose value is None, by the parser of its type.
_PLACEHOLDERS = (
  (flags.IntegerParser, 'an integer'),
  (flags.FloatParser, 'a number'),
)


def _flag_error(argv: list[str], error: flags.Error) -> str:
  """absl's message for a flag it cannot parse, as one line."""
  message = ' '.join(str(error).split()).replace(' ?', '?')
  name = message.partition('=')[0].removeprefix('flag --')
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  # A flag given twice: the value absl refused (its message starts with it).
  values.sort(key=lambda v: not message.startswith(f'flag --{name}={v}: '))
  if '.' in name and name in flags.FLAGS and values:
    current, parser = flags.FLAGS[name].value, flags.FLAGS[name].parser
    if current is None:  # A placeholder, as table_weight_decay: by type.
      for kind, takes in _PLACEHOLDERS:
        if isinstance(parser, kind):
          return (
            f'--{name}={values[0]}: {name} takes {takes} (leave the flag out'
            f' for None, as now); {values[0]!r} is not one.'
          )
    for kind, takes in _TAKES:
      if isinstance(current, kind):
        if isinstance(current, list):
          if all(isinstance(c, str) for c in current):  # Names: the given.
            current = [v.strip(' \'"()') for v in values[0].split(',')]
          text = str(tuple(current))
          current = f'"{text}"' if "'" in text else f"'{text}'"
        return (
          f'--{name}={values[0]}: {name} takes {takes}, e.g.'
          f' {current}; {values[0]!r} is not one.'
        )
  if name in flags.FLAGS and flags.FLAGS[name].boolean and values:
    return (
      f'--{name}={values[0]}: --{name} takes true or false (or --{name},'
      f' --no{name}); {values[0]!r} is not one.'
    )
  end = '' if message.endswith(('.', '?')) else '.'
  return f'{message}{end} Pass --helpshort to see the flags.'


def _no_argument(argv: list[str], error: flags.Error) -> str | None:
  """The message for `--config=file.py:arg` whose get_config() takes none."""
  if 'get_config() takes 0 positional arguments' not in str(error):
    return None
  for name, path in _config_files(argv):
    for arg in argv:
      if arg.startswith((f'--{name}={path}:', f'-{name}={path}:')):
        given = arg.split(':', 1)[1]
        return (
          f'--{name}: get_config() in {path} takes no argument, so'
          f' {given!r} (after the colon) cannot be passed to it. Drop'
          f' ":{given}", or define get_config(arg=None) as configs/fm.py'
          ' does.'
        )
  return None


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
      why = 'is not a file' if os.path.exists(path) else 'does not exist'
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
      if not hint and (found := _keys_named(argv, parts, key)):
        hint = f' Did you mean --{" or --".join(found)}?'
      return (
        f'{name}: {where} has no key {key!r}.{hint} Its keys are in the'
        ' config file and configs/default.py.'
      )
  return None


def _keys_named(argv: list[str], parts: list[str], key: str) -> list[str]:
  """Where else the config file of flag `parts[0]` has a key named `key`,
  as flags that end in `parts`' rest (`config.embed_dim` ->
  `config.model.embed_dim`)."""
  rest = parts[parts.index(key, 1) :]
  for name, path in _config_files(argv):
    if name == parts[0]:
      try:  # The file again, without `:arg`: the keys, not their values.
        config = flags.FLAGS[name].parser.parse(path)
      except Exception:  # pylint: disable=broad-except
        return []
      return ['.'.join([name, *p, *rest]) for p in _groups_with(config, key)]
  return []


def _groups_with(
  node: ml_collections.ConfigDict, key: str, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
  """The paths of the groups of keys under `node` that hold `key`."""
  for name, value in node.items():
    if name == key:
      yield prefix
    elif isinstance(value, ml_collections.ConfigDict):
      yield from _groups_with(value, key, (*prefix, name))


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
