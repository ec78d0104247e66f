"""MovieLens side features, multi-hot and numeric batches, and training.

MovieLens genres, year and tags are compared with a pandas brute force on
the embedded files; ml-100k and ml-1m user and movie files with tiny
synthetic ones in GroupLens's layouts.
"""

import collections
import gzip
import os
import re
import tempfile
from unittest import mock
import warnings

from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import DatasetTestCase
from dataset_testing import write_lines
from dataset_testing import write_text
import jax
import ml_collections
import numpy as np
import pandas as pd
from test_datasets_csv_features import HEADER
from test_datasets_csv_features import csv_options
from test_datasets_csv_features import feature_rows

import batching
import best_reader
from configs import default
import data
from datasets import keying
from datasets import movielens
from datasets import side
import train
from utils import UserError
import workdir as workdir_lib

ASSETS = os.path.dirname(movielens.EMBEDDED)


def _keys(values):
  return keying.string_keys(np.array(list(values), object))


def _remember(strings):
  """Hashes `strings` at once for `_ids_of` (one call per string is slow)."""
  strings = sorted(set(strings) - set(_KEY))
  if strings:
    _KEY.update(zip(strings, _keys(strings).tolist(), strict=True))


def _index(vocabulary):
  return {k: i for i, k in enumerate(np.asarray(vocabulary).tolist())}


def _ids_of(index, values, length):
  """Ids `[length]` of strings `values` (`_remember`ed) in `index`, a
  vocabulary's `{key: id}`; -1 pads, an unknown key is OOV, `len(index)`."""
  out = np.full(length, -1, np.int32)
  ids = [index.get(_KEY[v], len(index)) for v in values[:length]]
  out[: len(ids)] = ids
  return out


_KEY = {}


def _brute_force_movies(min_count):
  """Per rated movie: genres, tags (ordered, cut at 16), year; and ratings."""
  ratings = pd.read_csv(movielens.EMBEDDED)
  movies = pd.read_csv(os.path.join(ASSETS, 'movies.csv.gz')).set_index(
    'movieId'
  )
  tags = pd.read_csv(os.path.join(ASSETS, 'tags.csv.gz'))
  rated = set(ratings['movieId'])
  genres = {
    m: [
      g for g in movies.loc[m, 'genres'].split('|') if g != '(no genres listed)'
    ]
    for m in rated
  }
  applied = collections.defaultdict(collections.Counter)
  for m, tag in zip(tags['movieId'], tags['tag'], strict=True):
    applied[m][str(tag).strip().lower()] += 1
  movie_tags = {
    m: sorted(applied[m], key=lambda t, c=applied[m]: (-c[t], t))[:16]
    for m in rated
  }
  on_movies = collections.Counter(t for m in rated for t in movie_tags[m])
  kept_tags = {t for t, c in on_movies.items() if c >= min_count}
  _remember(g for v in genres.values() for g in v)
  _remember(t for v in movie_tags.values() for t in v)
  year = {}
  for m in rated:
    found = re.search(r'\((\d{4})\)\s*$', movies.loc[m, 'title'].strip())
    year[m] = float(found.group(1)) if found else np.nan
  return ratings, genres, movie_tags, kept_tags, year


class MovieLensSideTest(DatasetTestCase):
  @parameterized.parameters(1, 2)
  def test_embedded_genres_year_tags_match_pandas(self, min_count):
    config = self.config('ml-latest-small', '', min_count=min_count)
    config.side_features = ('year,tags', 'genres')  # Any order, as flags.
    dataset = data.load_dataset(config)
    ratings, genres, tags, kept_tags, year = _brute_force_movies(min_count)
    self.assertEqual(dataset.field_names, ('user', 'item'))
    self.assertEqual(dataset.multi_field_names, ('genres', 'tags'))
    self.assertEqual(dataset.dense_names, ('year',))
    all_genres = {g for v in genres.values() for g in v}
    self.assertLen(all_genres, 19)
    self.assertEqual(
      dataset.multi_field_dims, (len(all_genres) + 1, len(kept_tags) + 1)
    )
    np.testing.assert_array_equal(
      dataset.multi_vocabulary[1], np.sort(_keys(kept_tags))
    )
    parts = data.split_indices(len(ratings), (0.8, 0.1, 0.1), 0)
    movie = ratings['movieId'].to_numpy()
    years = np.array([year[m] for m in movie])
    mean, std = np.nanmean(years[parts[0]]), np.nanstd(years[parts[0]])
    np.testing.assert_allclose(dataset.dense_mean, [mean], rtol=1e-12)
    np.testing.assert_allclose(dataset.dense_std, [std], rtol=1e-12)
    self.assertEqual(dataset.train.multi_ids.shape[2], 16)
    index = [_index(v) for v in dataset.multi_vocabulary]
    expected = {
      m: np.stack(
        [_ids_of(index[0], genres[m], 16), _ids_of(index[1], tags[m], 16)]
      )
      for m in genres
    }
    for split, part in zip(
      (dataset.train, dataset.valid, dataset.test), parts, strict=True
    ):
      np.testing.assert_array_equal(
        split.multi_ids, np.stack([expected[m] for m in movie[part]])
      )
      np.testing.assert_allclose(
        split.dense[:, 0],
        np.nan_to_num((years[part] - mean) / std, nan=0.0),
        atol=1e-6,
      )
    if min_count == 2:  # A tag of one movie only is out of vocabulary.
      self.assertIn(len(kept_tags), dataset.train.multi_ids[:, 1])

  def test_reordered_list_shares_the_cache_and_no_features_is_unchanged(self):
    # Another list is another cache, even from the same files (movies.csv).
    fields = []
    for features in (('genres,year',), ('year', 'genres'), ('genres',), ()):
      config = self.config('ml-latest-small', '')
      config.side_features = features
      dataset = data.load_dataset(config)
      fields.append((dataset.multi_field_names, dataset.dense_names))
    self.assertLen(self.encoded(), 3)
    self.assertEqual(
      fields,
      [(('genres',), ('year',))] * 2 + [(('genres',), ()), ((), ())],
    )
    self.assertIsNone(dataset.train.multi_ids)
    self.assertIsNone(dataset.train.dense)
    self.assertEqual(dataset.field_dims, (611, 9725))

  @parameterized.parameters(
    (
      'ml-100k',
      'tags',
      "ml-100k has no side feature 'tags' \\(side features of ml-100k:"
      ' genres, year, age, gender, occupation, zip\\)\\.$',
    ),
    ('ml-latest-small', 'age', "ml-latest-small has no side feature 'age'"),
    ('criteo', 'genres', "criteo has no side feature 'genres' .*: none"),
  )
  def test_unknown_side_feature_is_a_config_error(self, name, feature, msg):
    config = self.config(name, '/nonexistent')
    config.side_features = (feature,)
    with self.assertRaisesRegex(
      data.DataError, '^config.dataset.side_features: ' + msg
    ):
      data.load_dataset(config)


# Tiny GroupLens files: (user, gender, age, occupation, zip) and movies.
USERS = [
  (1, 'M', '24', 'technician', '85711'),
  (2, 'F', '53', 'other', '94043'),
  (3, 'M', '24', 'writer', '32067'),
  (4, 'F', '53', 'technician', 'T8H1N'),
  (5, 'M', '33', 'other', '85702'),
]
MOVIES = [
  (1, 'Toy Story (1995)', ('Animation', "Children's", 'Comedy')),
  (2, 'GoldenEye (1995)', ('Action', 'Adventure', 'Thriller')),
  (3, 'Café Noir', ()),  # No year, no genre: 'unknown' in ml-100k.
  (4, 'Heat (1995) ', ('Action', 'Crime', 'Thriller')),
]


def _write_ml100k(directory):
  ratings = [(u, m, (u + m) % 5 + 1) for u in range(1, 6) for m in (1, 2, 3, 4)]
  write_text(
    f'{directory}/u.data', ''.join(f'{u}\t{m}\t{r}\t0\n' for u, m, r in ratings)
  )
  write_text(
    f'{directory}/u.user',
    ''.join(f'{u}|{a}|{g}|{o}|{z}\n' for u, g, a, o, z in USERS),
  )
  genres = movielens.movielens_side.ML100K_GENRES
  lines = []
  for m, title, these in MOVIES:
    flags = [
      str(int(g in these or (g == 'unknown' and not these))) for g in genres
    ]
    lines.append(
      '|'.join([str(m), title, '01-Jan-1995', '', 'http://x', *flags])
    )
  with open(f'{directory}/u.item', 'wb') as f:
    f.write(('\n'.join(lines) + '\n').encode('latin-1'))
  return ratings


def _write_ml1m(directory):
  ratings = [(u, m, (u * m) % 5 + 1) for u in range(1, 6) for m in (1, 2, 3, 4)]
  write_text(
    f'{directory}/ratings.dat',
    ''.join(f'{u}::{m}::{r}::0\n' for u, m, r in ratings),
  )
  write_text(
    f'{directory}/users.dat',
    ''.join(f'{u}::{g}::{a}::{o}::{z}\n' for u, g, a, o, z in USERS),
  )
  with open(f'{directory}/movies.dat', 'wb') as f:
    for m, title, these in MOVIES:
      f.write(f'{m}::{title}::{"|".join(these)}\n'.encode('latin-1'))
  return ratings


class GroupLensSideTest(DatasetTestCase):
  @parameterized.parameters(('ml-100k', _write_ml100k), ('ml-1m', _write_ml1m))
  def test_user_and_movie_files_match_a_brute_force(self, name, write):
    directory = os.path.join(self.tmp, name)
    os.makedirs(directory)
    ratings = write(directory)
    config = self.config(name, directory, split=(0.5, 0.25, 0.25))
    config.side_features = ('zip,occupation,gender,age,year,genres',)
    dataset = data.load_dataset(config)
    self.assertEqual(
      dataset.field_names,
      ('user', 'item', 'age', 'gender', 'occupation', 'zip'),
    )
    self.assertEqual(dataset.multi_field_names, ('genres',))
    by_movie = {m[0]: m for m in MOVIES}
    parts = data.split_indices(len(ratings), (0.5, 0.25, 0.25), 0)
    splits = (dataset.train, dataset.valid, dataset.test)
    # age, gender, occupation, zip (its first three characters).
    for f, column in enumerate((2, 1, 3, 4)):
      value = {
        u[0]: u[column][:3].upper() if f == 3 else u[column] for u in USERS
      }
      _remember(value.values())
      vocabulary = np.sort(_keys(set(value.values())))
      np.testing.assert_array_equal(dataset.vocabulary[2 + f], vocabulary)
      for split, part in zip(splits, parts, strict=True):
        expected = [
          _ids_of(_index(vocabulary), [value[ratings[i][0]]], 1)[0]
          for i in part
        ]
        np.testing.assert_array_equal(split.ids[:, 2 + f], expected)
    vocabulary = dataset.multi_vocabulary[0]
    self.assertLen(vocabulary, 7)  # 'unknown' is no genre.
    _remember(g for m in MOVIES for g in m[2])
    years = np.array([1995.0 if m != 3 else np.nan for _, m, _ in ratings])
    mean = np.nanmean(years[parts[0]])
    self.assertEqual(dataset.dense_mean, (mean,))
    self.assertEqual(dataset.dense_std, (1.0,))  # One year: std 0 -> 1.
    for split, part in zip(splits, parts, strict=True):
      movies = [ratings[i][1] for i in part]
      np.testing.assert_array_equal(
        split.multi_ids[:, 0],
        [_ids_of(_index(vocabulary), list(by_movie[m][2]), 3) for m in movies],
      )
      np.testing.assert_allclose(split.dense[:, 0], 0.0)

  def test_a_missing_side_file_names_it_and_the_key(self):
    directory = os.path.join(self.tmp, 'ml-100k')
    os.makedirs(directory)
    _write_ml100k(directory)
    os.remove(f'{directory}/u.user')
    config = self.config('ml-100k', directory)
    config.side_features = ('genres', 'zip')
    with self.assertRaisesRegex(
      data.DataError,
      r'^config.dataset.side_features: genres, zip of ml-100k'
      r' need u.user, which is not in',
    ):
      data.load_dataset(config)

  @parameterized.named_parameters(
    (
      'movies_column',
      'movies.csv',
      'movieId,title,genre\n1,A (1995),Drama\n',
      r'movies\.csv:1: no column genres in the header movieId,title,genre',
    ),
    (
      'movies_row',
      'movies.csv',
      'movieId,title,genres\n1,A (1995),Drama\n2,B, (1996),Comedy\n',
      r'movies\.csv:3: expected 3 columns, found 4: quote a value',
    ),
    (
      'movies_quote',
      'movies.csv',
      'movieId,title,genres\n1,"A (1995),Drama\n',
      r'movies\.csv: not a CSV file \(.*EOF inside string',
    ),
    (
      'movies_id',
      'movies.csv',
      'movieId,title,genres\n1,A (1995),Drama\nB,B (1996),Comedy\n',
      r'movies\.csv: an id that is not an integer \(',
    ),
    ('tags_empty', 'tags.csv', '', r'tags\.csv: empty, but it needs the'),
    (
      'tags_column',
      'tags.csv',
      'userId,movieId,label,timestamp\n1,1,fun,5\n',
      r'tags\.csv:1: no column tag in the header',
    ),
  )
  def test_a_malformed_side_csv_is_one_line(self, name, text, message):
    directory = os.path.join(self.tmp, 'ml')
    os.makedirs(directory)
    ratings = ''.join(f'{u},1,4.0,5\n' for u in range(1, 30))
    write_text = lambda n, t: open(os.path.join(directory, n), 'w').write(t)  # noqa: E731
    write_text('ratings.csv', 'userId,movieId,rating,timestamp\n' + ratings)
    write_text('movies.csv', 'movieId,title,genres\n1,A (1995),Drama\n')
    write_text('tags.csv', 'userId,movieId,tag,timestamp\n1,1,fun,5\n')
    write_text(name, text)
    config = self.config('ml-latest-small', directory)
    config.side_features = ('genres', 'tags')
    with self.assertRaisesRegex(data.DataError, message):
      data.load_dataset(config)

  def test_tags_that_pandas_reads_as_missing_are_tags(self):
    # NA, null, N/A: a tag is a string (so is a title), not a missing value;
    # stripped and lowercased, and dropped if blank.
    directory = os.path.join(self.tmp, 'ml')
    # Movie 3 is not in movies.csv: no year either.
    ratings = ''.join(
      f'{u},{m},4.0,5\n' for u in range(1, 9) for m in (1, 2, 3)
    )
    header = 'userId,movieId,rating,timestamp\n'
    write_text(f'{directory}/ratings.csv', header + ratings)
    movies = '1,NA,Drama\n2,B (1990) (1996),Comedy\n'  # The last year.
    write_text(f'{directory}/movies.csv', 'movieId,title,genres\n' + movies)
    tags = '1,1,NA,5\n1,1,null,5\n1,2,N/A,5\n1,2, X ,5\n1,1,  ,5\n'
    write_text(f'{directory}/tags.csv', 'userId,movieId,tag,timestamp\n' + tags)
    config = self.config('ml-latest-small', directory, min_count=1)
    config.side_features = ('tags,year',)
    dataset = data.load_dataset(config)
    vocabulary = np.sort(_keys(['na', 'null', 'n/a', 'x']))
    np.testing.assert_array_equal(dataset.multi_vocabulary[0], vocabulary)
    self.assertEqual(dataset.dense_mean, (1996.0,))  # Title NA: no year.

  def test_a_zip_code_in_lowercase_is_the_same_sectional_center(self):
    directory = os.path.join(self.tmp, 'ml-1m')
    _write_ml1m(directory)
    config = self.config('ml-1m', directory)
    config.side_features = ('zip',)
    vocabulary = data.load_dataset(config).vocabulary[2]
    path = f'{directory}/users.dat'
    with open(path) as f:
      text = f.read()
    self.assertIn('::T8H1N', text)
    write_text(path, text.replace('::T8H1N', ':: t8h1n'))
    dataset = data.load_dataset(config)
    np.testing.assert_array_equal(dataset.vocabulary[2], vocabulary)
    self.assertLen(vocabulary, 4)

  def test_a_user_or_movie_listed_twice_keeps_its_first_line(self):
    directory = os.path.join(self.tmp, 'ml-1m')
    _write_ml1m(directory)
    config = self.config('ml-1m', directory, min_count=1)
    config.side_features = ('zip,genres,year',)
    first = data.load_dataset(config)
    with open(f'{directory}/users.dat', 'a') as f:
      f.write('1::F::53::other::00000\n')
    with open(f'{directory}/movies.dat', 'a') as f:
      f.write('1::Other (2000)::Drama|War\n')
    again = data.load_dataset(config)
    self.assertLen(self.encoded(), 2)
    for name in ('vocabulary', 'multi_vocabulary', 'dense_mean'):
      for a, b in zip(getattr(first, name), getattr(again, name), strict=True):
        np.testing.assert_array_equal(a, b, name)

  def test_movies_without_any_genre_have_lists_of_one_padding(self):
    directory = os.path.join(self.tmp, 'ml')
    ratings = ''.join(f'{u},{m},4.0,5\n' for u in range(1, 9) for m in (1, 2))
    header = 'userId,movieId,rating,timestamp\n'
    write_text(f'{directory}/ratings.csv', header + ratings)
    movies = '1,A,(no genres listed)\n2,B,\n'
    write_text(f'{directory}/movies.csv', 'movieId,title,genres\n' + movies)
    # Beside the plain file, a gzipped one is not read.
    with open(f'{directory}/movies.csv.gz', 'wb') as f:
      f.write(gzip.compress(b'movieId,title,genres\n1,A,Drama\n2,B,War\n'))
    config = self.config('ml-latest-small', directory, min_count=1)
    config.side_features = ('genres',)
    dataset = data.load_dataset(config)
    self.assertEqual(dataset.multi_field_dims, (1,))
    np.testing.assert_array_equal(dataset.train.multi_ids, -1)
    self.assertEqual(dataset.train.multi_ids.shape[1:], (1, 1))

  def test_a_short_u_item_line_or_a_cut_gz_names_the_file(self):
    directory = os.path.join(self.tmp, 'ml-100k')
    _write_ml100k(directory)
    path = f'{directory}/u.item'
    with open(path, 'rb') as f:
      text = f.read()
    with open(path, 'wb') as f:
      f.write(text + b'5|Short (1995)|01-Jan-1995||http://x|0|1\n')
    config = self.config('ml-100k', directory)
    config.side_features = ('genres',)
    with self.assertRaisesRegex(
      data.DataError, f'^{re.escape(path)}: expected 24 \\|-separated columns'
    ):
      data.load_dataset(config)
    os.remove(path)
    with open(path + '.gz', 'wb') as f:
      f.write(gzip.compress(text)[:-20])  # Cut short.
    with self.assertRaisesRegex(
      data.DataError, f'{re.escape(path)}.gz: the compressed data is truncated'
    ):
      data.load_dataset(config)

  def test_a_short_line_of_a_dat_file_names_it(self):
    directory = os.path.join(self.tmp, 'ml-1m')
    _write_ml1m(directory)
    path = f'{directory}/users.dat'
    with open(path) as f:
      lines = f.read().splitlines()
    lines[2] = lines[2].rsplit('::', 1)[0]  # No zip.
    write_text(path, '\n'.join(lines) + '\n')
    config = self.config('ml-1m', directory)
    config.side_features = ('age',)
    with self.assertRaisesRegex(
      data.DataError,
      rf'^{re.escape(path)}: line 3 has 4 columns, expected the users.dat'
      ' columns user, gender, age, occupation, zip.$',
    ):
      data.load_dataset(config)


def _split(n, max_len=3, dense_fields=2):
  """A split whose every input of row r holds r, to check alignment."""
  rows = np.arange(n)
  multi = np.full((n, 2, max_len), -1, np.int32)
  multi[:, 0, 0] = rows
  for r in rows:
    multi[r, 1, : 1 + r % max_len] = 7  # Lists of 1..max_len ids.
  multi[rows % 4 == 0, 1] = -1  # Some empty lists.
  dense = np.stack([rows * 1.0, -rows * 0.5], 1).astype(np.float32)
  ids = np.stack([rows, rows % 5], 1).astype(np.int32)
  return data.Split(ids, (rows % 2).astype(np.float32), multi, dense)


class StandardisationTest(absltest.TestCase):
  def test_values_beyond_float32_name_their_field_and_row(self):
    mean, std, names = np.array([1.0, 0.0]), np.array([2.0, 1e-3]), 'ab'
    fine = np.array([[5.0, np.nan], [-3e38, 3e35], [np.nan, -1e-3]])
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # No numpy RuntimeWarning either.
      got = np.concatenate(list(side.standardized(fine, mean, std, names)))
      np.testing.assert_array_equal(
        got, np.float32([[2, 0], [(-3e38 - 1) / 2, 3e38], [0, -1]])
      )
      # float32's extremes are in range, before and after.
      top = float(np.finfo(np.float32).max)
      [got] = side.standardized(np.array([[top, -top]]), 0.0, 1.0, names)
      np.testing.assert_array_equal(got, np.float32([[top, -top]]))
      for row, value, message in (
        (3, [1e300, 0], 'numeric field a: 1e+300 is beyond'),
        (4, [-1e39, 0], 'numeric field a: -1e+39 is beyond'),
        (3, [0, np.inf], 'numeric field b: inf is beyond'),
        (
          4,
          [0, 1e38],
          'numeric field b: 1e+38 standardises to 1e+41 (mean 0, std'
          ' 0.001), which is beyond',
        ),
      ):
        raw = np.concatenate([fine] + [[[0.0, 0.0]]] * (row - 3) + [[value]])
        with mock.patch.object(side, 'CHUNK_ROWS', 2):  # Rows of all pieces.
          with self.assertRaises(side.OutOfRange) as raised:
            list(side.standardized(raw, mean, std, names))
        self.assertEqual(raised.exception.row, row)
        self.assertEqual(
          str(raised.exception),
          f'{message} float32 range (+-3.403e+38); remove or rescale the'
          ' value.',
        )


class ChecksTest(absltest.TestCase):
  def test_the_first_value_beyond_float32_in_row_order_is_named(self):
    raw = np.array([[0.0, 0.0], [0.0, np.inf], [1e39, -1e39]])
    with self.assertRaises(side.OutOfRange) as raised:
      side.check_range(raw, 'ab')
    self.assertEqual(raised.exception.row, 1)
    self.assertStartsWith(str(raised.exception), 'numeric field b: inf is')

  def test_a_tiny_std_gives_out_of_range_not_a_numpy_warning(self):
    raw, mean, std = np.array([[1e10]]), np.zeros(1), np.array([1e-300])
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      with self.assertRaisesRegex(
        side.OutOfRange,
        'a: 1e\\+10 standardises to inf \\(mean 0, std 1e-300\\)',
      ):
        list(side.standardized(raw, mean, std, 'a'))

  def test_multi_hot_ids_in_range_and_padded_at_the_end(self):
    dims = np.array([3, 2])
    ids = np.full((2, 2, 3), -1)
    ids[0, 0, :2] = [2, 0]  # The last id of each field, and the first.
    ids[1, 1, 0] = 1
    self.assertIsNone(side.multi_problem(ids, dims))
    for (m, k, value), message in (
      ((1, 0, 2), 'outside [-1, multi_field_dims) in field(s) [1]'),
      ((0, 1, 3), 'outside [-1, multi_field_dims) in field(s) [0]'),
      ((0, 1, -2), 'outside [-1, multi_field_dims) in field(s) [0]'),
      ((1, 2, 0), 'after the -1 padding of a list'),
    ):
      with self.subTest(message=message, value=value):
        bad = ids.copy()
        bad[1, m, k] = value
        self.assertEqual(
          side.multi_problem(bad, dims), f'multi-hot ids {message}'
        )


class CacheRangeTest(DatasetTestCase):
  def _load(self, train, **paths):
    files = {'path': train, **paths}
    for key, rows in files.items():
      lines = [[str(i % 2), 'ab'[i % 2], str(v)] for i, v in enumerate(rows)]
      path = os.path.join(self.tmp, key)
      files[key] = write_lines(path, lines, ',', ('click', 'shop', 'price'))
    config = self.config('csv', files.pop('path'), **files)
    config.csv.update(dict(label_column='click', float_columns=('price',)))
    return data.load_dataset(config)

  def test_a_value_beyond_float32_leaves_no_cache_and_no_warning(self):
    normal = [50 + 1e-3 * (i % 7) for i in range(60)]
    for rows, paths, message in (  # Raw values: the line, while parsing.
      (normal[:30] + [1e300] + normal, {}, r'\S*path:32: .* price 1e\+300 is'),
      (normal[:30] + [-1e39] + normal, {}, r'\S*path:32: .* price -1e\+39 is'),
      (
        normal,
        {'valid_path': normal, 'test_path': normal[:9] + [1e38]},
        r'The test rows: .* price: 1e\+38 standardises to [0-9.]+e\+40',
      ),
    ):
      for _ in range(2):  # Nothing left behind that the next run trusts.
        with warnings.catch_warnings():
          warnings.simplefilter('error')
          with self.assertRaisesRegex(
            data.DataError,
            rf'^{message}.* beyond float32 range \(\+-3.403e\+38\)',
          ):
            self._load(rows, **paths)
        self.assertEqual(self.encoded(), [])
    self.assertLen(self._load(normal).train.dense, 48)


class BatchesTest(parameterized.TestCase):
  @parameterized.parameters(1, 2)
  def test_train_batches_carry_the_same_rows_of_every_input(self, processes):
    split = _split(50)
    for p in range(processes):
      batches = list(
        batching.train_batches(
          split, 8, seed=1, epoch=2, process_index=p, process_count=processes
        )
      )
      self.assertLen(batches, 6)
      for batch in batches:
        rows = batch['ids'][:, 0]
        self.assertEqual(batch['multi_ids'].shape, (8 // processes, 2, 3))
        np.testing.assert_array_equal(batch['multi_ids'], split.multi_ids[rows])
        np.testing.assert_array_equal(batch['dense'], split.dense[rows])
        sharded = batching.shard(batch, 2 // processes)
        self.assertEqual(sharded['multi_ids'].shape[:2], (2 // processes, 4))
        self.assertEqual(sharded['dense'].shape, (2 // processes, 4, 2))

  @parameterized.parameters((13, 1), (16, 1), (17, 2), (3, 2))
  def test_eval_batches_pad_lists_with_minus_one_and_values_with_zero(
    self, n, processes
  ):
    split = _split(n)
    seen = []
    for p in range(processes):
      for batch in batching.eval_batches(
        split, 8, process_index=p, process_count=processes
      ):
        real = batch['mask'] > 0
        rows = batch['ids'][real, 0]
        seen += rows.tolist()
        np.testing.assert_array_equal(
          batch['multi_ids'][real], split.multi_ids[rows]
        )
        np.testing.assert_array_equal(batch['dense'][real], split.dense[rows])
        np.testing.assert_array_equal(batch['multi_ids'][~real], -1)
        np.testing.assert_array_equal(batch['dense'][~real], 0.0)
        self.assertEqual(batch['multi_ids'].dtype, np.int32)
        self.assertEqual(batch['dense'].dtype, np.float32)
        self.assertEqual(
          set(batching.model_inputs(batch)), {'ids', 'multi_ids', 'dense'}
        )
    self.assertEqual(sorted(seen), list(range(n)))

  def test_model_inputs_leave_out_absent_inputs_and_labels(self):
    batch = {'ids': np.zeros((2, 3)), 'label': np.zeros(2), 'mask': 1}
    self.assertEqual(list(batching.model_inputs(batch)), ['ids'])


class ResumeTest(absltest.TestCase):
  def test_a_changed_side_feature_refuses_a_resume(self):
    workdir = tempfile.mkdtemp()
    config = default.get_config()
    workdir_lib.check_resume(workdir, config, resuming=False)
    config.dataset.side_features = ('genres',)
    with self.assertRaisesRegex(UserError, 'dataset.side_features'):
      workdir_lib.check_resume(workdir, config, resuming=True)


class TrainingTest(DatasetTestCase):
  def run_fm(self, path, **csv):
    config = default.get_config()
    config.model = ml_collections.ConfigDict(dict(embed_dim=4))
    config.batch_size = 128
    config.eval_batch_size = 256
    config.num_epochs = 6
    config.learning_rate = 0.01
    config.progress_bar = False
    config.dataset = self.config('csv', path, csv=csv_options(**csv))
    workdir = os.path.join(self.tmp, f'run{len(os.listdir(self.tmp))}')
    return train.train_and_evaluate(config, workdir), workdir

  def test_float_and_multi_hot_columns_train_beyond_ids_alone(self):
    self.assertEqual(jax.local_device_count(), 2)
    path = write_lines(
      os.path.join(self.tmp, 'train.csv'),
      feature_rows(6000, seed=4),
      ',',
      HEADER,
    )
    with self.assertLogs('absl', 'INFO') as logs:
      side, workdir = self.run_fm(path)
    # What the run reads besides the ids, in its log.
    self.assertIn(
      "multi-hot fields ('tags', 'colors'), numeric fields ('price',"
      " 'count'), train/valid/test examples",
      '\n'.join(logs.output),
    )
    with self.assertLogs('absl', 'INFO') as logs:
      ids_only, _ = self.run_fm(
        path,
        float_columns=(),
        multi_hot_columns=(),
        categorical_columns=('shop',),
      )
    [line] = [x for x in logs.output if 'Dataset csv:' in x]
    self.assertRegex(
      line, r"fields \('shop',\), field_dims \(\d+,\), train/valid/test"
    )
    # The label depends on price and the tags only.
    self.assertGreater(side['auc'], 0.75)
    self.assertGreater(side['auc'], ids_only['auc'] + 0.2)
    restored = best_reader.load_best(workdir)[0]['params']
    self.assertIn(
      'multi_embedding', str(jax.tree_util.tree_structure(restored))
    )


if __name__ == '__main__':
  absltest.main()
