"""Warns of config keys that a run is given but never reads.

A key set beside another that switches off what it configures (a multi-hot
separator without multi-hot columns, `table_learning_rate` with an
optimizer other than 'rowwise_adagrad') trains as if it were not given.
`warn_unused` names each such key, its value and why, once before training:
`config_check.validate_config` calls it on a new run's valid config.
Set means other than configs/default.py's value (format keys: their
datasets/<format>.py default; model keys: the model file's default).

What the data's files decide is warned of where the data loads (data.py):
`config.dataset.split` and `seed` beside predefined validation and test
files, `criteo.log_bucket=False` with `numeric='dense'`.
"""

from collections.abc import Sequence
import dataclasses
import functools
import importlib
from typing import Any

from absl import logging
import ml_collections

import data
from datasets import core

# Keys of a model that another of its arguments switches off: model_name:
# (the switch, its value that switches them off, the keys, what that value
# does, how to switch them on).
MODEL_SWITCHES = {
  'finalmlp': (
    'use_fs',
    False,
    ('fs_dims', 'fs1_context', 'fs2_context'),
    'builds no feature-selection gate',
    'use_fs=True',
  ),
  'dcnv2': (
    'low_rank',
    None,
    ('num_experts',),
    'keeps the cross layers full rank, without the mixture of low-rank experts',
    'low_rank to a rank, e.g. 32',
  ),
  'wd': (
    'cross_fields',
    (),
    ('cross_buckets',),
    'adds no cross-product feature to hash',
    'cross_fields to pairs of field indices, e.g. ((0, 1),)',
  ),
}


@functools.cache
def _default() -> ml_collections.ConfigDict:
  """configs/default.py's config (read, never changed). Imported here:
  configs/default.py imports this project's modules."""
  return importlib.import_module('configs.default').get_config()


def _changed(
  options: Any, defaults: Any, keys: Sequence[str]
) -> list[tuple[str, Any]]:
  """`(key, value)` of each of `keys` that `options` sets other than
  `defaults` does."""
  values = [(key, options.get(key, defaults[key])) for key in keys]
  return [(k, v) for k, v in values if not _same(v, defaults[k])]


def _same(a: Any, b: Any) -> bool:
  """`a == b`, a list equal to a tuple of the same items (a flag's value)."""
  if isinstance(a, Sequence) and not isinstance(a, str):
    return (
      isinstance(b, Sequence)
      and not isinstance(b, str)
      and len(a) == len(b)
      and all(_same(x, y) for x, y in zip(a, b, strict=True))
    )
  return a == b


def unused(config: ml_collections.ConfigDict) -> list[str]:
  """What `warn_unused` warns of: one line per key set but not read."""
  dataset = config.get('dataset') or ml_collections.ConfigDict()
  return [
    *_dataset_unused(dataset),
    *_optimizer_unused(config),
    *_model_unused(config),
  ]


def warn_unused(config: ml_collections.ConfigDict) -> None:
  """Logs a warning for each key of `config` that the run will not read.

  Not an error: the run trains as it would without the key, and a run
  recorded with it still resumes.
  """
  for message in unused(config):
    logging.warning('%s', message)


def _dataset_unused(dataset: ml_collections.ConfigDict) -> list[str]:
  out = []
  fmt = data.FORMAT_OF.get(dataset.get('name'))
  if fmt == 'csv':
    csv = data.SOURCES['csv']
    options = dataset.get('csv') or {}
    if not core.name_list(options.get('multi_hot_columns', ())):
      keys = ('multi_hot_sep', 'multi_hot_max_len')
      for key, value in _changed(options, csv.DEFAULTS, keys):
        out.append(
          f'config.dataset.csv.{key}={value!r} has no effect:'
          ' config.dataset.csv.multi_hot_columns is empty, so no column is'
          ' read as a list. Name the list columns there, or leave'
          f' {key} at its default {csv.DEFAULTS[key]!r}.'
        )
    if options.get('log_bucket', True) is False and not core.name_list(
      options.get('numeric_columns', ())
    ):
      out.append(
        'config.dataset.csv.log_bucket=False has no effect: it keeps the'
        ' integers of config.dataset.csv.numeric_columns unbucketed, and'
        ' numeric_columns is empty (no other column is bucketed).'
      )
  out += _url_unused(dataset, fmt)
  if fmt == 'movielens':  # Read whole, in memory (datasets/movielens.py).
    keys = ('skip_bad_lines', 'chunk_rows', 'parse_workers')
    for key, value in _changed(dataset, _default().dataset, keys):
      out.append(
        f'config.dataset.{key}={value!r} has no effect: {dataset.name}'
        ' is read whole, in memory, and stops at its first malformed'
        ' line; the key serves criteo, avazu, libfm and csv files.'
      )
  min_count = dataset.get('min_count', -1)
  if (
    fmt == 'movielens'
    and min_count != -1
    and not core.name_list(dataset.get('side_features') or ())
  ):
    out.append(
      f'config.dataset.min_count={min_count} has no effect:'
      f' {dataset.name} keeps every user and movie (as pytorch-fm);'
      ' min_count applies to side features only, and'
      ' config.dataset.side_features is empty.'
    )
  return out


def _url_unused(dataset: ml_collections.ConfigDict, fmt: str | None) -> list:
  """`config.dataset.url`: read only to download a GroupLens archive."""
  default = _default()
  url = dataset.get('url', default.dataset.url)
  name = dataset.get('name')
  downloads = fmt == 'movielens' and name != 'ml-latest-small'
  if _same(url, default.dataset.url) or (downloads and not dataset.get('path')):
    return []
  why = 'config.dataset.path is given' if downloads else f'{name} is not one'
  return [
    f'config.dataset.url={url!r} has no effect: it is the base URL of the'
    ' GroupLens archives, read only to download ml-100k, ml-1m, ml-20m or'
    f' ml-25m, and {why}. To download a file, give its http(s) URL as'
    ' config.dataset.path (valid_path, test_path).'
  ]


def _optimizer_unused(config: ml_collections.ConfigDict) -> list[str]:
  default = _default()
  optimizer = config.get('optimizer', default.optimizer)
  value = config.get('table_learning_rate', default.table_learning_rate)
  if optimizer == 'rowwise_adagrad' or _same(
    value, default.table_learning_rate
  ):
    return []
  picks = (
    " ('auto' picks 'adam' or 'lazy_adam', never 'rowwise_adagrad')"
    if optimizer == 'auto'
    else ''
  )
  return [
    f'config.table_learning_rate={value!r} has no effect: only'
    " config.optimizer='rowwise_adagrad' reads it (its step size on the"
    f' tables), and config.optimizer is {optimizer!r}{picks}; the tables'
    ' train at config.learning_rate. Set optimizer=rowwise_adagrad, or leave'
    f' table_learning_rate at its default {default.table_learning_rate}.'
  ]


def _model_unused(config: ml_collections.ConfigDict) -> list[str]:
  name = config.get('model_name')
  if name not in MODEL_SWITCHES:
    return []
  switch, off, keys, does, how = MODEL_SWITCHES[name]
  model = config.get('model') or {}
  fields = {
    f.name: f.default
    for f in dataclasses.fields(importlib.import_module(f'models.{name}').Model)
  }
  if not _same(model.get(switch, fields[switch]), off):
    return []
  return [
    f'config.model.{key}={value!r} has no effect: config.model.'
    f'{switch}={model.get(switch, off)!r} {does} (models/{name}.py). Set'
    f' {how}, or leave {key} at its default {fields[key]!r}.'
    for key, value in _changed(model, fields, keys)
  ]
