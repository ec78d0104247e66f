"""MovieLens side features (`config.dataset.side_features`), per movie or user.

- `genres` (multi-hot): a movie's genres; ml-latest-small's '(no genres
  listed)' and ml-100k's 'unknown' are an empty list.
- `year` (numeric): the year in the trailing '(YYYY)' of the title; a title
  without one is missing, standardised to 0 (the training mean).
- `tags` (multi-hot, ml-latest(-small), ml-20m, ml-25m): the movie's
  distinct tags, lowercased and stripped, most applied first (ties in
  alphabetical order), at most `MAX_LEN` of them.
- `age`, `gender`, `occupation`, `zip` (ml-100k, ml-1m): one more one-hot
  field each, after user and item; `zip` is the first three characters of
  the zip code (the US sectional center), upper-cased. ml-1m's age and
  occupation are its codes (README: 1 = under 18, 18 = 18-24, ...).

Every value is keyed as a categorical string (`keying.string_keys` of the
value as written above), counted once per rated movie (user) that has it,
and kept when at least `min_count` of them do; the others share the
field's out-of-vocabulary id, the last. A movie (user) missing from the
side file has empty lists, a missing year and out-of-vocabulary ids.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING

import numpy as np

from datasets import core
from datasets import encode
from datasets import keying
import utils

if TYPE_CHECKING:
  import pandas as pd

MOVIE_FEATURES = ('genres', 'year', 'tags')
USER_FEATURES = ('age', 'gender', 'occupation', 'zip')
MULTI_HOT = ('genres', 'tags')

_LATEST = {'movies': 'movies.csv', 'tags': 'tags.csv'}
# Side files of each dataset, by role.
FILES = {
  'ml-latest-small': _LATEST,
  'ml-20m': _LATEST,
  'ml-25m': _LATEST,
  'ml-100k': {'movies': 'u.item', 'users': 'u.user'},
  'ml-1m': {'movies': 'movies.dat', 'users': 'users.dat'},
}

SIDE_FEATURES = {
  name: ('genres', 'year', 'tags')
  if 'tags' in files
  else ('genres', 'year', *USER_FEATURES)
  for name, files in FILES.items()
}

# A movie keeps at most this many tags (a few have over a hundred).
MAX_LEN = 16

# ml-100k's u.item genre flags, in column order (its u.genre file).
ML100K_GENRES = (
  *('unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy'),
  *('Crime', 'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror'),
  *('Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western'),
)

_YEAR = re.compile(r'\((\d{4})\)\s*$')


def _role(feature: str) -> str:
  if feature == 'tags':
    return 'tags'
  return 'users' if feature in USER_FEATURES else 'movies'


def files(name: str, directory: str, features: tuple[str, ...]) -> dict:
  """`{role: path}` of the side files `features` need, in `directory`.

  A file may also be gzipped (`movies.csv.gz`, as the embedded copy); the
  plain one is read where both are.

  Raises:
    DataError: a file is missing.
  """
  out = {}
  for role in sorted({_role(f) for f in features}):
    filename = FILES[name][role]
    path = os.path.join(directory, filename)
    found = [p for p in (path, path + '.gz') if os.path.isfile(p)]
    if not found:
      raise core.DataError(
        f'config.dataset.side_features: {", ".join(features)} of {name}'
        f' need {filename}, which is not in {directory}.'
      )
    out[role] = found[0]
  return out


def _lines(path: str) -> list[list[str]]:
  """The lines of a GroupLens `.dat` / ml-100k file, Latin-1, split."""
  sep = '|' if os.path.basename(path).startswith('u.') else '::'
  f, raw = utils.open_binary(path)
  with raw, f:
    content = f.read().decode('latin-1')
  return [line.split(sep) for line in content.splitlines() if line.strip()]


def _frame(path: str, columns: tuple[str, ...], what: str) -> pd.DataFrame:
  import pandas as pd  # pylint: disable=g-import-not-at-top

  rows = _lines(path)
  for number, row in enumerate(rows, start=1):
    if len(row) < len(columns):
      raise core.DataError(
        f'{path}: line {number} has {len(row)} columns, expected the'
        f' {what} columns {", ".join(columns)}.'
      )
  return pd.DataFrame([row[: len(columns)] for row in rows], columns=columns)


def _read_csv(path: str, needed: tuple[str, ...]) -> pd.DataFrame:
  """A GroupLens CSV side file with columns `needed` (and any others), all
  strings; DataError if it is not one."""
  import pandas as pd  # pylint: disable=g-import-not-at-top

  layout = f'it needs the columns {",".join(needed)}'
  try:
    with core.reading(path):
      frame = pd.read_csv(path, dtype=str, keep_default_na=False)
  except pd.errors.ParserError as e:
    found = re.search(r'Expected (\d+) fields in line (\d+), saw (\d+)', str(e))
    if not found:
      raise core.DataError(f'{path}: not a CSV file ({e}).') from None
    width, line, seen = found.groups()
    raise core.DataError(
      f'{path}:{line}: expected {width} columns, found {seen}: quote a value'
      ' that holds a comma.'
    ) from None
  except pd.errors.EmptyDataError:
    raise core.DataError(f'{path}: empty, but {layout}.') from None
  missing = [c for c in needed if c not in frame.columns]
  if missing:
    raise core.DataError(
      f'{path}:1: no column {", ".join(missing)} in the header'
      f' {",".join(map(str, frame.columns))}; {layout}.'
    )
  return frame


def read_movies(name: str, path: str) -> pd.DataFrame:
  """Columns `item` (int64), `title` and `genres` (a list of strings)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top

  if name == 'ml-100k':
    rows = _lines(path)
    flags = np.array([r[5:24] for r in rows if len(r) >= 24]) == '1'
    if len(flags) != len(rows):
      raise core.DataError(f'{path}: expected 24 |-separated columns.')
    frame = pd.DataFrame({'item': [r[0] for r in rows]})
    frame['title'] = [r[1] for r in rows]
    # The flag 'unknown' (the first) is no genre: an empty list.
    frame['genres'] = [
      [g for g, on in zip(ML100K_GENRES[1:], row[1:], strict=True) if on]
      for row in flags
    ]
  else:
    if name == 'ml-1m':
      frame = _frame(path, ('item', 'title', 'genres'), 'movies.dat')
    else:
      frame = _read_csv(path, ('movieId', 'title', 'genres'))
      frame = frame.rename(columns={'movieId': 'item'})
    frame['genres'] = [
      [g for g in genres.split('|') if g and g != '(no genres listed)']
      for genres in frame['genres']
    ]
  frame['item'] = _ints(frame['item'], path)
  return frame


def read_tags(path: str) -> pd.DataFrame:
  """Columns `item` (int64) and `tag` (lowercased, stripped, non-empty)."""

  frame = _read_csv(path, ('movieId', 'tag'))
  frame = frame.rename(columns={'movieId': 'item'})
  frame['tag'] = frame['tag'].str.strip().str.lower()
  frame = frame[frame['tag'] != '']
  return frame.assign(item=_ints(frame['item'], path))[['item', 'tag']]


def read_users(name: str, path: str) -> pd.DataFrame:
  """Columns `user` (int64), `age`, `gender`, `occupation`, `zip` (str)."""
  if name == 'ml-100k':
    columns = ('user', 'age', 'gender', 'occupation', 'zip')
  else:
    columns = ('user', 'gender', 'age', 'occupation', 'zip')
  frame = _frame(path, columns, os.path.basename(path))
  frame['zip'] = frame['zip'].str.strip().str[:3].str.upper()
  frame['user'] = _ints(frame['user'], path)
  return frame


def _ints(column: pd.Series, path: str) -> np.ndarray:
  try:
    return column.astype(np.int64).to_numpy()
  except (ValueError, TypeError) as e:
    raise core.DataError(f'{path}: an id that is not an integer ({e}).') from e


def years(titles) -> np.ndarray:
  """float64 years of titles ending in '(YYYY)'; NaN for the others."""
  found = [_YEAR.search(str(t).strip()) for t in titles]
  return np.array([float(m.group(1)) if m else np.nan for m in found])


def _vocabulary(keys: np.ndarray, min_count: int) -> np.ndarray:
  """Sorted keys of `[entities, ...]` (PAD_KEY: none) on >= min_count rows."""
  per_row = [np.unique(row[row != core.PAD_KEY]) for row in keys]
  flat = np.concatenate(per_row + [np.zeros(0, np.int64)])
  values, counts = np.unique(flat, return_counts=True)
  return values[counts >= min_count]


def _lists(entities: np.ndarray, table: pd.Series, max_len: int) -> np.ndarray:
  """Keys int64 `[entities, max_len]` of each entity's list in `table`."""
  lists = [
    v[:max_len] if isinstance(v, list) else []
    for v in table.reindex(entities).tolist()
  ]
  out = np.full((len(lists), max_len), core.PAD_KEY, np.int64)
  lengths = np.array([len(v) for v in lists], np.int64)
  values = [v for row in lists for v in row]
  if values:  # One hashing call: it costs a millisecond each.
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(len(values)) - np.repeat(
      np.cumsum(lengths) - lengths, lengths
    )
    out[rows, cols] = keying.string_keys(np.array(values, object))
  return out


def _tag_lists(tags: pd.DataFrame) -> pd.Series:
  """Per movie, its distinct tags, most applied first, then alphabetical."""
  counts = tags.groupby(['item', 'tag']).size().rename('n').reset_index()
  counts = counts.sort_values(
    ['item', 'n', 'tag'], ascending=[True, False, True]
  )
  return counts.groupby('item')['tag'].agg(list)


@dataclasses.dataclass(frozen=True)
class Tables:
  """Side inputs per user and per movie, looked up by their ids.

  Attributes:
    field_names, field_dims, vocabulary: the extra one-hot fields.
    user_ids: int32 `[users, fields]`, row `u` for user id `u`.
    multi_field_names, multi_field_dims, multi_vocabulary, max_len: the
      multi-hot fields.
    item_multi: int32 `[items, multi_fields, max_len]`, -1 padding.
    dense_names: the numeric fields.
    item_dense: float64 `[items, dense_fields]`, NaN where missing.
  """

  field_names: tuple[str, ...]
  field_dims: tuple[int, ...]
  vocabulary: tuple[np.ndarray, ...]
  user_ids: np.ndarray
  multi_field_names: tuple[str, ...]
  multi_field_dims: tuple[int, ...]
  multi_vocabulary: tuple[np.ndarray, ...]
  max_len: int
  item_multi: np.ndarray | None
  dense_names: tuple[str, ...]
  item_dense: np.ndarray | None


def tables(
  name: str,
  paths: dict[str, str],
  features: tuple[str, ...],
  users: np.ndarray,
  items: np.ndarray,
  min_count: int,
) -> Tables:
  """Reads the side files and encodes `features` per user and per movie.

  Args:
    name: the MovieLens dataset.
    paths: `files`' roles and paths.
    features: the side features, each of `SIDE_FEATURES[name]`.
    users: the raw user ids in id order (the user field's vocabulary).
    items: the raw movie ids in id order.
    min_count: see the module docstring.
  """
  with core.reading(*paths.values()):
    movies = read_movies(name, paths['movies']) if 'movies' in paths else None
    tags = read_tags(paths['tags']) if 'tags' in paths else None
    people = read_users(name, paths['users']) if 'users' in paths else None
  names, dims, vocabulary, columns = [], [], [], []
  for feature in (f for f in USER_FEATURES if f in features):
    column = people.drop_duplicates('user').set_index('user')[feature]
    keys = _lists(users, column.map(lambda v: [v]), 1)[:, 0]
    kept = _vocabulary(keys[:, None], min_count)
    names.append(feature)
    dims.append(len(kept) + 1)
    vocabulary.append(kept)
    columns.append(encode.encode_keys(kept, keys))
  lists = {}
  if 'genres' in features:
    lists['genres'] = movies.drop_duplicates('item').set_index('item')['genres']
  if 'tags' in features:
    lists['tags'] = _tag_lists(tags)
  multi_names = tuple(f for f in MULTI_HOT if f in lists)
  keys = [_lists(items, lists[f], MAX_LEN) for f in multi_names]
  item_multi, max_len, multi_vocabulary = None, 0, ()
  if keys:
    keys = np.stack(keys, axis=1)  # [items, M, MAX_LEN]
    longest = (keys != core.PAD_KEY).sum(-1).max(initial=0)
    max_len = max(1, int(longest))
    keys = keys[:, :, :max_len]
    multi_vocabulary = tuple(
      _vocabulary(keys[:, m], min_count) for m in range(len(multi_names))
    )
    item_multi = encode.encode_multi(multi_vocabulary, keys)
  item_dense = None
  if 'year' in features:
    title = movies.drop_duplicates('item').set_index('item')['title']
    item_dense = years(title.reindex(items).fillna('').tolist())[:, None]
  return Tables(
    field_names=tuple(names),
    field_dims=tuple(dims),
    vocabulary=tuple(vocabulary),
    user_ids=np.stack(columns, axis=1) if columns else None,
    multi_field_names=multi_names,
    multi_field_dims=tuple(len(v) + 1 for v in multi_vocabulary),
    multi_vocabulary=multi_vocabulary,
    max_len=max_len,
    item_multi=item_multi,
    dense_names=('year',) if 'year' in features else (),
    item_dense=item_dense,
  )
