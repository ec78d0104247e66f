"""Checks a whole config before any data work, naming every bad key at once.

`validate_config` checks what can be checked without the data: types and
ranges of every key of configs/default.py, the model file and its
constructor arguments, the dataset split. It reports all problems in one
`ConfigError`; what needs the data (field indices against the number of
fields, batch sizes against the number of examples) is checked where the
data is loaded. A new run's valid config is then warned of the keys it
sets but would not read (config_unused.py).
"""

from collections.abc import Callable, Sequence
import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import pathlib
import traceback
import typing
from typing import Any

import ml_collections

from config_rules import TRAINER_SET
from config_rules import Rule
from config_rules import boolean
from config_rules import columns
from config_rules import factor
from config_rules import field_pairs
from config_rules import integer
from config_rules import integers
from config_rules import is_int
from config_rules import is_number
from config_rules import is_sequence
from config_rules import number
from config_rules import one_of
from config_rules import optional
from config_rules import optional_index
from config_rules import rate
from config_rules import rates
from config_rules import separator
from config_rules import string
import config_unused
import models
from utils import UserError

# The values of `config.optimizer` (optim.NAMES).
OPTIMIZERS = ('auto', 'adam', 'lazy_adam', 'rowwise_adagrad')


class ConfigError(UserError, ValueError):
  """Bad config values; the message names each key, its value and the rule."""


TOP_LEVEL = {
  'model_name': string,
  'batch_size': integer(1),
  'eval_batch_size': integer(1),
  'learning_rate': number(0, strict=True),
  'table_learning_rate': number(0, strict=True),
  'weight_decay': number(0),
  'table_weight_decay': optional(number(0)),
  'num_epochs': integer(1),
  # 0 would stop before the first epoch; num_epochs alone bounds a run.
  'patience': integer(1),
  'lr_plateau_factor': factor,
  'seed': integer(0, 2**63),  # jax.random.key's int64.
  'shuffle': boolean,
  'init_from': string,
  'log_every_steps': integer(1),
  'steps_per_dispatch': integer(1),
  'device_split_mb': integer(0),
  'progress_bar': boolean,
}

# By the last part of the key, so that format-specific keys are found both
# as `dataset.<key>` and under `dataset.<format>.<key>`.
DATASET = {
  'name': string,
  'path': string,
  'valid_path': string,
  'test_path': string,
  'cache_dir': string,
  'url': string,
  'seed': integer(0),
  'min_count': integer(-1),
  'chunk_rows': integer(1),
  'parse_workers': integer(-1),
  'skip_bad_lines': boolean,
  'log_bucket': boolean,
  'hour_features': boolean,
  'drop_id': boolean,
  'label_column': string,
  'numeric_columns': columns,
  'categorical_columns': columns,
  'sep': separator,
  'field_dims': integers(1),
  'side_features': columns,
  'float_columns': columns,
  'multi_hot_columns': columns,
  'multi_hot_sep': string,
  'multi_hot_max_len': integer(1),
  'numeric': one_of(('buckets', 'dense')),
}

# Constructor arguments of models/*.py, by name; others are checked against
# the type of their default value.
MODEL = {
  'embed_dim': integer(1),
  'atten_embed_dim': integer(1),
  'num_heads': integer(1),
  'num_experts': integer(1),
  'low_rank': optional(integer(1)),
  'order': integer(1),
  'lnn_dim': integer(1),
  'reduction_ratio': number(0, strict=True),
  'attn_size': integer(1),
  'cross_buckets': integer(1),
  'mlp_dims': integers(1),
  'mlp1_dims': integers(1),
  'mlp2_dims': integers(1),
  'fs_dims': integers(1),
  'fs1_context': integers(0),
  'fs2_context': integers(0),
  'cross_layer_sizes': integers(1),
  'dropout': rate,
  'attn_l2': number(0),
  'user_field_idx': optional_index,
  'item_field_idx': optional_index,
  'cross_fields': field_pairs,
  # Every string argument is one of a few names; a test holds each model's
  # string arguments to this list, or to their `typing.Literal` annotation
  # (model_rule).
  'linear_init': one_of(('lecun', 'torch')),
  'multi_pooling': one_of(('mean', 'sum')),
  'method': one_of(('inner', 'outer')),
  'structure': one_of(('parallel', 'stacked')),
  'lnn': one_of(('torchfm', 'paper')),
  'excitation': one_of(('relu', 'sigmoid')),
  'bilinear_type': one_of(('field_all', 'field_each', 'field_interaction')),
  'linear_type': one_of(('lw', 'felv', 'filv')),
}


def _check_resumed_batch_size(value: Any, num_devices: int) -> None:
  """Raises a ConfigError if a resume's batch does not split over its devices.

  A resume cannot change `batch_size` (workdir.check_resume refuses it), so
  what to change is the number of devices, not the config.
  """
  if not (is_int(value) and value >= 1 and value % num_devices):
    return
  fits = max(d for d in range(1, num_devices) if value % d == 0)
  raise ConfigError(
    f'config.batch_size={value} must be a multiple of the {num_devices}'
    ' devices of this run, and a resume keeps the batch size of its'
    f' checkpoints: resume on {fits} device{"s" * (fits > 1)} (or a count'
    f' that divides {value}), or start a new run in another workdir.'
  )


def thawed(config: Any) -> ml_collections.ConfigDict:
  """`config` as a ConfigDict that a run may change: a FrozenConfigDict is
  copied into one.

  Raises:
    ConfigError: `config` is no ConfigDict (a dict, a path, None).
  """
  if isinstance(config, ml_collections.FrozenConfigDict):
    return ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f'The config is a {type(config).__name__}, not an'
      " ml_collections.ConfigDict: pass what a config file's get_config()"
      ' returns, e.g. configs/fm.py (ml_collections.ConfigDict(d) converts'
      ' a dict d).'
    )
  return config


def validate_config(
  config: ml_collections.ConfigDict,
  *,
  dataset_names: Sequence[str] | None = None,
  optimizers: Sequence[str] = OPTIMIZERS,
  num_devices: int | None = None,
  resuming: bool = False,
) -> None:
  """Checks every key that can be checked without the data.

  Args:
    config: the run's config (see configs/default.py); keys it lacks are
      not checked, unless `dataset_names` is given.
    dataset_names: the accepted `dataset.name`s; None: not checked here.
      Given (a run's whole config), a config without a key that every run
      reads is refused, and a new run's valid config is warned of each key
      it sets but would not read (`config_unused.warn_unused`).
    optimizers: the accepted `optimizer`s.
    num_devices: the run's device count (all processes): `batch_size` must
      be a multiple of it; None: not checked here.
    resuming: the run resumes from its checkpoints, which hold the weights:
      `init_from` is not read, so not checked; and their `batch_size` stays,
      so one that `num_devices` does not divide is refused alone, naming
      the device counts that divide it.

  Raises:
    ConfigError: one message naming every bad key, its value and the rule.
  """
  missing = [k for k in (*TOP_LEVEL, 'optimizer', 'dataset') if k not in config]
  if missing and dataset_names is not None:  # A run's whole config.
    raise ConfigError(
      f'The config has no {", ".join(f"config.{k}" for k in missing)}: build'
      " it on configs/default.py's get_config(), as configs/fm.py does."
    )
  problems = []

  def check(key: str, value: Any, rule: Rule | None) -> None:
    expected = rule(value) if rule else None
    if expected:
      problems.append(f'config.{key}={value!r} must be {expected}')

  if dataset_names is not None:  # A config file's typo would be ignored.
    known = (*TOP_LEVEL, 'optimizer', 'dataset', 'model')
    for key in config:
      if key not in known:
        close = difflib.get_close_matches(key, known, 1)
        problems.append(
          f'config.{key} is no key of configs/default.py'
          + (f' (did you mean {close[0]}?)' if close else '')
        )
  for key, rule in TOP_LEVEL.items():
    if key in config:
      check(key, config[key], rule)
  if 'optimizer' in config:
    check('optimizer', config.optimizer, one_of(optimizers))
  if num_devices and resuming:
    _check_resumed_batch_size(config.get('batch_size'), num_devices)
  # Only the train batch: evaluation pads its batches to split evenly
  # (programs.eval_batch_size).
  value = config.get('batch_size')
  if num_devices and is_int(value) and value >= 1 and value % num_devices:
    problems.append(
      f'config.batch_size={value} must be a multiple of the {num_devices}'
      ' devices of this run'
    )
  if not resuming:
    problems += _init_from_problems(config.get('init_from'))
  problems += _model_problems(config)
  if 'dataset' in config:
    problems += _dataset_problems(config.dataset, dataset_names, check)
  if problems:
    raise ConfigError(
      f'{len(problems)} bad config value{"s" * (len(problems) > 1)}: '
      + '; '.join(problems)
      + f'. Fix {"them" if len(problems) > 1 else "it"} in the config file or'
      ' with --config.<key>=<value>.'
    )
  if dataset_names is not None and not resuming:  # A new run's config.
    config_unused.warn_unused(config)


def _init_from_problems(init_from: Any) -> list[str]:
  if not isinstance(init_from, str) or not init_from:
    return []
  best = os.path.join(os.path.expanduser(init_from), 'checkpoints', 'best')
  if os.path.isdir(best) and any(n.isdigit() for n in os.listdir(best)):
    return []
  return [
    f'config.init_from={init_from!r} must be the workdir of a run that saved'
    f' a best checkpoint ({best} has none)'
  ]


def _model_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The model file exists, accepts every `config.model` key and is given
  each argument that it has no default for."""
  name = config.get('model_name')
  if not isinstance(name, str):
    return []  # Reported by TOP_LEVEL.
  if name not in models.names():
    return [
      f'config.model_name={name!r} must name a file in models/: one of'
      f' {", ".join(models.names())}'
    ]
  model = config.get('model') or {}
  if isinstance(model, ml_collections.ConfigDict):
    model = model.to_dict()
  # Importing a model file costs well under a second; the data may cost
  # minutes.
  fields = {f.name: f for f in model_fields(name)}
  accepted = [k for k in fields if k not in TRAINER_SET]
  problems = []
  for key, value in model.items():
    where = f'config.model.{key}={value!r}'
    if key in TRAINER_SET:
      problems.append(f'{where}: remove it, the trainer sets it')
      continue
    if key not in fields:
      problems.append(
        f'{where}: models/{name}.py has no such argument; it takes'
        f' {", ".join(accepted) or "none"}'
      )
      continue
    rule = model_rule(fields[key])
    expected = rule(value) if rule else None
    if expected:
      problems.append(f'{where} must be {expected}')
  missing = dataclasses.MISSING
  for key in accepted:  # Else Model(...) raises a TypeError at start-up.
    field = fields[key]
    if key not in model and field.default is field.default_factory is missing:
      problems.append(
        f'config.model.{key} is not set, and models/{name}.py has no default'
        ' for it: add it to config.model in the config file'
      )
  return problems


def model_fields(name: str) -> tuple[dataclasses.Field, ...]:
  """The constructor arguments of the `Model` of `models/<name>.py`.

  Raises:
    ConfigError: the file stops at its import (a syntax error, a module
      not installed), naming its line; or has no `Model` linen module.
  """
  path, module = f'models/{name}.py', f'models.{name}'
  try:
    importlib.import_module(module)
  except Exception as e:
    line = e.lineno if isinstance(e, SyntaxError) else None
    origin = importlib.util.find_spec(module).origin
    for frame in traceback.extract_tb(e.__traceback__):
      if frame.filename == origin:  # The file's last line before the error.
        line = frame.lineno
    what = str(e.msg if isinstance(e, SyntaxError) else e).rstrip('.')
    raise ConfigError(
      f'{path}{f":{line}" if line else ""}: {type(e).__name__}: {what}.'
      f' Fix {path}, the file of config.model_name={name!r}.'
    ) from e
  import model_contract  # Here: it imports JAX, which the rest never needs.

  try:
    return dataclasses.fields(model_contract.model_class(name))
  except ValueError as e:  # No Model, or not a linen module.
    raise ConfigError(str(e)) from e


def model_rule(field: dataclasses.Field) -> Rule | None:
  """The rule of a model's constructor argument.

  The names of its `typing.Literal` annotation (a new model's string
  choices need no entry here), else its entry in MODEL, else (`dropouts`)
  as many rates as its default, else the type of its default.
  """
  if typing.get_origin(field.type) is typing.Literal:
    return one_of(tuple(str(a) for a in typing.get_args(field.type)))
  if field.name in MODEL:
    return MODEL[field.name]
  default = field.default
  if field.name == 'dropouts':
    return rates(len(default) if is_sequence(default) else None)
  return _rule_like(default)


def _rule_like(default: Any) -> Rule | None:
  """A type check from a constructor argument's default value."""
  if isinstance(default, bool):
    return boolean
  if is_int(default):
    return integer(0)
  if isinstance(default, float):
    return number(-math.inf)
  if isinstance(default, str):
    return string
  return None


def check_model_name_override(config: ml_collections.ConfigDict) -> None:
  """Refuses a `--config.model_name` whose model `config.model` is not for.

  A config file fills `config.model` with every argument of its own model
  (configs/default.py's `with_model_arguments`), so that a flag can set
  each. Another model would train at its own defaults for the arguments
  that config lacks (not configs/dcnv2.py's 16-16 layers but 500-500-500),
  which no flag could set. Models of the same arguments (fm, ffm) pass.

  Raises:
    ConfigError: naming the keys and the model's config file.
  """
  name = config.get('model_name')
  if not isinstance(name, str) or name not in models.names():
    return  # validate_config names it.
  model = config.get('model') or {}
  fields = model_fields(name)
  takes = {f.name for f in fields if f.name not in TRAINER_SET}
  defaults = {
    f.name
    for f in fields
    if f.name in takes and f.default not in (None, dataclasses.MISSING)
  }
  missing, extra = sorted(defaults - set(model)), sorted(set(model) - takes)
  if not (missing or extra):
    return
  why = []
  if missing:
    why.append(f'lacks {", ".join(missing)}, which no flag could then set')
  if extra:
    why.append(f'has {", ".join(extra)}, which models/{name}.py does not take')
  files = [
    f'--config=configs/{path.name}'
    for path in sorted((pathlib.Path(__file__).parent / 'configs').glob('*.py'))
    if path.name != 'default.py'
    and f"model_name = '{name}'" in path.read_text(encoding='utf-8')
  ]
  raise ConfigError(
    f'--config.model_name={name}: config.model holds the arguments of the'
    f" config file's model; it {' and '.join(why)}. Pick the model by its"
    f' config file instead: {" or ".join(files) or "one of that model"}.'
  )


def _dataset_problems(
  dataset: Any, names: Sequence[str] | None, check: Callable
) -> list[str]:
  """Problems of `config.dataset` (per-key ones go through `check`)."""
  if isinstance(dataset, ml_collections.ConfigDict):
    dataset = dataset.to_dict()
  problems = []

  def walk(node: dict, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        check(f'dataset.{prefix}{key}', value, DATASET.get(key))

  walk(dataset, '')
  name = dataset.get('name')
  if names is not None and isinstance(name, str) and name not in names:
    problems.append(
      f'config.dataset.name={name!r} must be one of {", ".join(names)}'
    )
  valid, test = dataset.get('valid_path'), dataset.get('test_path')
  if bool(valid) != bool(test):
    problems.append(
      'config.dataset.valid_path and config.dataset.test_path must be set'
      ' both (predefined validation and test files) or neither (a random'
      f' split of dataset.path); got {valid!r} and {test!r}'
    )
  path = dataset.get('path')
  # A libfm directory may hold its own validation and test files.
  predefined = bool(valid and test) or (
    name == 'libfm' and isinstance(path, str) and os.path.isdir(path)
  )
  problems += _split_problems(dataset.get('split'), predefined)
  return problems


def _split_problems(split: Any, predefined: bool) -> list[str]:
  where = f'config.dataset.split={split!r}'
  if not (
    is_sequence(split)
    and len(split) == 3
    and all(is_number(f) and f >= 0 for f in split)
    and abs(sum(split) - 1) <= 1e-6
  ):
    return [
      f'{where} must be three non-negative fractions of train, validation'
      ' and test summing to 1, e.g. (0.8, 0.1, 0.1)'
    ]
  if not predefined and min(split) == 0:
    return [
      f'{where} must give every part a fraction > 0: training needs'
      ' examples, early stopping validation examples, the final score test'
      ' examples (or set dataset.valid_path and dataset.test_path)'
    ]
  return []
