"""MovieLens ratings (GroupLens): fields user and item, label rating > 3.

ml-latest-small is embedded in the repository (assets/, with its README);
ml-100k, ml-1m, ml-20m and ml-25m download from GroupLens into the cache
directory, verified against GroupLens's published MD5s. Ids are dense: each
column's distinct values numbered in sorted order, and one more id per
field, the last, for a user or movie that the ratings do not have: never
seen in training, it is the id of an unseen user or movie at prediction.
`config.dataset.side_features` adds fields of the movies and users
(datasets/movielens_side.py): genres, year, tags, age, gender, ...
"""

from __future__ import annotations

from collections.abc import Iterator
import io
import logging
import math
import os
from typing import TYPE_CHECKING
import urllib.parse
import zipfile
import zlib

import ml_collections
import numpy as np

from datasets import core
from datasets import download
from datasets import movielens_side
from datasets import remote
import utils

if TYPE_CHECKING:
  import pandas as pd

EMBEDDED = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  'assets',
  'ml-latest-small',
  'ratings.csv.gz',
)

# Archive MD5s as GroupLens publishes them in its `.md5` sidecar files.
GROUPLENS_MD5 = {
  'ml-100k': '0e33842e24a9c977be4e0107933c0723',
  'ml-1m': 'c4d9eecfca2ab87c1945afe126590906',
  'ml-20m': 'cd245b17a1ae2cc31bb14903e1204af3',
  'ml-25m': '6b51fb2759a8657d3bfcbfc42b592ada',
}

# Ratings file inside each archive: (name, separator, header line).
RATINGS_FILE = {
  'ml-latest-small': ('ratings.csv', ',', True),
  'ml-100k': ('u.data', '\t', False),
  'ml-1m': ('ratings.dat', '::', False),
  'ml-20m': ('ratings.csv', ',', True),
  'ml-25m': ('ratings.csv', ',', True),
}

NAMES = tuple(RATINGS_FILE)
# The headers a file of rows to predict may have (`Reader`): GroupLens's
# ratings.csv, or the field names.
HEADERS = (
  ('userId', 'movieId', 'rating', 'timestamp'),
  ('user', 'item', 'rating', 'timestamp'),
)
DEFAULTS = {}
SIDE_FEATURES = movielens_side.SIDE_FEATURES
MIN_COUNT = 1  # Every user and item is kept.


def archive_url(base: str, name: str) -> str:
  """The URL of GroupLens archive `name` under `base`, `config.dataset.url`:
  `/<name>.zip` goes after its path, before a query string (a mirror's
  token, e.g. `https://mirror.example/movielens?token=...`).

  Raises:
    DataError: `base` has a fragment, which no server sees: a checksum
      there (as `config.dataset.path` takes) would not be checked.
  """
  parts = urllib.parse.urlsplit(base)
  if parts.fragment:
    raise core.DataError(
      f'config.dataset.url={base!r} ends in a fragment'
      f' (#{parts.fragment}), which no server sees: remove it. It is the'
      " base URL of GroupLens's archives, checked against their published"
      ' MD5s.'
    )
  path = f'{parts.path.rstrip("/")}/{name}.zip'
  return urllib.parse.urlunsplit(parts._replace(path=path))


def fetch_grouplens(name: str, config: ml_collections.ConfigDict) -> str:
  """Returns the directory of GroupLens archive `name`, downloading it once.

  The archive is verified against `GROUPLENS_MD5` and unpacked into a
  temporary directory that is renamed into place when complete.
  """
  root = os.path.join(core.cache_dir(config), 'downloads')
  final = os.path.join(root, name)
  if os.path.isdir(final):  # Unpacked whole, then renamed (below).
    ratings = os.path.join(final, RATINGS_FILE[name][0])
    if not os.path.exists(ratings):
      raise core.DataError(
        f'{final} is not an unpacked {name}.zip: {ratings} does not exist.'
        ' It was not unpacked by this library (or was changed since):'
        ' delete it to download the archive again, or set'
        ' config.dataset.path to a directory that holds the files.'
      )
    return final
  # One process downloads; the others (runs started together) wait.
  with core.building(final, os.path.join(core.cache_dir(config), 'locks')):
    if os.path.isdir(final):  # Unpacked by the process waited for.
      return final
    url = archive_url(config.url, name)
    archive = os.path.join(root, f'{name}.zip')
    if not os.path.exists(archive):  # Else verified, kept by a full disk.
      logging.info('Downloading %s', url)
      download.download(url, archive, md5=GROUPLENS_MD5[name])
    try:
      remote.unpack(archive, final, top=name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
      if os.path.isdir(final):  # Another run unpacked it first.
        return final
      if remote.disk_refused(e):
        raise core.DownloadError(
          f'Could not unpack {url}: {e}. {remote.unpack_advice(e, archive)}'
        ) from e
      raise core.DownloadError(
        f'Could not unpack {url}: {e}. The archive was deleted: run again;'
        f' or unzip it yourself and set config.dataset.path to its'
        ' directory.'
      ) from e
  return final


def files(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{'all': the ratings file of MovieLens `config.name`}, and the side
  files (`movies`, `tags`, `users`) beside it that its side features need."""
  name = config.name
  filename = RATINGS_FILE[name][0]
  if config.get('valid_path') or config.get('test_path'):
    raise core.DataError(
      'config.dataset.valid_path and test_path: MovieLens is one ratings'
      ' file, split at random by config.dataset.split; leave them empty'
      ' (predefined files are read for criteo, avazu, libfm and csv).'
    )
  if config.path:
    path = os.path.expanduser(config.path)
    if os.path.isdir(path):
      path = os.path.join(path, filename)
    if not os.path.exists(path):
      raise core.DataError(
        f'config.dataset.path: {path} does not exist (expected the {name}'
        f' file {filename} or its directory).'
      )
  elif name == 'ml-latest-small':
    path = EMBEDDED
  else:
    path = os.path.join(fetch_grouplens(name, config), filename)
  features = tuple(config.get('side_features') or ())
  if not features:
    return {'all': path}
  directory = os.path.dirname(os.path.abspath(path))
  return {'all': path, **movielens_side.files(name, directory, features)}


# Columns of a ratings line; rows to predict have the first two only.
COLUMNS = ('user id', 'item id', 'rating', 'timestamp')


def labels_of(ratings: np.ndarray) -> np.ndarray:
  """0/1 labels float32 of ratings, as pytorch-fm: a rating > 3 is positive."""
  return (np.asarray(ratings) > 3).astype(np.float32)


def _line_problem(
  line: str, sep: str, width: int = 4, other_width: str = ''
) -> str | None:
  """Why ratings line `line` (of `width` columns) is malformed, or None.

  `other_width` follows the count of columns expected when it is wrong.
  """
  line = line.rstrip('\r\n')
  if not line:
    return None
  parts = line.split(sep)
  if len(parts) != width:
    return (
      f'expected {width} {sep!r}-separated columns'
      f' ({", ".join(c.split()[0] for c in COLUMNS[:width])}), found'
      f' {len(parts)}: {core.shown(line)}{other_width}'
    )
  for what, value, kind in zip(
    COLUMNS, parts[:3], (int, int, float), strict=False
  ):
    if what == 'rating' and not value.strip():
      return 'missing rating'  # A row to score, say.
    try:
      number = kind(value)
    except ValueError:
      return f'{what} {core.shown(value)} is not a number'
    if not math.isfinite(number):
      return f'{what} {core.shown(value)} is not a finite number'
    if kind is int and not -(2**63) <= number < 2**63:
      return f'{what} {core.shown(value)} is out of range (int64)'
  return None


def _bad_line(path: str, sep: str, header: bool) -> str:
  """Finds the first malformed ratings line of `path` and describes it."""
  with utils.open_text(path) as f:
    for number, line in enumerate(f, start=1):
      if header and number == 1:
        continue
      problem = _line_problem(line, sep)
      if problem:
        return f'{path}:{number}: {problem}'
  return f'{path}: could not be parsed as a ratings file'


def _read_ratings(source, sep: str, header: bool, width: int = 4):
  """Columns user, item (and rating) of ratings text; ValueError if bad.

  Args:
    source: a path or a binary file of ratings lines.
    sep: the column separator.
    header: whether the first line is a header.
    width: columns per line: 4, or 2 (user and item: rows to predict).
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top

  # '::' (ml-1m) is read as ':' with the empty columns between skipped, which
  # keeps pandas' fast C parser.
  columns = [0, 2, 4, 6][:width] if sep == '::' else list(range(width))
  try:
    frame = pd.read_csv(
      source,
      sep=':' if sep == '::' else sep,
      header=0 if header else None,
      dtype=str,
      engine='c',
      skip_blank_lines=True,
      encoding_errors='replace',
    )
  except pd.errors.EmptyDataError:  # Nothing but blank lines: no rows.
    frame = pd.DataFrame(columns=range(columns[-1] + 1), dtype=str)
  if len(frame) and frame.shape[1] != columns[-1] + 1:
    raise ValueError('wrong number of columns')
  frame = frame.iloc[:, columns]
  if frame.isna().to_numpy().any():
    raise ValueError('missing values')
  names = ('user', 'item', 'rating')[: min(width, 3)]
  out = pd.DataFrame(
    {
      name: pd.to_numeric(frame.iloc[:, i], errors='raise')
      for i, name in enumerate(names)
    }
  )
  integers = all(out[name].dtype.kind == 'i' for name in ('user', 'item'))
  if not integers or not np.isfinite(out.to_numpy(np.float64)).all():
    raise ValueError('ids that are not integers, or ratings not finite')
  return out


def read_movielens(path: str, name: str) -> pd.DataFrame:
  """Reads a MovieLens ratings file into columns user, item, rating.

  Raises:
    DataError: naming the file and line of the first malformed row.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top

  _, sep, header = RATINGS_FILE[name]
  if header:  # Checked as in prediction; a file may also have none.
    with core.reading(path):
      f, raw = utils.open_binary(path)
      with raw, f:
        first = f.readline()
    if first.strip():  # An empty file has no ratings (below).
      try:
        header = Reader(sep, labeled=True).has_header(first, path)
      except core.DataError as e:
        names = first.decode('utf-8-sig', 'replace').strip().split(sep)
        if {n.strip() for n in names[:2]} <= {*HEADERS[0][:2], *HEADERS[1][:2]}:
          raise  # MovieLens's columns, in another order.
        raise core.DataError(
          f'{e} Or, for a file of your own, set config.dataset.name=csv (it'
          f' is {name!r}, a MovieLens ratings file).'
        ) from e
  try:
    out = _read_ratings(path, sep, header)
  except (ValueError, pd.errors.ParserError) as e:
    raise core.DataError(_bad_line(path, sep, header)) from e
  if len(out) == 0:
    raise core.DataError(f'{path}: no ratings found')
  return out


class Reader:
  """Parses ratings lines in chunks to keys and labels (`core.Reader`).

  The keys are the raw user and item ids (the vocabulary's values). Used to
  predict: rows have the columns of the run's ratings file, or only user
  and item (`labeled=False`: labels are NaN). Any first line whose first
  column is not a number is a header, which must name the columns in their
  order (`has_header`).
  """

  field_names = ('user', 'item')

  def __init__(self, sep: str, labeled: bool = True):
    self.sep = sep
    self.labeled = labeled

  def for_rows(self, first_line: bytes) -> Reader:
    """The reader of lines like `first_line`: with or without ratings."""
    parts = first_line.decode('utf-8', 'replace').strip().split(self.sep)
    return Reader(self.sep, labeled=len(parts) != 2)

  def has_header(self, first_line: bytes, path: str) -> bool:
    """Whether `first_line` is a header; one that names other columns fails.

    The columns are read by position (user, movie, then rating and time), so
    a header must name them in that order: GroupLens's `userId,movieId,
    rating,timestamp` or the field names `user,item,rating,timestamp`, all
    four or the first two.

    Raises:
      DataError: a header of other columns, or of these in another order.
    """
    names = first_line.decode('utf-8-sig', 'replace').strip().split(self.sep)
    if len(names) < 2:  # One column: no header, a line of another separator.
      return False  # Parsed, it names its columns as found.
    try:
      int(names[0])
    except ValueError:
      pass
    else:
      return False
    names = [n.strip() for n in names]
    width = 4 if self.labeled else 2
    if names not in [list(h[:width]) for h in HEADERS]:
      expected = ' or '.join(self.sep.join(h[:width]) for h in HEADERS)
      raise core.DataError(
        f'{path}:1: header {core.shown(self.sep.join(names))} is not'
        f' {expected}: the'
        ' columns are read by position, user then movie'
        + (', rating, timestamp' if self.labeled else '')
        + '. Reorder or rename them.'
      )
    return True

  def parse(self, lines, first, where, bad):
    """See `core.Reader.parse`."""
    import pandas as pd  # pylint: disable=g-import-not-at-top

    width = 4 if self.labeled else 2
    other_width = ' (rows to predict may also have 2: user, item)'
    other_width = other_width if self.labeled else ''
    numbers = range(first, first + len(lines))
    try:
      frame = _read_ratings(io.BytesIO(b''.join(lines)), self.sep, False, width)
    except (ValueError, pd.errors.ParserError):
      good = []
      for number, line in zip(numbers, lines, strict=True):
        text = line.decode('utf-8', 'replace')
        problem = _line_problem(text, self.sep, width, other_width)
        if problem:
          bad(where(number), problem)
        else:
          good.append(line)
      try:
        frame = _read_ratings(
          io.BytesIO(b''.join(good)), self.sep, False, width
        )
      except (ValueError, pd.errors.ParserError) as e:
        raise core.DataError(
          f'{where(first)} to line {numbers[-1]}: could not be parsed ({e})'
        ) from e
    keys = frame[['user', 'item']].to_numpy(np.int64)
    if self.labeled:
      return keys, labels_of(frame['rating'].to_numpy())
    return keys, np.full(len(keys), np.nan, np.float32)


def encode_columns(
  columns: list[np.ndarray],
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
  """Encodes each column's distinct values to dense ids in sorted order.

  Args:
    columns: one array of raw values `[n]` per field.

  Returns:
    ids int32 `[n, fields]` and, per field, its distinct values in id order
    (ids `0..len(values[f]) - 1`).
  """
  ids, vocabulary = [], []
  for column in columns:
    values, inverse = np.unique(np.asarray(column), return_inverse=True)
    ids.append(inverse.astype(np.int32).reshape(-1))
    vocabulary.append(values)
  return np.stack(ids, axis=1), tuple(vocabulary)


def build(
  config: ml_collections.ConfigDict,
  options: ml_collections.ConfigDict,
  paths: dict[str, str],
) -> core.Encoded:
  """Reads the ratings in memory; every user and item keeps an id.

  Side features are looked up per user and movie (`movielens_side.tables`).
  """
  del options  # MovieLens has no format keys.
  logging.info('Encoding %s from %s', config.name, paths['all'])
  frame = read_movielens(paths['all'], config.name)
  ids, vocabulary = encode_columns(
    [frame['user'].to_numpy(), frame['item'].to_numpy()]
  )
  labels = labels_of(frame['rating'].to_numpy())
  # The last id of each field is for users and movies not in the ratings.
  field_dims = tuple(len(v) + 1 for v in vocabulary)
  side = movielens_side.tables(
    config.name,
    paths,
    tuple(config.get('side_features') or ()),
    *vocabulary,
    config.min_count,
  )
  if side.user_ids is not None:
    ids = np.concatenate([ids, side.user_ids[ids[:, 0]]], axis=1)
  extra = ()
  if side.item_multi is not None or side.item_dense is not None:
    extra = tuple(
      None if table is None else table[ids[:, 1]]
      for table in (side.item_multi, side.item_dense)
    )

  def chunks() -> Iterator[core.Chunk]:
    yield 'all', ids, labels, *extra

  return core.Encoded(
    field_names=('user', 'item', *side.field_names),
    field_dims=field_dims + side.field_dims,
    vocabulary=vocabulary + side.vocabulary,
    rows={'all': len(labels)},
    chunks=chunks,
    in_memory=True,
    multi_field_names=side.multi_field_names,
    multi_field_dims=side.multi_field_dims,
    multi_vocabulary=side.multi_vocabulary,
    max_len=side.max_len,
    dense_names=side.dense_names,
  )
