"""Shared parts of the benchmarks: configs, torchfm models, machine, results.

Nothing here imports torch or JAX at module level: the orchestrating process
of `benchmarks.throughput` stays free of both, and every torch import is
guarded so the scripts run (without their torchfm side) where torch is absent.
"""

import argparse
import ast
from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import csv
import datetime
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
from typing import Any, NoReturn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
# data.py, train.py, configs/ and models/ import from the repository root.
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Our model name (models/<name>.py) -> torchfm's module and class, as used by
# pytorch-fm's examples/main.py `get_model` (its DeepFM is 'dfm').
TORCHFM_MODELS = {
  'lr': ('lr', 'LogisticRegressionModel'),
  'fm': ('fm', 'FactorizationMachineModel'),
  'ffm': ('ffm', 'FieldAwareFactorizationMachineModel'),
  'fnn': ('fnn', 'FactorizationSupportedNeuralNetworkModel'),
  'wd': ('wd', 'WideAndDeepModel'),
  'nfm': ('nfm', 'NeuralFactorizationMachineModel'),
  'fnfm': ('fnfm', 'FieldAwareNeuralFactorizationMachineModel'),
  'deepfm': ('dfm', 'DeepFactorizationMachineModel'),
  'afm': ('afm', 'AttentionalFactorizationMachineModel'),
  'ncf': ('ncf', 'NeuralCollaborativeFiltering'),
  'afn': ('afn', 'AdaptiveFactorizationNetwork'),
  'dcn': ('dcn', 'DeepCrossNetworkModel'),
  'xdeepfm': ('xdfm', 'ExtremeDeepFactorizationMachineModel'),
  'autoint': ('afi', 'AutomaticFeatureInteractionModel'),
  # Configs of models/pnn.py (`method` 'inner' and 'outer').
  'ipnn': ('pnn', 'ProductNeuralNetworkModel'),
  'opnn': ('pnn', 'ProductNeuralNetworkModel'),
}
# Models of pytorch-fm's GitHub master that torchfm 0.7.0 predates: compared
# when $PYTORCH_FM_SRC names a checkout of https://github.com/rixwew/pytorch-fm.
MASTER_MODELS = {'hofm': ('hofm', 'HighOrderFactorizationMachineModel')}


def has_torchfm(name: str) -> bool:
  """Whether model `name` has a pytorch-fm counterpart to run here."""
  return name in TORCHFM_MODELS or (
    name in MASTER_MODELS and _master_source() is not None
  )


def _master_source() -> str | None:
  """$PYTORCH_FM_SRC, a pytorch-fm checkout; None where it is unset.

  Set to anything else, it stops the tool: a mistyped path would otherwise
  leave HOFM without its reference, silently.
  """
  src = os.environ.get('PYTORCH_FM_SRC', '')
  if not src:
    return None
  if not os.path.isfile(os.path.join(src, 'torchfm', 'layer.py')):
    raise SystemExit(
      f'PYTORCH_FM_SRC={src} is not a checkout of'
      ' https://github.com/rixwew/pytorch-fm: it has no torchfm/layer.py.'
      ' Give the directory of a clone, or unset it.'
    )
  return src


def pytorch_fm_master(module: str):
  """`torchfm/model/<module>.py` of the checkout that $PYTORCH_FM_SRC names.

  Its model imports that checkout's torchfm/layer.py (e.g. AnovaKernel) in
  place of the installed torchfm 0.7.0's, which stays installed.
  """
  src = _master_source()
  if src is None:
    raise SystemExit(
      f'{module}: set PYTORCH_FM_SRC to a checkout of'
      ' https://github.com/rixwew/pytorch-fm (master); torchfm 0.7.0 has no'
      f' {module}.'
    )

  def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded

  installed = sys.modules.get('torchfm.layer')
  sys.modules['torchfm.layer'] = load(
    'torchfm.layer', os.path.join(src, 'torchfm', 'layer.py')
  )
  try:
    return load(
      f'pytorch_fm_master_{module}',
      os.path.join(src, 'torchfm', 'model', f'{module}.py'),
    )
  finally:
    if installed is None:
      del sys.modules['torchfm.layer']
    else:
      sys.modules['torchfm.layer'] = installed


def model_names() -> list[str]:
  """Models that have both a file in models/ and a config in configs/."""
  import models  # pylint: disable=g-import-not-at-top

  names = [
    name
    for name in models.names()
    if os.path.exists(os.path.join(ROOT, 'configs', f'{name}.py'))
  ]
  # Configs named otherwise than their model file (ipnn, opnn: pnn).
  names += [
    name
    for name in TORCHFM_MODELS
    if name not in names
    and os.path.exists(os.path.join(ROOT, 'configs', f'{name}.py'))
  ]
  # Cheap models first: a partial run still covers the most models.
  order = list(TORCHFM_MODELS)
  return sorted(names, key=lambda n: (order.index(n) if n in order else 99, n))


def parse_models(value: str) -> list[str]:
  """`all` or a comma-separated list, checked against models/ and configs/."""
  known = model_names()
  if value in ('', 'all'):
    return known
  names = [n.strip() for n in value.split(',') if n.strip()]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise SystemExit(
      f'--models: unknown model(s) {", ".join(unknown)}; choose from'
      f' {", ".join(known)} or "all".'
    )
  return names


def get_config(
  name: str,
  arg: str | None = None,
  *overrides: dict,
  flags: Sequence[str] = (),
):
  """`configs/<name>.py`'s config (`arg='smoke'` for the smoke variant).

  Args:
    name: the config file.
    arg: its argument, e.g. 'smoke'.
    *overrides: `{dotted.key: value}` dicts (`parse_overrides`), applied in
      order; a key the config lacks stops with a message, but under `model`
      (an argument of the model's constructor), and the overridden config
      is checked as a run checks it (`config_check.validate_config`). A
      string for a tuple is a comma-separated list, as main.py's flags take
      it (`dataset.side_features=genres,year`).
    flags: the command-line flag of each of `overrides` (default `--set`),
      named by the messages.

  Raises:
    SystemExit: an override names no key of the config, or gives a value
      that the config cannot take, naming its flag.
  """
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  flags = list(flags) + ['--set'] * (len(overrides) - len(flags))
  for flag, layer in zip(flags, overrides, strict=True):
    for key, value in layer.items():
      *parents, last = key.split('.')
      node = config
      try:
        for i, parent in enumerate(parents, 1):
          node = node[parent]
          if not hasattr(node, 'keys'):  # A value: model.embed_dim.x=1.
            raise KeyError(
              f'{".".join(parents[:i])} is a value, not a group of keys'
            )
        if last not in node and parents[:1] != ['model']:
          # Only a model takes new keys (its constructor's, checked below).
          close = difflib.get_close_matches(last, list(node.keys()), 1)
          hint = f'\nDid you mean {close[0]!r}?' if close else ''
          raise KeyError(f'{key!r}{hint}')
        if isinstance(value, str) and isinstance(node.get(last), tuple):
          value = tuple(v.strip() for v in value.split(',') if v.strip())
        node[last] = value
      except (KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f'{flag}={key}={value!r}: {_reason(e)}') from None
  if any(overrides):
    import config_check  # pylint: disable=g-import-not-at-top
    import data  # pylint: disable=g-import-not-at-top

    try:
      config_check.validate_config(config, dataset_names=tuple(data.FORMAT_OF))
    except config_check.ConfigError as e:
      given = ' or '.join(
        dict.fromkeys(f for f, o in zip(flags, overrides, strict=True) if o)
      )
      last = given.rpartition(' or ')[2]  # The variant's own, if any.
      raise SystemExit(f'{given}: {without_main_flags(str(e), last)}') from None
  return config


def _reason(error: Exception) -> str:
  """ml_collections' error for an override, in one sentence."""
  if isinstance(error, KeyError) and error.args:
    first, _, hint = str(error.args[0]).partition('\n')
    if ' is a value' in first:
      return first + '.'
    key = first.strip('\'"')
    hint = f' {hint.strip()}' if hint.strip() else ''
    return f'the config has no key {key!r}.{hint}'
  return str(error)


def without_main_flags(message: str, flag: str | None = '--set') -> str:
  """A user error's advice, main.py's `--config.<key>=<value>`, as a
  benchmark's: `flag` (`--set`), or the config file alone where None."""
  if flag is None:
    return message.replace(' or with --config.<key>=<value>', '')
  return message.replace('--config.<key>=<value>', f'{flag}=<key>=<value>')


# For `user_errors`: the flag of the scripts that have one for the cache.
CACHE_DIR_FLAG = {'config.dataset.cache_dir': '--cache_dir'}


def with_flags(message: str, keys: Mapping[str, str]) -> str:
  """`message` with each config key of `keys` named as the script's flag.

  Args:
    message: a user error's message.
    keys: `{config key: flag}`, e.g. `{'config.dataset.cache_dir':
      '--cache_dir'}`: the key, with or without main.py's `--` before it,
      becomes the flag (`config.dataset.cache_dir=/x` -> `--cache_dir=/x`),
      but not a longer key that starts with it.
  """
  for key, flag in keys.items():
    message = re.sub(
      rf'(?<![\w.-])(?:--)?{re.escape(key)}(?!\.?\w)', flag, message
    )
  return message


def user_errors(flag: str | None = None, keys: Mapping[str, str] | None = None):
  """Decorates a benchmark's `main`: a user's mistake stops it in one line.

  A `utils.UserError` (a bad config value, a missing data file, a workdir
  in use), raised by the trainer or the data, becomes a `SystemExit` with
  its message, not a traceback (`run` prints it in one line, status 2);
  main.py's `--config.<key>=<value>` in it becomes `flag`'s (the script's
  `--set`, or none).

  Args:
    flag: the script's flag of config overrides (`--set`), or None.
    keys: `{config key: flag}` for the config values that flags of the
      script set (`with_flags`), which the message names as those flags:
      `CACHE_DIR_FLAG` for a script with a `--cache_dir` flag.
  """

  def decorate(main: Callable) -> Callable:
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
      import utils  # pylint: disable=g-import-not-at-top

      try:
        return main(*args, **kwargs)
      except utils.UserError as e:
        message = with_flags(without_main_flags(str(e), flag), keys or {})
        raise SystemExit(f'error: {message}') from e

    return wrapped

  return decorate


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser, whose errors are one line, as main.py's flags'.

  A flag it cannot read, or a check of the tool's (`parser.error`), prints
  `<prog>: error: <message>` without the usage before it, and exits with
  status 2 (`--help` shows the usage).
  """

  def error(self, message: str) -> NoReturn:
    self.exit(2, f'{self.prog}: error: {message}\n')


def run(main: Callable[[], Any]) -> None:
  """Runs a tool's `main` as its command: a user's mistake ends in one line.

  A `SystemExit` with a message (a flag, file or config the tool refuses;
  `user_errors`' messages) and a `utils.UserError` print `python -m
  benchmarks.<tool>: error: <message>` on stderr and exit with status 2,
  as main.py does. An integer status (argparse's, `--help`'s) stays, and
  any other exception keeps its traceback, status 1.

  Args:
    main: the tool's `main`, called without arguments (sys.argv's).
  """
  spec = inspect.unwrap(main).__globals__.get('__spec__')  # user_errors'.
  program = os.path.basename(sys.argv[0])
  if spec is not None:
    program = f'python -m {spec.name}'
  try:
    main()
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      raise
    message = str(e.code)
  except Exception as e:  # pylint: disable=broad-except
    utils = sys.modules.get('utils')  # Not imported: not a UserError.
    if utils is None or not isinstance(e, utils.UserError):
      raise
    message = str(e)
  else:
    return
  sys.stdout.flush()
  sys.stderr.write(f'{program}: error: {message.removeprefix("error: ")}\n')
  sys.stderr.flush()
  sys.exit(2)


# The start of a benchmark's child script (`python -c`): the repository is
# importable, and a utils.UserError that ends the child is the last line of
# its stdout, `{"user_error": message}`, not a traceback on its stderr.
_CHILD_START = f"""
import json, sys
sys.path.insert(0, {ROOT!r})


def _one_line_user_errors(kind, error, tb, default=sys.excepthook):
  utils = sys.modules.get('utils')  # Not imported: not a UserError.
  if utils is not None and issubclass(kind, utils.UserError):
    print(json.dumps({{'user_error': str(error)}}), flush=True)
  else:  # A bug: its traceback.
    default(kind, error, tb)


sys.excepthook = _one_line_user_errors
"""


def child_script(code: str) -> str:
  """`code` as a child's `python -c` script that `child_result` reads.

  The repository is on the child's `sys.path`; a `utils.UserError` that
  ends the child is sent to the parent (`child_result`), not printed as a
  traceback; any other exception keeps its traceback on the child's stderr.
  """
  return _CHILD_START + code


def child_result(status: int, out: str, what: str) -> dict | None:
  """The JSON object on the last line of a `child_script`'s stdout, if any.

  Args:
    status: the child's exit status.
    out: its stdout.
    what: what the child did, for the message of a failure.

  Raises:
    utils.UserError: the child stopped on one (a config or data error):
      its message, which `user_errors` turns into one line.
    RuntimeError: the child failed otherwise (its traceback is on stderr).
  """
  lines = out.strip().splitlines()
  try:
    result = json.loads(lines[-1]) if lines else None
  except ValueError:  # Not a result: the child's own output.
    result = None
  if not isinstance(result, dict):
    result = None
  if status:
    if result is not None and list(result) == ['user_error']:
      import utils  # pylint: disable=g-import-not-at-top

      raise utils.UserError(result['user_error'])
    raise RuntimeError(f'{what} failed (exit {status})')
  return result


def parse_ints(value: str, flag: str, least: int = 1) -> list[int]:
  """`value`'s comma-separated integers (`1000,10000`), in order.

  Raises:
    SystemExit: `value` holds no integer, something else, or one below
      `least`, naming `flag`.
  """
  try:
    values = [int(v) for v in value.split(',') if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < least:
    raise SystemExit(
      f'{flag}={value}: give integers of at least {least}, separated by commas.'
    )
  return values


def check_least(args: Any, least: dict[str, int]) -> None:
  """Stops unless each flag `--<name>` of `args` is at least `least[name]`."""
  for name, bound in least.items():
    value = getattr(args, name)
    if value < bound:
      raise SystemExit(f'--{name}={value}: give at least {bound}.')


def least_lines(config) -> int:
  """The fewest rows of a data set whose training split holds one batch.

  The training split is `datasets.split.split_sizes`' first part of
  `config.dataset.split`; a run stops on fewer rows than this, as its
  training split is smaller than `config.batch_size`.
  """
  from datasets import split  # pylint: disable=g-import-not-at-top

  batch, fractions = config.batch_size, config.dataset.split
  lines = math.ceil(batch / float(fractions[0]))
  while split.split_sizes(lines, fractions)[0] < batch:
    lines += 1
  while lines > 1 and split.split_sizes(lines - 1, fractions)[0] >= batch:
    lines -= 1
  return lines


def parse_tiny(
  parser: argparse.ArgumentParser,
  argv: Sequence[str] | None,
  tiny: dict[str, Any],
) -> argparse.Namespace:
  """Parses `argv`; with `--tiny`, `tiny`'s values are the defaults.

  `--tiny` changes only the flags the command line leaves out: one given
  explicitly (`--tiny --steps=7`) keeps its value.

  Args:
    parser: the benchmark's parser, with a `--tiny` flag.
    argv: the arguments (None: sys.argv's).
    tiny: `{dest: value}`, each flag's default under `--tiny`.
  """
  args = parser.parse_args(argv)
  if args.tiny:
    parser.set_defaults(**tiny)
    args = parser.parse_args(argv)
  return args


def parse_overrides(items: Sequence[str], flag: str) -> dict[str, Any]:
  """`['key=value', ...]` -> `{key: value}`, values as Python literals."""
  overrides = {}
  for item in items:
    key, sep, raw = item.partition('=')
    if not sep or not key.strip():
      raise SystemExit(f'{flag}: {item!r} is not key=value.')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw  # A bare string, e.g. optimizer=adam.
    overrides[key.strip()] = value
  return overrides


def torch_available() -> bool:
  """Whether torch and torchfm can be imported (dev-only dependencies)."""
  return all(
    importlib.util.find_spec(m) is not None for m in ('torch', 'torchfm')
  )


# torchfm's arguments that ours name otherwise: model -> function of our
# model config returning them (AFN: one dropout rate, torchfm's first entry).
TORCHFM_KWARGS = {
  'afn': lambda c: {'LNN_dim': c['lnn_dim'], 'dropouts': (c['dropout'],)},
}


def torchfm_model(name: str, model_config: dict, field_dims: Sequence[int]):
  """torchfm's model `name` with our config's equivalent hyper-parameters.

  Our constructor arguments are passed where torchfm's constructor has the
  same name (embed_dim, mlp_dims, dropout(s), attn_size, user/item field
  indices); ours that it lacks (e.g. AFM's attn_l2, W&D's crosses, FNN's
  fm_linear_inputs) are dropped. torchfm's models return probabilities.
  """
  if name in MASTER_MODELS:
    module_name, class_name = MASTER_MODELS[name]
    cls = getattr(pytorch_fm_master(module_name), class_name)
  else:
    module_name, class_name = TORCHFM_MODELS[name]
    cls = getattr(
      importlib.import_module(f'torchfm.model.{module_name}'), class_name
    )
  accepted = inspect.signature(cls.__init__).parameters
  kwargs = {
    k: tuple(v) if isinstance(v, list) else v
    for k, v in dict(model_config).items()
    if k in accepted and k != 'field_dims'
  }
  kwargs.update(TORCHFM_KWARGS.get(name, lambda c: {})(dict(model_config)))
  return cls([int(d) for d in field_dims], **kwargs)


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top

    return metadata.version(module)
  except Exception:  # pylint: disable=broad-except
    return None


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_info() -> dict[str, Any]:
  """CPU model, core count, load, and the versions of what was measured."""
  info = {
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'cpu': _cpu_model(),
    'cores': os.cpu_count(),
    'load_average': load_average(),
    'python': platform.python_version(),
    'platform': platform.platform(),
    'versions': {
      m: _version(m)
      for m in (
        'jax',
        'jaxlib',
        'flax',
        'optax',
        'numpy',
        'torch',
        'torchfm',
      )
    },
  }
  src = _master_source()
  if src is not None:  # HOFM's reference: the commit, where it is a clone.
    info['versions']['pytorch-fm master'] = _git_head(src) or src
  return info


def _git_head(path: str) -> str | None:
  """The commit checked out at `path`, or None if it is not a git clone."""
  import subprocess  # pylint: disable=g-import-not-at-top

  if not os.path.exists(os.path.join(path, '.git')):
    return None  # Not git's answer for a repository around it.
  try:
    done = subprocess.run(
      ['git', '-C', path, 'rev-parse', 'HEAD'],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip()[:12] or None


def machine_line(info: dict[str, Any]) -> str:
  """One Markdown line describing the machine of `machine_info()`."""
  versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items() if v)
  load = info.get('load_average')
  load_end = info.get('load_average_end')
  return (
    f'Machine: {info["cpu"]}, {info["cores"]} cores; {versions}; Python'
    f' {info["python"]}; load average at start {load}'
    + (f', at end {load_end}' if load_end else '')
    + f'; {info["date"]}.'
  )


def rss_mib() -> tuple[float | None, float | None]:
  """(current, peak) resident memory of this process in MiB (Linux)."""
  current = peak = None
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          current = int(line.split()[1]) / 1024
        elif line.startswith('VmHWM:'):
          peak = int(line.split()[1]) / 1024
  except OSError:
    import resource  # pylint: disable=g-import-not-at-top

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return current, peak


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A GitHub Markdown table; floats keep what `fmt_cell` gives them."""
  lines = [
    '| ' + ' | '.join(header) + ' |',
    '|' + '|'.join('---' for _ in header) + '|',
  ]
  for row in rows:
    lines.append('| ' + ' | '.join(str(c) for c in row) + ' |')
  return '\n'.join(lines)


def check_dir(path: str, flag: str) -> None:
  """Stops unless `path` is a directory or one that can be made.

  Checked before a benchmark measures anything: its results are written
  after the first model, and runs under a workdir as they go.
  """
  if not path:
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    why = (
      'is a file'
      if existing == os.path.abspath(path)
      else (f'cannot be made: {existing} is a file')
    )
  elif not os.access(existing, os.W_OK | os.X_OK):
    why = f'cannot be written: {existing} is not writable'
  else:
    return
  raise SystemExit(f'{flag}={path}: {why}; give a directory (made if missing).')


@contextlib.contextmanager
def workdir_or_temp(workdir: str, prefix: str) -> Iterator[str]:
  """Yields `workdir`, or a temporary directory removed on the way out.

  Runs the user did not ask to keep (no --workdir) leave nothing behind, not
  even after an error or an interrupt.
  """
  if workdir:
    yield workdir
    return
  with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
    yield tmp


def command_line(script: str, argv: Sequence[str] | None) -> str:
  """`python -m benchmarks.<script>` and its arguments (None: sys.argv's).

  Quoted for a POSIX shell where needed (`--set=model.mlp_dims=(8, 8)`), so
  that the line pasted from a results file runs what it names.
  """
  args = sys.argv[1:] if argv is None else argv
  return ' '.join(['python -m benchmarks.' + script, shlex.join(args)]).strip()


def write_results(
  out_dir: str,
  stem: str,
  records: list[dict],
  info: dict,
  markdown: Callable[[list[dict], dict, str], str],
  command: str,
) -> list[str]:
  """Writes `<stem>.json` (machine + records), `.csv` and `.md`; atomic.

  Called after every model, so that a long run keeps what it measured: the
  load average at the end is updated in `info`, and each file is written to
  a temporary name and renamed, so an interrupted run leaves the previous
  complete file, never a truncated one.

  Args:
    out_dir: where the files go.
    stem: their name without the suffix.
    records: one dict per measurement.
    info: `machine_info()`.
    markdown: `(records, info, command)` -> the `.md` file's text.
    command: the command that ran the benchmark (`command_line`).
  """
  info['load_average_end'] = load_average()
  markdown = markdown(records, info, command)
  os.makedirs(out_dir, exist_ok=True)
  paths = []

  def put(suffix: str, writer) -> None:
    path = os.path.join(out_dir, f'{stem}.{suffix}')
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
      writer(f)
    os.replace(tmp, path)
    paths.append(path)

  put(
    'json',
    lambda f: json.dump({'machine': info, 'results': records}, f, indent=1),
  )
  columns = []
  for record in records:
    columns += [k for k in record if k not in columns]

  def write_csv(f):
    w = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    w.writeheader()
    for record in records:
      w.writerow(
        {
          k: json.dumps(v) if isinstance(v, (list, dict)) else v
          for k, v in record.items()
        }
      )

  put('csv', write_csv)
  put('md', lambda f: f.write(markdown + '\n'))
  return paths


def fmt(value, spec: str = ',.0f', missing: str = 'n/a') -> str:
  """Formats a number, or `missing` for None / NaN."""
  if value is None:
    return missing
  try:
    if value != value:  # NaN.
      return missing
    return format(value, spec)
  except (TypeError, ValueError):
    return str(value)
