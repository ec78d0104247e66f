"""The workdir of a run: who owns it, and which config its checkpoints are of.

`prepare` checks that the path can hold a run (a directory this process can
write), `acquire` makes this process its only writer, and `check_resume`
keeps the record of the config the checkpoints come from, so that a restart
either continues that run or stops (`resumed_optimizer` lets the default
optimizer, 'auto', continue with the recorded one).

The lock itself (`acquire`, `Lock`, `LOCK_FILE`) lives in lock.py and is
re-exported here.
"""

import dataclasses
import importlib
import json
import os
import tempfile
from typing import Any

from absl import logging
import ml_collections

import config_check
from datasets import core
import lock
import utils
from utils import UserError

# The lock, for callers that see the workdir as one thing.
LOCK_FILE = lock.LOCK_FILE
Lock = lock.Lock
acquire = lock.acquire

CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'

# Config keys (dotted) that a resumed run may change: they touch neither the
# data, the split, the parameters nor the arithmetic of the steps taken.
# Every other key, including any added later, refuses a resume until it is
# listed here. Evaluation masks its padding (any eval_batch_size gives the
# same metrics, to float32 rounding: about 1e-7); init_from and the dense
# layers' initialisers (model.linear_init) are read only by a run that
# starts from scratch; steps_per_dispatch and device_split_mb
# change how the batches reach the devices, not the steps; the cache's
# place, chunk size and parsing processes do not change what it holds;
# downloads are checked against fixed checksums whatever their URL.
SAFE_KEYS = (
  *('num_epochs', 'patience', 'log_every_steps', 'progress_bar'),
  *('eval_batch_size', 'init_from', 'steps_per_dispatch', 'device_split_mb'),
  'model.linear_init',
  *('dataset.cache_dir', 'dataset.chunk_rows', 'dataset.parse_workers'),
  'dataset.url',
)
# Keys that a resumed run may change where neither the recorded nor the new
# optimizer reads them (optim.create_optimizer; 'auto' never resolves to
# rowwise_adagrad): {key: the optimizers that read it}.
READ_BY = {'table_learning_rate': ('rowwise_adagrad',)}
# Keys that name the data's files. A resumed run may name other paths when
# the files there hold the bytes its checkpoints were trained on
# (sources.py compares their digests).
PATH_KEYS = ('dataset.path', 'dataset.valid_path', 'dataset.test_path')
# Keys that may differ between the processes of a run: where each host finds
# its files (multihost.assert_same_data compares what they loaded) and what
# it shows. Process 0's are recorded; the others' are not compared.
HOST_KEYS = (
  *PATH_KEYS,
  *('dataset.cache_dir', 'dataset.parse_workers', 'progress_bar'),
)
_ABSENT = object()  # A key that one of two flat configs lacks.


# --------------------------------------------------------------------------
# The directory.


def prepare(workdir: str | os.PathLike) -> str:
  """Creates `workdir` if needed; returns its absolute path.

  Raises:
    UserError: the path is not a directory, cannot be created, or it or the
      files a run rewrites in it are not writable by this process.
  """
  workdir = os.fspath(workdir)  # A str or a pathlib.Path.
  if not workdir.strip():  # `--workdir=$UNSET`: not the current directory.
    raise UserError(
      'The workdir is empty: give the directory of the run, e.g.'
      ' --workdir=/tmp/fm (created if missing).'
    )
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(
      f'workdir {path} exists and is not a directory. Pass the path of a'
      ' directory (it is created if missing), or move the file away.'
    )
  if not os.path.isdir(path):
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise UserError(_cannot_create(path, e)) from e
  try:
    fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f'workdir {path} is not writable ({e.strerror}). Choose a directory'
      f' that {lock.user()} can write, or ask for write access to it.'
    ) from e
  stuck = [p for p in _rewritten_paths(path) if not os.access(p, os.W_OK)]
  if stuck:
    raise UserError(
      f'workdir {path} holds files or directories that a run must rewrite but'
      f' {lock.user()} cannot write: {", ".join(stuck[:5])}'
      f'{" and more" if len(stuck) > 5 else ""}. Restore write access (chmod,'
      ' or chattr -i where they were made immutable), or use another workdir.'
    )
  return path


def _cannot_create(path: str, error: OSError) -> str:
  """Why `os.makedirs(path)` failed, naming the ancestor that stopped it."""
  ancestor = os.path.dirname(path)
  while ancestor != os.path.dirname(ancestor) and not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    return (
      f'workdir {path} cannot be created: {ancestor} is a file, not a'
      ' directory. Choose another path.'
    )
  return (
    f'workdir {path} cannot be created in {ancestor} ({error.strerror}).'
    f' Choose a path under a directory that {lock.user()} can write, or create'
    ' the directory first with the right owner.'
  )


def _rewritten_paths(path: str) -> list[str]:
  """Existing files and directories of `path` that a resumed run writes."""
  found = [
    os.path.join(path, name)
    for name in (LOCK_FILE, CONFIG_FILE, HISTORY_FILE, 'metrics.jsonl')
    if os.path.exists(os.path.join(path, name))
  ]
  # Orbax writes new steps into these directories and deletes old ones; the
  # encoder's files are replaced at every start.
  for top in ('checkpoints', 'encoder'):
    for root, dirs, _ in os.walk(os.path.join(path, top)):
      found.append(root)
      found.extend(os.path.join(root, d) for d in dirs)
  return sorted(set(found))


# --------------------------------------------------------------------------
# The config the checkpoints come from.


def flatten(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """`{dotted key: JSON value}` of a config, whatever its nesting.

  Values are normalised as `config.json` stores them (tuples become lists),
  so a config compares equal to its own record.
  """
  if isinstance(config, ml_collections.ConfigDict):
    tree = json.loads(config.to_json_best_effort())
  else:
    tree = json.loads(json.dumps(config, default=str))
  flat = {}

  def walk(node: dict, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = value

  walk(tree, '')
  return flat


def _as_names(flat: dict[str, Any]) -> dict[str, Any]:
  """`flat` with each dataset column list as its names: `a,b` is `[a, b]`."""
  return {
    k: list(core.name_list(v))
    if k.startswith('dataset.')
    and config_check.DATASET.get(k.rsplit('.', 1)[-1]) is config_check.columns
    and isinstance(v, (str, list))
    else v
    for k, v in flat.items()
  }


def is_safe(key: str, old: dict | None = None, new: dict | None = None) -> bool:
  """Whether a resumed run may change config key `key` (dotted), given the
  flat configs `old` and `new` for the keys of `READ_BY`."""
  if key in READ_BY and old is not None and new is not None:
    return not {old.get('optimizer'), new.get('optimizer')} & {*READ_BY[key]}
  return key in SAFE_KEYS


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints/*/` holds a step (orbax names it by step)."""
  root = os.path.join(os.path.expanduser(workdir), 'checkpoints')
  if not os.path.isdir(root):
    return False
  for manager in os.listdir(root):
    directory = os.path.join(root, manager)
    if os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory)
    ):
      return True
  return False


def check_resume(
  workdir: str,
  config: ml_collections.ConfigDict,
  *,
  resuming: bool | None = None,
  write: bool = True,
  record: bool = True,
  moved: bool = False,
) -> list[dict]:
  """Records the config of a new run, or checks that a restart continues it.

  A run without checkpoints (re)writes `config.json`, the record of the
  config its checkpoints will come from, and starts an empty history. A run
  with checkpoints compares its config with the record as updated by
  `config_history.jsonl`: a change of any key outside `SAFE_KEYS` is
  refused; safe changes are appended to the history. Call it before the
  data is loaded and before any checkpoint is restored.

  Args:
    workdir: the run's directory (see `prepare`).
    config: this run's config.
    resuming: whether the workdir holds checkpoints; None: `has_checkpoints`.
    write: whether this process writes (every process checks).
    record: whether it appends the safe changes now; False: the caller does
      (`record_history`) once the resume is accepted (e.g. the same data).
    moved: whether changed `PATH_KEYS` are returned with the safe changes,
      for `sources.check` to judge by the files' digests; False: refused.

  Returns:
    The safe changes as appended to the history: `time`, `key`, `old`,
    `new` (either left out where the key is absent).

  Raises:
    UserError: a change that would not continue the recorded run (every
      differing key with its old and new value), or an unreadable record.
  """
  if resuming is None:
    resuming = has_checkpoints(workdir)
  record_path = os.path.join(workdir, CONFIG_FILE)
  history_path = os.path.join(workdir, HISTORY_FILE)
  new = flatten(config)
  if not resuming or not os.path.exists(record_path):
    if not resuming:
      _refuse_foreign_files(workdir)
    else:
      logging.warning(
        '%s holds checkpoints but no %s: recording this config as theirs'
        ' without a check.',
        workdir,
        CONFIG_FILE,
      )
    if write:
      with utils.writing(CONFIG_FILE, workdir, f'{CONFIG_FILE}.tmp-*'):
        write_atomic(record_path, config.to_json_best_effort(indent=2) + '\n')
        if os.path.exists(history_path):
          os.remove(history_path)
    return []

  old = _as_names(_recorded(record_path, history_path))
  new = _as_names(new)
  # A key that a newer version of this library added is absent from an
  # older record: at its default value it continues the recorded run. A
  # model argument's default is the model's own (same model only).
  defaults = _defaults()
  if old.get('model_name') == new.get('model_name'):
    defaults.update(_model_defaults(new.get('model_name')))
  for k in set(new) - set(old):
    if k in defaults and defaults[k] == new[k]:
      old[k] = new[k]
  keys = sorted(set(old) | set(new))
  changed = [k for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
  if not write:  # Another host's paths: process 0 recorded its own.
    changed = [k for k in changed if k not in HOST_KEYS]
  judged_later = PATH_KEYS if moved else ()
  refused = [
    k for k in changed if not is_safe(k, old, new) and k not in judged_later
  ]
  if refused:
    differences = '; '.join(
      f'{k} {_show(old, k)} -> {_show(new, k)}' for k in refused
    )
    unread = ', '.join(
      f'{k} where the optimizer is not {" or ".join(v)}'
      for k, v in READ_BY.items()
    )
    raise UserError(
      f'workdir {workdir} holds checkpoints of a run with another config,'
      f' and resuming it with this one would not continue that run:'
      f' {differences} (recorded in {record_path}). Set these back to'
      ' resume; to start a new run instead, use another workdir or delete'
      f' this one. Only {", ".join(SAFE_KEYS)} may change on a resume (and'
      f' {unread}).'
    )
  entries = []
  for k in changed:
    entry = {'time': lock.now_text(), 'key': k}
    entry.update({n: v[k] for n, v in (('old', old), ('new', new)) if k in v})
    entries.append(entry)
  if write and record:
    record_history(workdir, entries)
  return entries


def record_history(workdir: str, entries: list[dict]) -> None:
  """Appends `check_resume`'s entries to the workdir's history; logs them
  (moved paths: sources.py, which compared their files)."""
  for e in entries:
    if e['key'] not in PATH_KEYS:
      logging.info('Resumed with %s', change_text(e))
  if entries:
    path = os.path.join(workdir, HISTORY_FILE)
    with utils.writing(HISTORY_FILE, workdir), open(path, 'a') as f:
      f.write(''.join(json.dumps(e) + '\n' for e in entries))


def resumed_optimizer(
  workdir: str,
  config: ml_collections.ConfigDict,
  names: tuple[str, ...],
) -> ml_collections.ConfigDict:
  """`config`, resuming with the recorded optimizer where it asks for 'auto'.

  'auto' picks an optimizer for a new run; the checkpoints of a run hold the
  state of the one it was trained with, recorded in `config.json` (before
  'auto' became the default, runs recorded 'adam'). So a restart with
  'auto' continues with that one, and `check_resume` sees no change.

  Args:
    workdir: the run's directory.
    config: this run's config.
    names: the optimizers this version builds; a recorded name outside them
      is left to `check_resume` to refuse.

  Raises:
    UserError: an unreadable record.
  """
  record_path = os.path.join(workdir, CONFIG_FILE)
  if (
    config.get('optimizer') != 'auto'
    or not has_checkpoints(workdir)
    or not os.path.exists(record_path)
  ):
    return config
  old = _recorded(record_path, os.path.join(workdir, HISTORY_FILE))
  recorded = old.get('optimizer')
  if recorded == 'auto' or recorded not in names:
    return config
  logging.info(
    "config.optimizer 'auto' resumes with %r, the optimizer of the"
    ' checkpoints in %s',
    recorded,
    workdir,
  )
  config = config.copy_and_resolve_references()
  config.optimizer = recorded
  return config


def record_resolved_optimizer(workdir: str, optimizer: str) -> None:
  """Writes what 'auto' became into the record of a run that starts.

  A restart naming that optimizer then continues the run, as one with
  'auto' does (`resumed_optimizer`). A record of another optimizer is left.

  Raises:
    UserError: the record cannot be read or written.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  with utils.writing(CONFIG_FILE, workdir, f'{CONFIG_FILE}.tmp-*'):
    with open(path) as f:
      record = json.load(f)
    if record.get('optimizer') == 'auto':
      record['optimizer'] = optimizer
      write_atomic(path, json.dumps(record, indent=2) + '\n')


def _defaults() -> dict[str, Any]:
  """configs/default.py's config, flattened (its data keys resolved)."""
  from configs import default  # Imports data.py: only when needed.

  return flatten(default.get_config())


def _model_defaults(name: Any) -> dict[str, Any]:
  """`model.<argument>` defaults of models/<name>.py's Model, flattened."""
  try:
    model = importlib.import_module(f'models.{name}').Model
  except (ImportError, AttributeError, TypeError):
    return {}  # Not a model file: the config check names it.
  return flatten(
    {
      'model': {
        f.name: f.default
        for f in dataclasses.fields(model)
        if f.default is not dataclasses.MISSING
      }
    }
  )


def change_text(entry: dict) -> str:
  """`key old -> new` of a `check_resume` entry, values as JSON."""
  return f'{entry["key"]} {_show(entry, "old")} -> {_show(entry, "new")}'


def _show(flat: dict, key: str) -> str:
  return json.dumps(flat[key]) if key in flat else '(absent)'


def _refuse_foreign_files(workdir: str) -> None:
  """Raises a UserError if a new run would overwrite files not of a run.

  A new run rewrites `config.json` and empties `metrics.jsonl`; in a
  directory of the user's, those may be theirs. A run's record is a JSON
  object with `model_name`; its metrics are JSON objects with `split` (the
  last line may be any start of one, cut short by a kill).
  """
  record_path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(record_path):
    try:
      with open(record_path) as f:
        record = json.load(f)
    except (OSError, ValueError):
      record = None
    if not isinstance(record, dict) or 'model_name' not in record:
      raise UserError(
        f'workdir {workdir} holds a {CONFIG_FILE} that is not the record of'
        ' a run (a JSON object with "model_name"), which a new run would'
        ' overwrite. Use another workdir, or move the file away.'
      )
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(metrics_path):
    return
  with open(metrics_path) as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if number == len(lines) and '{"split": '.startswith(line[:10]):
      continue  # Cut short by a kill (MetricsWriter writes `split` first).
    if not isinstance(record, dict) or 'split' not in record:
      raise UserError(
        f'{metrics_path}:{number}: not a metrics line of a run, and a new'
        ' run would empty the file. Use another workdir, or move the file'
        ' away.'
      )


def _recorded(record_path: str, history_path: str) -> dict[str, Any]:
  """The recorded config with the history's changes applied, flattened."""
  try:
    with open(record_path) as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    raise UserError(
      f'Cannot read {record_path}, the config of the checkpoints in its'
      f' workdir ({e}). Start a new run in another workdir; or, only if you'
      ' know that the checkpoints come from this config, delete the file to'
      ' record it as theirs.'
    ) from e
  flat = flatten(record)
  if os.path.exists(history_path):
    with open(history_path) as f:
      for line in f:
        try:
          entry = json.loads(line)
        except json.JSONDecodeError:
          continue  # A line cut short by a kill: its change is logged again.
        if 'new' in entry:
          flat[entry['key']] = entry['new']
        else:
          flat.pop(entry['key'], None)
  return flat


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` by a synced temporary file, renamed."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
