"""The saved encoder's multi-hot and numeric inputs (see encoder.py).

`SideInputs` turns the lists and numbers of raw rows into the model's
`multi_ids` int32 `[n, multi_fields, max_len]` and `dense` float32
`[n, dense_fields]`, exactly as preprocessing did:

- A multi-hot field keeps its training vocabulary: the kept keys in id
  order (a value's key is `keying.string_keys` of the stripped value); any
  other value gets the field's out-of-vocabulary id, `len(keys)`. A list
  keeps its first `max_len` values (the longest list of preprocessing, at
  most `multi_hot_max_len`) and -1 pads the rest; an empty cell is an empty
  list.
- A numeric field keeps the training split's mean and standard deviation:
  `dense = (value - mean) / std` in float32, and a missing value (an empty
  cell or NaN) is 0, the training mean.
- MovieLens side features (`config.dataset.side_features`) are looked up by
  the encoded user and movie ids: per user the ids of its fields (age,
  gender, ...; `user_ids`), per movie its multi-hot ids (`item_multi`) and
  raw numeric values (`item_dense`, NaN where missing). Each table has one
  more row, the last, for the out-of-vocabulary user or movie: OOV ids,
  empty lists, a missing value.

encoder.json holds the names, sizes and statistics (`meta`) and, in words,
the rules of every input (`rules`); the arrays are plain `.npy` files
beside it, no pickle.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from datasets import core
from datasets import encode
from datasets import movielens
from datasets import movielens_side
from datasets import remote
from datasets import side as side_lib
import utils

# The arrays in the encoder's directory, by attribute.
FILES = {
  'multi_vocabulary': 'multi_vocabulary.npy',
  'user_ids': 'side_user_ids.npy',
  'item_multi': 'side_item_multi_ids.npy',
  'item_dense': 'side_item_dense.npy',
}
_DTYPES = {
  'user_ids': np.int32,
  'item_multi': np.int32,
  'item_dense': np.float64,
}


@dataclasses.dataclass(frozen=True)
class SideInputs:
  """The multi-hot and numeric fields of a run (empty: ids only).

  Attributes:
    multi_field_names: one per multi-hot field.
    multi_vocabulary: per multi-hot field, its kept keys in id order.
    max_len: the last dimension of `multi_ids`.
    dense_names: one per numeric field.
    dense_mean: per numeric field, the training split's mean.
    dense_std: per numeric field, its standard deviation (1 if it was 0).
    features: MovieLens `side_features` (empty for other formats).
    user_ids: MovieLens: int32 `[users + 1, user fields]`, the ids of the
      fields after user and item, row `u` for user id `u`; None: none.
    item_multi: MovieLens: int32 `[items + 1, multi_fields, max_len]`.
    item_dense: MovieLens: float64 `[items + 1, dense_fields]`, raw.
  """

  multi_field_names: tuple[str, ...] = ()
  multi_vocabulary: tuple[np.ndarray, ...] = ()
  max_len: int = 0
  dense_names: tuple[str, ...] = ()
  dense_mean: tuple[float, ...] = ()
  dense_std: tuple[float, ...] = ()
  features: tuple[str, ...] = ()
  user_ids: np.ndarray | None = None
  item_multi: np.ndarray | None = None
  item_dense: np.ndarray | None = None

  @property
  def multi_field_dims(self) -> tuple[int, ...]:
    """Ids of multi-hot field `m` are in `[0, multi_field_dims[m])`."""
    return tuple(len(v) + 1 for v in self.multi_vocabulary)

  def model_fields(self) -> dict:
    """`multi_field_dims` and `num_dense`, the model's arguments, if any."""
    out = {}
    if self.multi_field_names:
      out['multi_field_dims'] = self.multi_field_dims
    if self.dense_names:
      out['num_dense'] = len(self.dense_names)
    return out

  def meta(self) -> dict:
    """The JSON keys of encoder.json that describe these inputs."""
    return {
      'multi_field_names': list(self.multi_field_names),
      'multi_field_dims': list(self.multi_field_dims),
      'multi_vocabulary_sizes': [len(v) for v in self.multi_vocabulary],
      'multi_oov_ids': [len(v) for v in self.multi_vocabulary],
      'max_len': self.max_len,
      'dense_names': list(self.dense_names),
      'dense_mean': list(self.dense_mean),
      'dense_std': list(self.dense_std),
      'side_features': list(self.features),
      'side_tables': {
        name: FILES[name] for name in _DTYPES if getattr(self, name) is not None
      },
    }

  def write(self, directory: str) -> None:
    """Writes the arrays into `directory` (and removes stale ones)."""
    arrays = dict.fromkeys(FILES)
    if self.multi_field_names:
      arrays['multi_vocabulary'] = np.concatenate(
        [np.zeros(0, np.int64), *self.multi_vocabulary]
      ).astype(np.int64)
    for name in _DTYPES:
      arrays[name] = getattr(self, name)
    for name, array in arrays.items():
      path = os.path.join(directory, FILES[name])
      if array is None:
        if os.path.exists(path):
          os.remove(path)
        continue
      with utils.replace_file(path, 'wb') as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)

  def encode(self, parsed: core.Side | None, n: int) -> tuple:
    """`(multi_ids, dense)` of `n` parsed rows (each None if no such field).

    Args:
      parsed: the reader's `core.Side` of the rows (None: it has none).
      n: the number of rows.
    """
    multi = dense = None
    if parsed is None:  # No rows (a reader without side fields has some).
      parsed = core.Side(
        np.zeros((n, len(self.multi_field_names), self.max_len), np.int64),
        np.zeros((n, len(self.dense_names))),
      )
    if self.multi_field_names:
      keys = parsed.multi[:, :, : self.max_len]
      if keys.shape[2] < self.max_len:
        width = ((0, 0), (0, 0), (0, self.max_len - keys.shape[2]))
        keys = np.pad(keys, width, constant_values=core.PAD_KEY)
      multi = encode.encode_multi(self.multi_vocabulary, keys)
    if self.dense_names:
      dense = self.standardized(parsed.dense, n)
    return multi, dense

  def standardized(self, raw: np.ndarray, n: int) -> np.ndarray:
    """float32 `[n, dense_fields]` of raw values (NaN: missing -> 0).

    Raises:
      side.OutOfRange: a value beyond float32's range, before or after.
    """
    if not n:
      return np.zeros((0, len(self.dense_names)), np.float32)
    mean = np.asarray(self.dense_mean, np.float64)
    std = np.asarray(self.dense_std, np.float64)
    pieces = side_lib.standardized(raw, mean, std, self.dense_names)
    return np.concatenate(list(pieces))

  def lookup(self, ids: np.ndarray) -> tuple:
    """MovieLens: `(ids, multi_ids, dense)` of user and movie ids `[n, 2]`.

    The returned ids add the user fields' ids to the two given.
    """
    if self.user_ids is not None:
      ids = np.concatenate([ids, self.user_ids[ids[:, 0]]], axis=1)
    multi = None if self.item_multi is None else self.item_multi[ids[:, 1]]
    dense = None
    if self.item_dense is not None:
      dense = self.standardized(self.item_dense[ids[:, 1]], len(ids))
    return ids, multi, dense


_HASH = (
  'key of a categorical string: pandas.util.hash_array(values, encoding='
  "'utf8', hash_key='0123456789123456', categorize=True) viewed as int64"
)
_INT_BUCKETS = (
  'key of an integer v: int(math.log(v) ** 2) if v > 2, else v - 2 (as'
  ' pytorch-fm); empty: -2**63'
)
_INT_RAW = 'key of an integer: the integer; empty: -2**63'


def _id_rules(fmt: str, options: dict) -> dict[str, str]:
  """How raw values become keys and labels, in words."""
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
  elif options.get('numeric') != 'dense' and (
    fmt != 'csv' or options.get('numeric_columns')
  ):  # Integer fields: Criteo's, unless numbers; a CSV's numeric_columns.
    rules['integer'] = ints
  return rules


def rules(fmt: str, options: dict, inputs: SideInputs) -> dict[str, str]:
  """How raw values become ids, lists and numbers, in words (encoder.json).

  Args:
    fmt: the format (datasets/<fmt>.py).
    options: its format options.
    inputs: the run's side inputs.
  """
  out = _id_rules(fmt, options)
  if not (fmt == 'libfm' and options.get('field_dims')):  # Else keys: ids.
    out['ids'] = (
      "vocabulary.npy (int64) holds each field's kept keys in ascending"
      ' order, field after field (vocabulary_sizes): the id of a key is its'
      " index in its field's part, and a key not there gets the field's"
      ' oov_ids entry; multi_vocabulary.npy likewise for multi_hot values'
    )
  if inputs.multi_field_names:
    split = (
      f'a cell split at {options.get("multi_hot_sep", "|")!r}'
      if fmt == 'csv'
      else "the movie's list"
    )
    out['multi_hot'] = (
      f'{split}; each value stripped and keyed as a categorical string,'
      ' empty values dropped; the first max_len kept; a value not kept in'
      ' training gets the OOV id (multi_oov_ids); -1 pads'
    )
  if inputs.dense_names:
    transform = (
      'log(1 + max(x, 0)) of the integer, then ' if fmt == 'criteo' else ''
    )
    out['numeric'] = (
      f'{transform}(value - dense_mean) / dense_std, computed in float64'
      ' and then rounded to float32 (float32 arithmetic misses the last bit'
      ' of about half the values); an empty cell or NaN is missing and'
      ' becomes 0 (the training mean)'
    )
  if inputs.features:
    out['side_features'] = (
      'looked up by the encoded user and movie ids in side_tables: user_ids'
      " are the user fields' ids, after user and item in ids; item_multi is"
      ' multi_ids; item_dense holds raw values, standardised as numeric says'
      ' to give dense. The last row of each is for an out-of-vocabulary user'
      ' or movie'
    )
  return out


def from_dataset(
  dataset: core.Dataset, fmt: str, config: ml_collections.ConfigDict
) -> SideInputs:
  """The side inputs of a loaded `dataset` of resolved `config.dataset`.

  MovieLens tables are read again from the side files; they must give the
  dataset's vocabularies (RuntimeError otherwise: a bug, or files that
  changed under the run).
  """
  max_len = 0
  if dataset.multi_field_names:
    max_len = int(dataset.train.multi_ids.shape[2])
  inputs = SideInputs(
    multi_field_names=tuple(dataset.multi_field_names),
    multi_vocabulary=tuple(
      np.asarray(v, np.int64).ravel() for v in dataset.multi_vocabulary
    ),
    max_len=max_len,
    dense_names=tuple(dataset.dense_names),
    dense_mean=tuple(float(x) for x in dataset.dense_mean),
    dense_std=tuple(float(x) for x in dataset.dense_std),
  )
  features = tuple(config.get('side_features') or ())
  if fmt != 'movielens' or not features:
    return inputs
  tables = movielens_side.tables(
    config.name,
    movielens.files(remote.localize(config)),
    features,
    dataset.vocabulary[0],
    dataset.vocabulary[1],
    config.min_count,
  )
  same = (
    tables.field_dims == tuple(dataset.field_dims[2:])
    and tables.multi_field_dims == tuple(dataset.multi_field_dims)
    and tables.max_len == max_len
    and tables.dense_names == tuple(dataset.dense_names)
    and all(
      np.array_equal(a, b)
      for a, b in zip(
        tables.vocabulary + tables.multi_vocabulary,
        tuple(dataset.vocabulary[2:]) + tuple(dataset.multi_vocabulary),
        strict=True,
      )
    )
  )
  if not same:
    raise RuntimeError(
      f'{config.name}: the side files give other fields than the cached'
      ' dataset (changed since it was loaded?)'
    )
  user_ids = item_multi = item_dense = None
  if tables.user_ids is not None:
    oov = np.array([d - 1 for d in tables.field_dims], np.int32)
    user_ids = np.concatenate([tables.user_ids, oov[None]]).astype(np.int32)
  if tables.item_multi is not None:
    empty = np.full((1,) + tables.item_multi.shape[1:], -1, np.int32)
    item_multi = np.concatenate([tables.item_multi, empty]).astype(np.int32)
  if tables.item_dense is not None:
    missing = np.full((1, tables.item_dense.shape[1]), np.nan)
    item_dense = np.concatenate([tables.item_dense, missing]).astype(np.float64)
  return dataclasses.replace(
    inputs,
    features=features,
    user_ids=user_ids,
    item_multi=item_multi,
    item_dense=item_dense,
  )


def check_unchanged(saved, new) -> None:
  """Raises a UserError if encoder `new` gives rows other inputs than
  `saved` (None: nothing saved), two `encoder.Encoder`s.

  A resumed run re-encodes its data: changed, its rows would get other ids
  than its checkpoints were trained with, and encoder/ would no longer fit
  them. The rules' words are not compared (a newer version may reword).
  """
  if saved is None:
    return
  names = ('field_names', 'field_dims', 'keys_are_ids', 'vocabulary')
  pairs = [(n, getattr(saved, n), getattr(new, n)) for n in names]
  if saved.vocabulary and new.vocabulary:  # Name the field.
    pairs[3:] = zip(  # Unequal field_names are found first.
      [f'the {name} vocabulary' for name in saved.field_names],
      saved.vocabulary,
      new.vocabulary,
      strict=False,
    )
  pairs += [
    (f.name, getattr(saved.side, f.name), getattr(new.side, f.name))
    for f in dataclasses.fields(SideInputs)
  ]
  for what, a, b in pairs:
    if not _equal(a, b):
      raise utils.UserError(
        f'The data differ from those of the checkpoints ({what} changed):'
        ' resumed, the run would score their rows by other ids. Restore'
        ' the data it was trained on, or train in a new workdir.'
      )


def _equal(a, b) -> bool:
  """Equal, arrays by value (NaN equal to NaN), tuples item by item."""
  if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
    return len(a) == len(b) and all(map(_equal, a, b))
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    return np.array_equal(a, b, equal_nan=True)
  return a == b or (a != a and b != b)


def read(meta: dict, directory: str, error) -> SideInputs:
  """The side inputs of encoder.json's `meta` (absent keys: none).

  Args:
    meta: encoder.json's content (layout version 1 has no such keys).
    directory: the encoder's directory.
    error: `error(message)` returns the exception to raise for a damaged
      array.
  """
  names = tuple(meta.get('multi_field_names') or ())
  multi_vocabulary = ()
  if names:
    sizes = meta['multi_vocabulary_sizes']
    flat = _load(directory, 'multi_vocabulary', np.int64, (sum(sizes),), error)
    multi_vocabulary = tuple(np.split(flat, np.cumsum(sizes)[:-1]))
  tables = meta.get('side_tables') or {}
  arrays = {}
  for name, dtype in _DTYPES.items():
    if name in tables:
      arrays[name] = _load(directory, name, dtype, None, error)
      # A row per user (movie) id, the out-of-vocabulary one included.
      rows = meta['field_dims'][0 if name == 'user_ids' else 1]
      if len(arrays[name]) != rows:
        raise error(
          f'{directory}/{FILES[name]}: {len(arrays[name])} rows, expected'
          f' {rows} as encoder.json says.'
        )
  return SideInputs(
    multi_field_names=names,
    multi_vocabulary=multi_vocabulary,
    max_len=int(meta.get('max_len') or 0),
    dense_names=tuple(meta.get('dense_names') or ()),
    dense_mean=tuple(meta.get('dense_mean') or ()),
    dense_std=tuple(meta.get('dense_std') or ()),
    features=tuple(meta.get('side_features') or ()),
    **arrays,
  )


def _load(directory, name, dtype, shape, error) -> np.ndarray:
  path = os.path.join(directory, FILES[name])
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise error(f'{path}: unreadable ({e}).') from e
  if array.dtype != dtype or (shape is not None and array.shape != shape):
    want = f'{np.dtype(dtype)} {shape or ""}'.strip()
    raise error(f'{path}: {array.dtype} {array.shape}, expected {want}.')
  return array
