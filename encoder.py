"""The saved encoder: what turns a raw row into model ids, kept with a run.

`save(workdir, dataset, config)` writes `workdir/encoder/`, everything that
encoding new rows and rebuilding the model take, without the dataset or its
cache:

- `encoder.json`: `version` (of this layout), the dataset `name`, its
  `format` and format `options`, `min_count`, `field_names`, `field_dims`,
  `vocabulary_sizes` and `oov_ids` (per field: the number of kept keys and
  the id of every other value, `null` when the field has none),
  `keys_are_ids` (libFM with `field_dims`: no vocabulary), `rules`
  (in words: how a raw value becomes a key, which integers share a bucket,
  what the label is) and the model (`model_name`, `model`: its constructor
  arguments).
- `vocabulary.npy`: int64, every field's kept keys in id order, end to end:
  field `f`'s keys are the `vocabulary_sizes[f]` after those of the fields
  before it, and key `vocabulary[f][i]` has id `i`. Absent when the ids are
  the keys themselves, or when the dataset was built in memory without one
  (the run then predicts encoded ids only).

JSON and a plain `.npy`, no pickle. `load(workdir)` returns the `Encoder`;
it parses raw rows (a file in the run's format, or a pandas DataFrame) with
the source's own reader (datasets/<format>.py), so a row gets exactly the
keys it got in training, and looks the keys up: a value that training did
not keep gets its field's out-of-vocabulary id.
"""

from collections.abc import Iterator
import csv as csv_module
import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np
import pandas as pd

import data
from datasets import core
from datasets import csv
from datasets import encode
from datasets import libfm
from datasets import movielens
from datasets import text
import utils

VERSION = 1
DIRECTORY = 'encoder'

_HASH = (
  'key of a categorical string: pandas.util.hash_array(values, encoding='
  "'utf8', hash_key='0123456789123456', categorize=True) viewed as int64"
)
_INT_BUCKETS = (
  'key of an integer v: int(math.log(v) ** 2) if v > 2, else v - 2 (as'
  ' pytorch-fm); empty: -2**63'
)
_INT_RAW = 'key of an integer: the integer; empty: -2**63'


def _rules(fmt: str, options: dict) -> dict[str, str]:
  """How raw values become keys and labels, in words, for encoder.json."""
  ints = _INT_BUCKETS if options.get('log_bucket', True) else _INT_RAW
  if fmt == 'movielens':
    return {
      'keys': 'the raw user id and movie id',
      'label': 'rating > 3 is a positive',
    }
  if fmt == 'libfm':
    keys = (
      'the feature index minus the offset of its field (the ids)'
      if options.get('field_dims')
      else "the feature index of the line's k-th feature, for field k"
    )
    return {'keys': keys, 'label': 'a label > 0 is a positive'}
  rules = {'categorical': _HASH, 'label': '1 is a positive, 0 or -1 not'}
  if fmt == 'avazu':
    rules['hour'] = (
      'hour_of_day and weekday (0 = Monday) of hour YYMMDDHH'
      if options.get('hour_features', True)
      else _HASH
    )
  else:
    rules['integer'] = ints
  return rules


@dataclasses.dataclass(frozen=True)
class Rows:
  """Encoded rows: ids int32 `[n, fields]`, and 0/1 labels float32 `[n]`
  when the rows have a label (else None)."""

  ids: np.ndarray
  labels: np.ndarray | None


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples that configs and flax modules hold."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _raise(where: str, reason: str) -> None:
  """Bad rows stop prediction: an output line per input row is promised."""
  raise core.DataError(f'{where}: {reason}')


def _first_line(path: str) -> bytes:
  """The first line of `path` that is not blank (b'' if none)."""
  for line in encode.text_lines(path):
    if line.strip():
      return line
  return b''


def _is_labeled(reader) -> bool:
  return reader.labeled if hasattr(reader, 'labeled') else bool(reader.label)


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A run's encoder (see the module docstring).

  Attributes:
    name: `config.dataset.name`.
    format: its format, the source module datasets/<format>.py.
    options: its format options, `config.dataset.<format>`.
    min_count: values seen fewer times in training got the OOV id.
    field_names: one per field.
    field_dims: ids of field `f` are in `[0, field_dims[f])`.
    vocabulary: per field, the kept keys in id order (int64); None when the
      keys are the ids (libFM with `field_dims`) or when the dataset had
      none (built in memory): such an encoder cannot encode raw rows.
    model_name: the model file, `models/<model_name>.py`.
    model: its constructor arguments besides `field_dims`.
    keys_are_ids: the keys are the ids (libFM with `field_dims`).
  """

  name: str
  format: str
  options: dict
  min_count: int
  field_names: tuple[str, ...]
  field_dims: tuple[int, ...]
  vocabulary: tuple[np.ndarray, ...] | None
  model_name: str
  model: dict
  keys_are_ids: bool = False

  @property
  def oov_ids(self) -> tuple[int | None, ...]:
    """Per field, the id of values not kept in training (None: no such id)."""
    if self.vocabulary is None:
      return (None,) * len(self.field_dims)
    return tuple(
      len(v) if len(v) < d else None
      for v, d in zip(self.vocabulary, self.field_dims, strict=True)
    )

  def model_config(self) -> ml_collections.ConfigDict:
    """`model_name` and `model`, the keys that `train.create_model` reads."""
    return ml_collections.ConfigDict(
      {'model_name': self.model_name, 'model': dict(self.model)}
    )

  def write(self, directory: str) -> str:
    """Writes encoder.json and vocabulary.npy into `directory`; returns it."""
    vocabulary = self.vocabulary
    sizes = None if vocabulary is None else [len(v) for v in vocabulary]
    meta = {
      'version': VERSION,
      'name': self.name,
      'format': self.format,
      'options': self.options,
      'min_count': self.min_count,
      'field_names': list(self.field_names),
      'field_dims': list(self.field_dims),
      'vocabulary_sizes': sizes,
      'keys_are_ids': self.keys_are_ids,
      'oov_ids': list(self.oov_ids),
      'rules': _rules(self.format, self.options),
      'model_name': self.model_name,
      'model': self.model,
    }
    os.makedirs(directory, exist_ok=True)
    # Vocabulary first: encoder.json, written last, says what it must hold.
    path = os.path.join(directory, 'vocabulary.npy')
    if self.vocabulary is not None:
      with open(path + '.tmp', 'wb') as f:
        flat = np.concatenate([np.zeros(0, np.int64), *self.vocabulary])
        np.save(f, flat, allow_pickle=False)
      os.replace(path + '.tmp', path)
    elif os.path.exists(path):
      os.remove(path)
    path = os.path.join(directory, 'encoder.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(meta, f, indent=1)
    os.replace(path + '.tmp', path)
    return directory

  def encode_keys(self, keys: np.ndarray) -> np.ndarray:
    """Ids int32 `[n, fields]` of int64 keys `[n, fields]` (unkept: OOV)."""
    if self.vocabulary is None and not self.keys_are_ids:
      raise utils.UserError(
        f'The encoder of this {self.name} run has no vocabulary (its dataset'
        ' was built in memory): it cannot encode raw rows; pass ids.'
      )
    return encode.encode_ids(self.vocabulary, keys)

  def reader(self, path: str) -> core.Reader:
    """The source's reader of the rows in file `path`, with or without label.

    Raises:
      DataError: the file's fields differ from the run's.
    """
    options = ml_collections.ConfigDict(self.options)
    if self.format == 'movielens':
      reader = movielens.Reader(movielens.RATINGS_FILE[self.name][1])
    elif self.format == 'libfm':
      dims = tuple(int(d) for d in options.field_dims)
      reader = libfm.Reader(len(self.field_names), dims)
    elif self.format == 'csv':
      reader = self._in_order(csv.reader(options, path, require_label=False))
    else:
      reader = data.SOURCES[self.format].reader(options, path)
    if not hasattr(reader, 'line_batches'):  # Parquet: chose by its schema.
      with core.reading(path):
        reader = reader.for_rows(_first_line(path))
    self._check_fields(reader.field_names, path)
    return reader

  def _in_order(self, table: text.Table) -> text.Table:
    """`table` with its fields in the run's order (a CSV's columns may be
    in any order)."""
    if sorted(table.field_names) != sorted(self.field_names):
      return table
    by_name = {field.name: field for field in table.fields}
    fields = tuple(by_name[name] for name in self.field_names)
    return dataclasses.replace(table, fields=fields)

  def _check_fields(self, names: tuple[str, ...], where: str) -> None:
    if tuple(names) != self.field_names:
      raise core.DataError(
        f'{where}: its fields {", ".join(names)} differ from those the model'
        f' was trained on: {", ".join(self.field_names)}.'
      )

  def chunks(self, path: str, chunk_rows: int = 100_000) -> Iterator[Rows]:
    """The encoded rows of file `path`, in order, `chunk_rows` lines at a time.

    Memory does not grow with the file. A malformed line stops with a
    DataError that names the file and line.
    """
    reader = self.reader(path)
    labeled = _is_labeled(reader)
    desc = f'predict {os.path.basename(path)}'
    for keys, labels in encode.chunks(reader, path, chunk_rows, _raise, desc):
      yield Rows(self.encode_keys(keys), labels if labeled else None)

  def encode(self, rows: pd.DataFrame | str) -> Rows:
    """Encodes a DataFrame of raw values, or a whole file (its path).

    A DataFrame has the columns of the run's files, named as in their
    header (Criteo: label, I1..I13, C1..C26; Avazu: click, hour, C1, ...;
    CSV: its header's), MovieLens `user`, `item` (and `rating`), libFM
    `field0`, `field1`, ... (the feature indices, and `label`). The label
    column is optional; a missing value is an empty (None or NaN) cell.
    """
    if isinstance(rows, (str, os.PathLike)):
      parts = list(self.chunks(os.fspath(rows)))
      labels = [p.labels for p in parts]
      ids = [p.ids for p in parts] or [np.zeros((0, len(self.field_dims)))]
      return Rows(
        np.concatenate(ids).astype(np.int32),
        None
        if not parts or any(x is None for x in labels)
        else np.concatenate(labels),
      )
    reader, lines = self._frame_lines(rows)
    labeled = _is_labeled(reader)
    keys, labels = reader.parse(
      lines, 1, lambda n: f'DataFrame row {n - 1}', _raise
    )
    return Rows(self.encode_keys(keys), labels if labeled else None)

  def _frame_lines(self, frame: pd.DataFrame) -> tuple[Any, list[bytes]]:
    """The source's reader of `frame` and its rows as lines of that format."""
    options = ml_collections.ConfigDict(self.options)
    names = [str(c) for c in frame.columns]
    sep, quoting = ' ', csv_module.QUOTE_NONE
    if self.format == 'movielens':
      labeled = 'rating' in names
      reader = movielens.Reader(',', labeled)
      frame = frame.assign(timestamp=0)
      columns = ['user', 'item'] + (['rating', 'timestamp'] if labeled else [])
      sep = ','
    elif self.format == 'libfm':
      labeled = 'label' in names
      dims = tuple(int(d) for d in options.field_dims)
      reader = libfm.Reader(len(self.field_names), dims, labeled)
      columns = (['label'] if labeled else []) + list(self.field_names)
    else:
      if self.format == 'csv':
        table = self._in_order(
          csv.table(options, names, 'the DataFrame', require_label=False)
        )
      else:
        table = data.SOURCES[self.format].reader(options, '')
        if table.label not in names:
          table = table.without_label()
      reader = dataclasses.replace(table, header=False)
      needed = [table.label] if table.label else []
      needed += [f.column for f in table.fields if f.column not in needed]
      missing = [c for c in needed if c not in names]
      if missing:
        raise core.DataError(
          f'The DataFrame has no column {", ".join(missing)}; the run reads'
          f' {", ".join(needed)}.'
        )
      frame = frame.reindex(columns=list(table.columns), fill_value='')
      columns, sep = list(table.columns), table.sep
      if table.quoting:
        quoting = csv_module.QUOTE_MINIMAL
    missing = [c for c in columns if c not in frame.columns]
    if missing:
      raise core.DataError(f'The DataFrame has no column {", ".join(missing)}.')
    self._check_fields(reader.field_names, 'The DataFrame')
    frame = frame[columns].apply(_integral)
    body = frame.to_csv(
      sep=sep, header=False, index=False, lineterminator='\n', quoting=quoting
    )
    return reader, [line + b'\n' for line in body.encode().split(b'\n')[:-1]]


def _integral(column: pd.Series) -> pd.Series:
  """A float column of whole numbers (NaN: missing) as nullable integers.

  pandas turns an integer column with a missing value into floats, written
  `3.0`, which the integer parsers reject.
  """
  if column.dtype.kind != 'f':
    return column
  values = column.to_numpy()
  finite = values[np.isfinite(values)]
  if np.all(finite == np.round(finite)) and np.all(
    np.abs(finite) < text.INT_LIMIT
  ):
    return column.astype('Int64')
  return column


def save(
  workdir: str, dataset: core.Dataset, config: ml_collections.ConfigDict
) -> str:
  """Writes the encoder of `dataset` and `config`'s model into `workdir`.

  Args:
    workdir: the run's directory.
    dataset: the loaded dataset (its `vocabulary` is required).
    config: the run's config (`dataset`, `model_name`, `model`).

  Returns:
    The encoder's directory, `workdir/encoder`.
  """
  _, dataset_config, options = data.resolve(config.dataset)
  fmt = data.FORMAT_OF[dataset_config.name]
  options = options.to_dict()
  identity = fmt == 'libfm' and bool(options.get('field_dims'))
  vocabulary = None
  if not identity and dataset.vocabulary is not None:
    vocabulary = [np.asarray(v, np.int64).ravel() for v in dataset.vocabulary]
  encoder = Encoder(
    name=dataset_config.name,
    format=fmt,
    options=options,
    min_count=int(dataset_config.min_count),
    field_names=tuple(dataset.field_names),
    field_dims=tuple(int(d) for d in dataset.field_dims),
    vocabulary=None if vocabulary is None else tuple(vocabulary),
    model_name=config.model_name,
    model=config.model.to_dict(),
    keys_are_ids=identity,
  )
  return encoder.write(os.path.join(workdir, DIRECTORY))


def load(path: str) -> Encoder:
  """The encoder saved in run directory `path` (or in `path/encoder`).

  Raises:
    UserError: no encoder there, or one of a newer layout or damaged.
  """
  directory = path
  if not os.path.isfile(os.path.join(directory, 'encoder.json')):
    directory = os.path.join(path, DIRECTORY)
  try:
    with open(os.path.join(directory, 'encoder.json')) as f:
      meta = json.load(f)
  except FileNotFoundError as e:
    raise utils.UserError(
      f'{path}: no encoder.json in it or in its {DIRECTORY}/ directory; is'
      ' it the workdir of a finished training run (or an export)?'
    ) from e
  except (OSError, ValueError) as e:
    raise utils.UserError(f'{directory}/encoder.json: unreadable ({e}).') from e
  if meta.get('version', VERSION + 1) > VERSION:
    raise utils.UserError(
      f'{directory}/encoder.json: layout version {meta.get("version")} is'
      f' newer than this code reads ({VERSION}); update the code.'
    )
  vocabulary = None
  if meta['vocabulary_sizes'] is not None:
    flat = np.load(
      os.path.join(directory, 'vocabulary.npy'), allow_pickle=False
    )
    sizes = meta['vocabulary_sizes']
    if flat.dtype != np.int64 or flat.shape != (sum(sizes),):
      raise utils.UserError(
        f'{directory}/vocabulary.npy: {flat.dtype} {flat.shape}, expected'
        f' int64 ({sum(sizes)},) as encoder.json says.'
      )
    vocabulary = tuple(np.split(flat, np.cumsum(sizes)[:-1]))
  return Encoder(
    name=meta['name'],
    format=meta['format'],
    options=_tuples(meta['options']),
    min_count=meta['min_count'],
    field_names=tuple(meta['field_names']),
    field_dims=tuple(meta['field_dims']),
    vocabulary=vocabulary,
    model_name=meta['model_name'],
    model=_tuples(meta['model']),
    keys_are_ids=meta.get('keys_are_ids', False),
  )
