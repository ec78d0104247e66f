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
- With multi-hot or numeric fields (CSV `float_columns` and
  `multi_hot_columns`, Criteo `numeric='dense'`, MovieLens
  `side_features`), encoder.json also holds `multi_field_names`,
  `multi_field_dims`, `multi_vocabulary_sizes`, `multi_oov_ids`, `max_len`,
  `multi_hot_sep`, `dense_names`, `dense_mean`, `dense_std`,
  `side_features` and `side_tables`, and `.npy` files beside it hold the
  multi-hot vocabularies and MovieLens's per-user and per-movie tables
  (encoder_side.py).

JSON and plain `.npy`, no pickle; layout version 1 (ids only) still loads.
`load(workdir)` returns the `Encoder`; it parses raw rows (a file in the
run's format, or a pandas DataFrame written as lines of that format by
encoder_frames.py) with the source's own reader (datasets/<format>.py), so
a row gets exactly the keys it got in training, and looks the keys up: a
value that training did not keep gets its field's out-of-vocabulary id.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

import data
from datasets import core
from datasets import csv
from datasets import encode
from datasets import libfm
from datasets import movielens
from datasets import streaming
from datasets import text
import encoder_frames
import encoder_side
import utils

if TYPE_CHECKING:
  import pandas as pd

# 2: multi-hot and numeric fields. Version 1 encoders (ids only) still load.
VERSION = 2
DIRECTORY = 'encoder'


@dataclasses.dataclass(frozen=True)
class Rows:
  """Encoded rows: the model's inputs, and their labels.

  Attributes:
    ids: int32 `[n, fields]`.
    labels: 0/1 float32 `[n]` when the rows have a label, else None.
    multi_ids: int32 `[n, multi_fields, max_len]`, -1 padding; None without
      multi-hot fields.
    dense: float32 `[n, dense_fields]`, standardised; None without numeric
      fields.
  """

  ids: np.ndarray
  labels: np.ndarray | None
  multi_ids: np.ndarray | None = None
  dense: np.ndarray | None = None

  def inputs(self) -> dict[str, np.ndarray]:
    """`ids`, and `multi_ids` and `dense` when present: `model.apply`'s."""
    out = {'ids': self.ids, 'multi_ids': self.multi_ids, 'dense': self.dense}
    return {k: v for k, v in out.items() if v is not None}


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples that configs and flax modules hold."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _raise(where: str, reason: str) -> None:
  """Bad rows stop prediction: an output line per input row is promised."""
  if reason == 'missing label':  # E.g. a click column not filled in yet.
    reason += (
      ': give every row its 0/1 label, or leave the label column out to'
      ' score the rows unlabelled'
    )
  elif reason == 'missing rating':  # MovieLens: user, item[, rating, time].
    reason += (
      ': give every row its rating, or leave the rating and timestamp'
      ' columns out to score the rows unlabelled'
    )
  raise core.DataError(f'{where}: {reason}')


def _first_line(path: str) -> bytes:
  """The first line of `path` that is not blank (b'' if none)."""
  for line in streaming.text_lines(path):
    if line.strip():
      return line
  return b''


def is_labeled(reader) -> bool:
  """Whether the rows that `reader` parses have their label."""
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
    model: its constructor arguments besides `field_dims` and the inputs'
      (`model_config` adds `multi_field_dims` and `num_dense`).
    keys_are_ids: the keys are the ids (libFM with `field_dims`).
    side: the multi-hot and numeric fields (encoder_side.py).
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
  side: encoder_side.SideInputs = encoder_side.SideInputs()

  @property
  def oov_ids(self) -> tuple[int | None, ...]:
    """Per field, the id of values not kept in training (None: no such id)."""
    if self.vocabulary is None:
      return (None,) * len(self.field_dims)
    return tuple(
      len(v) if len(v) < d else None
      for v, d in zip(self.vocabulary, self.field_dims, strict=True)
    )

  @property
  def raw_field_names(self) -> tuple[str, ...]:
    """The one-hot fields of a raw row (MovieLens: user and item; the user
    side fields are looked up)."""
    if self.side.user_ids is not None:
      return self.field_names[:2]
    return self.field_names

  def row_options(self) -> ml_collections.ConfigDict:
    """The format's options for rows to score. A CSV run that read every
    other column (`categorical_columns` empty) reads the columns it was
    trained on, so that a file's other columns (a row id) are left out."""
    options = ml_collections.ConfigDict(self.options)
    if self.format == 'csv' and not csv.column_list(
      options.categorical_columns
    ):
      numeric = {str(c) for c in csv.column_list(options.numeric_columns)}
      categorical = [n for n in self.raw_field_names if n not in numeric]
      if categorical:
        options.categorical_columns = tuple(categorical)
    return options

  def model_config(self) -> ml_collections.ConfigDict:
    """`model_name` and `model`, the keys that `train.create_model` reads;
    `model` includes the inputs' `multi_field_dims` and `num_dense`."""
    model = {**self.model, **self.side.model_fields()}
    return ml_collections.ConfigDict(
      {'model_name': self.model_name, 'model': model}
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
      'rules': encoder_side.rules(self.format, self.options, self.side),
      'model_name': self.model_name,
      'model': self.model,
      **self.side.meta(),
      'multi_hot_sep': self.options.get('multi_hot_sep')
      if self.format == 'csv' and self.side.multi_field_names
      else None,
    }
    os.makedirs(directory, exist_ok=True)
    self.side.write(directory)
    # Vocabulary first: encoder.json, written last, says what it must hold.
    path = os.path.join(directory, 'vocabulary.npy')
    if self.vocabulary is not None:
      with utils.replace_file(path, 'wb') as f:
        flat = np.concatenate([np.zeros(0, np.int64), *self.vocabulary])
        np.save(f, flat, allow_pickle=False)
    elif os.path.exists(path):
      os.remove(path)
    path = os.path.join(directory, 'encoder.json')
    with utils.replace_file(path) as f:
      json.dump(meta, f, indent=1)
    return directory

  def encode_keys(self, keys: np.ndarray) -> np.ndarray:
    """Ids int32 `[n, fields]` of int64 keys `[n, fields]` (unkept: OOV).

    MovieLens with user side fields: keys `[n, 2]` of user and item.
    """
    if self.vocabulary is None and not self.keys_are_ids:
      raise utils.UserError(
        f'The encoder of this {self.name} run has no vocabulary (its dataset'
        ' was built in memory): it cannot encode raw rows; pass ids.'
      )
    vocabulary = self.vocabulary
    if vocabulary is not None:
      vocabulary = vocabulary[: keys.shape[1]]
    return encode.encode_ids(vocabulary, keys)

  def encode_parsed(
    self, keys: np.ndarray, labels: np.ndarray | None, parsed: Any = None
  ) -> Rows:
    """The encoded `Rows` of a reader's keys, labels and `core.Side`."""
    ids = self.encode_keys(keys)
    if self.side.features:
      ids, multi, dense = self.side.lookup(ids)
    else:
      multi, dense = self.side.encode(parsed, len(keys))
    return Rows(ids, labels, multi, dense)

  def reader(self, path: str) -> core.Reader:
    """The source's reader of the rows in file `path`, with or without label.

    Raises:
      DataError: the file's fields differ from the run's.
    """
    options = self.row_options()
    if self.format == 'movielens':
      reader = movielens.Reader(movielens.RATINGS_FILE[self.name][1])
    elif self.format == 'libfm':
      dims = tuple(int(d) for d in options.field_dims)
      reader = libfm.Reader(len(self.field_names), dims)
    elif self.format == 'csv':
      reader = self.in_order(csv.reader(options, path, require_label=False))
    else:
      reader = data.SOURCES[self.format].reader(options, path)
    if not hasattr(reader, 'line_batches'):  # Parquet: chose by its schema.
      with core.reading(path):
        reader = reader.for_rows(_first_line(path))
    self.check_fields(reader, path)
    return reader

  def _all_fields(self) -> tuple[str, ...]:
    """One-hot, multi-hot and numeric fields of a raw row, in that order."""
    if self.side.features:
      return self.raw_field_names
    return (
      self.raw_field_names + self.side.multi_field_names + self.side.dense_names
    )

  def in_order(self, table: text.Table) -> text.Table:
    """`table` with its fields in the run's order (a CSV's columns may be
    in any order)."""
    want = self._all_fields()
    by_name = {field.name: field for field in table.fields}
    if sorted(by_name) != sorted(want):
      return table
    fields = tuple(by_name[name] for name in want)
    return dataclasses.replace(table, fields=fields)

  def check_fields(self, reader: Any, where: str) -> None:
    """Raises DataError, naming `where`, if `reader`'s fields are not the
    run's."""
    names = tuple(reader.field_names)
    names += tuple(getattr(reader, 'multi_field_names', ()))
    names += tuple(getattr(reader, 'dense_names', ()))
    if names != self._all_fields():
      raise core.DataError(
        f'{where}: its fields {", ".join(names)} differ from those the model'
        f' was trained on: {", ".join(self._all_fields())}.'
      )

  def chunks(
    self, path: str, chunk_rows: int = 100_000, parse_workers: int = -1
  ) -> Iterator[Rows]:
    """The encoded rows of file `path`, in order, `chunk_rows` lines at a time.

    Memory does not grow with the file. A malformed line stops with a
    DataError that names the file and line. `parse_workers` as
    `config.dataset.parse_workers` (datasets/parallel.py).
    """
    reader = self.reader(path)
    labeled = is_labeled(reader)
    desc = f'predict {os.path.basename(path)}'
    parsed = streaming.chunks(
      reader, path, chunk_rows, _raise, desc, parse_workers
    )
    empty = True
    for keys, labels, *side in parsed:
      empty = False
      yield self.encode_parsed(keys, labels if labeled else None, *side)
    if empty:  # A chunk of no rows all the same: it says if rows have labels.
      keys = np.zeros((0, len(self.raw_field_names)), np.int64)
      labels = np.zeros(0, np.float32) if labeled else None
      yield self.encode_parsed(keys, labels)

  def encode(self, rows: pd.DataFrame | str) -> Rows:
    """Encodes a DataFrame of raw values, or a whole file (its path).

    A DataFrame has the columns of the run's files, named as in their
    header (Criteo: label, I1..I13, C1..C26; Avazu: click, hour, C1, ...;
    CSV: its header's), MovieLens `user`, `item` (and `rating`) or
    GroupLens's `userId`, `movieId` (as `pd.read_csv` of its ratings.csv
    gives; a frame with both names of one field is refused), libFM
    `field0`, `field1`, ... (the feature indices, and `label`). The label
    column is optional; a missing value is an empty (None or NaN) cell. A
    multi-hot cell is a string of values joined by the run's separator or
    a list of values. Values are keyed as written: read a CSV with
    `pd.read_csv(path, dtype=str, keep_default_na=False)`, or its `007`
    becomes `7` and its `NA`, `null` or `None` a missing value, and Parquet
    as training does, `pyarrow.parquet.read_table(path).to_pandas(
    integer_object_nulls=True)`: `pd.read_parquet` makes floats (`7.0`) of
    integers in a column or list column with a null.
    """
    if isinstance(rows, (str, os.PathLike)):
      parts = list(self.chunks(os.fspath(rows)))
      arrays = {
        f.name: [getattr(p, f.name) for p in parts]
        for f in dataclasses.fields(Rows)
      }
      return Rows(
        **{
          name: None
          if any(x is None for x in values)
          else np.concatenate(values)
          for name, values in arrays.items()
        }
      )
    reader, lines = encoder_frames.frame_lines(self, rows)
    labeled = is_labeled(reader)
    keys, labels, *side = reader.parse(
      lines, 1, lambda n: f'DataFrame row {n - 1}', _raise
    )
    return self.encode_parsed(keys, labels if labeled else None, *side)


def save(
  workdir: str,
  dataset: core.Dataset,
  config: ml_collections.ConfigDict,
  resuming: bool = False,
) -> str:
  """Writes the encoder of `dataset` and `config`'s model into `workdir`.

  Args:
    workdir: the run's directory.
    dataset: the loaded dataset (its `vocabulary` is required).
    config: the run's config (`dataset`, `model_name`, `model`).
    resuming: the run has checkpoints; an encoder saved with them must give
      the same ids (see `encoder_side.check_unchanged`; one of layout 1
      holds no side inputs to compare).

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
    side=encoder_side.from_dataset(dataset, fmt, dataset_config),
  )
  directory, saved = os.path.join(workdir, DIRECTORY), None
  with contextlib.suppress(utils.UserError):  # None, or damaged: rewritten.
    saved = load(directory) if resuming else None
  if saved is not None:  # Layout 1 kept no side inputs: theirs not compared.
    with open(os.path.join(directory, 'encoder.json')) as f:
      if json.load(f)['version'] < 2:
        saved = dataclasses.replace(saved, side=encoder.side)
  encoder_side.check_unchanged(saved, encoder)
  return encoder.write(directory)


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
  except (FileNotFoundError, NotADirectoryError) as e:  # A file: no run.
    raise utils.UserError(
      f'{path}: no encoder.json in it or in its {DIRECTORY}/ directory; is'
      ' it the workdir of a finished training run?'
    ) from e
  except (OSError, ValueError) as e:
    raise utils.UserError(f'{directory}/encoder.json: unreadable ({e}).') from e
  if not isinstance(version := meta.get('version'), int) or version > VERSION:
    raise utils.UserError(
      f'{directory}/encoder.json: layout version {version} is not one this'
      f' code reads (1 to {VERSION}): update the code if a newer one wrote'
      ' it; without a version the file is damaged.'
    )
  side = encoder_side.read(meta, directory, utils.UserError)
  vocabulary = None
  if meta['vocabulary_sizes'] is not None:
    path = os.path.join(directory, 'vocabulary.npy')
    try:
      flat = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise utils.UserError(f'{path}: unreadable ({e}).') from e
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
    side=side,
  )
