"""Tests of encoder.py: a saved encoder gives raw rows the ids of training.

Each format's tiny file is preprocessed by data.py (one split holding every
row), its encoder saved and loaded back, and the same rows encoded again,
from the file, without their label, and as a DataFrame: the ids must be
the cache's. Unseen and rare values get the OOV id. Multi-hot and numeric
fields (CSV, Criteo's dense integers, MovieLens side features) must give
the cache's `multi_ids` and `dense` too, and an encoder of layout version 1
(ids only) still loads.
"""

import csv as csv_module
import dataclasses
import json
import os
import re
from unittest import mock
import warnings

from absl.testing import parameterized
from dataset_testing import DatasetTestCase
from dataset_testing import avazu_rows
from dataset_testing import criteo_rows
from dataset_testing import write_lines
import ml_collections
import numpy as np
import pandas as pd
from test_datasets_csv_features import HEADER
from test_datasets_csv_features import MIN_COUNT
from test_datasets_csv_features import csv_options
from test_datasets_csv_features import feature_rows
from test_side_features import _write_ml1m
from test_side_features import _write_ml100k

from configs import default
import data
from datasets import criteo
from datasets import keying
import encoder
import encoder_side
import utils

CRITEO_COLUMNS = list(criteo.COLUMNS)
# The keys of encoder.json in layout version 1.
V1_KEYS = (
  *('version', 'name', 'format', 'options', 'min_count', 'field_names'),
  *('field_dims', 'vocabulary_sizes', 'keys_are_ids', 'oov_ids', 'rules'),
  *('model_name', 'model'),
)
AVAZU_HEADER = [
  *('id', 'click', 'hour', 'C1', 'banner_pos', 'site_id', 'site_domain'),
  *('site_category', 'app_id', 'app_domain', 'app_category', 'device_id'),
  *('device_ip', 'device_model', 'device_type', 'device_conn_type', 'C14'),
  *('C15', 'C16', 'C17', 'C18', 'C19', 'C20', 'C21'),
]


def _frame(rows, columns):
  """Rows of raw strings as a DataFrame; '' (missing) becomes None."""
  frame = pd.DataFrame(rows, columns=columns)
  return frame.replace('', None)


class EncoderTestCase(DatasetTestCase):
  def _save(self, name, path, **overrides):
    """Preprocesses `path` as one split, saves and loads its encoder."""
    config = self._config(name, path, **overrides)
    dataset = data.load_dataset(config.dataset)
    workdir = os.path.join(self.tmp, 'run')
    encoder.save(workdir, dataset, config)
    return dataset, encoder.load(workdir), workdir

  def _config(self, name, path, **overrides):
    """The config of `_save`'s run."""
    config = default.get_config()
    config.dataset = self.config(name, path, split=(1.0, 0.0, 0.0))
    for key, value in overrides.items():
      if isinstance(value, dict):
        config.dataset[key].update(value)
      else:
        config.dataset[key] = value
    config.model_name = 'fm'
    config.model = ml_collections.ConfigDict({'embed_dim': 3})
    return config

  def _ml100k(self):
    """A MovieLens-100K directory (`_write_ml100k`): its path, its ratings."""
    directory = os.path.join(self.tmp, 'ml-100k')
    os.makedirs(directory)
    return directory, _write_ml100k(directory)

  def _file_order(self, dataset):
    """The train split's ids and labels in file order (split = 1, 0, 0)."""
    ids, labels = np.asarray(dataset.train.ids), dataset.train.labels
    if dataset.name.startswith('ml-'):  # In the order of the permutation.
      order = np.argsort(data.split_indices(len(ids), (1, 0, 0), 0)[0])
      return ids[order], np.asarray(labels)[order]
    return ids, np.asarray(labels)

  def _check_rows(self, got, ids, labels):
    np.testing.assert_array_equal(got.ids, ids)
    if labels is None:
      self.assertIsNone(got.labels)
    else:
      np.testing.assert_array_equal(got.labels, labels)


class EncoderTest(EncoderTestCase):
  @parameterized.parameters(True, False)
  def test_criteo_file_unlabeled_file_and_frame_give_training_ids(self, bucket):
    rows = criteo_rows(300, seed=1)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    dataset, enc, _ = self._save(
      'criteo', path, min_count=3, criteo={'log_bucket': bucket}
    )
    ids, labels = self._file_order(dataset)
    self._check_rows(enc.encode(path), ids, labels)
    chunks = list(enc.chunks(path, chunk_rows=64))
    self.assertEqual(len(chunks), 5)
    np.testing.assert_array_equal(np.concatenate([c.ids for c in chunks]), ids)
    unlabeled = write_lines(
      os.path.join(self.tmp, 'test.txt'), [r[1:] for r in rows], '\t'
    )
    self._check_rows(enc.encode(unlabeled), ids, None)
    frame = _frame(rows, CRITEO_COLUMNS)
    self._check_rows(enc.encode(frame), ids, labels)
    flags = frame.assign(label=frame['label'] == '1')  # False/True: 0/1.
    self._check_rows(enc.encode(flags), ids, labels)
    numeric = frame.astype({f'I{i}': float for i in range(1, 14)})
    self._check_rows(enc.encode(numeric.drop(columns='label')), ids, None)

  def test_avazu_with_and_without_header_and_click(self):
    rows = avazu_rows(200, seed=2)
    path = write_lines(
      os.path.join(self.tmp, 'train.csv'), rows, ',', AVAZU_HEADER
    )
    dataset, enc, _ = self._save('avazu', path, min_count=2)
    ids, labels = self._file_order(dataset)
    self._check_rows(enc.encode(path), ids, labels)
    unlabeled = [r[:1] + r[2:] for r in rows]
    header = [c for c in AVAZU_HEADER if c != 'click']
    for head in (header, None):
      test = write_lines(os.path.join(self.tmp, 'test'), unlabeled, ',', head)
      self._check_rows(enc.encode(test), ids, None)
    frame = _frame(rows, AVAZU_HEADER).drop(columns='id')  # id is unused.
    self._check_rows(enc.encode(frame), ids, labels)

  def test_csv_and_parquet_any_column_order(self):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
      {
        'clicked': rng.integers(0, 2, 150),
        'age': rng.integers(0, 90, 150),
        'city': rng.choice(['paris', 'oslo', 'rome, it', ''], 150),
        'device': rng.choice(['a', 'b', 'c'], 150),
      }
    )
    path = os.path.join(self.tmp, 'train.csv')
    frame.to_csv(path, index=False)
    options = {'label_column': 'clicked', 'numeric_columns': ('age',)}
    dataset, enc, _ = self._save('csv', path, csv=options)
    ids, labels = self._file_order(dataset)
    self._check_rows(enc.encode(path), ids, labels)
    shuffled = frame[['device', 'age', 'city']]
    other = os.path.join(self.tmp, 'test.csv')
    shuffled.to_csv(other, index=False)
    self._check_rows(enc.encode(other), ids, None)
    self._check_rows(enc.encode(shuffled.replace('', None)), ids, None)
    parquet = os.path.join(self.tmp, 'test.parquet')
    frame.to_parquet(parquet)
    self._check_rows(enc.encode(parquet), ids, labels)
    shuffled.to_parquet(parquet)
    self._check_rows(enc.encode(parquet), ids, None)
    # The run read every other column: rows to score are read for the
    # columns it was trained on, and their other columns (a row id) left out.
    extra = frame.assign(request_id=[f'r{i}' for i in range(len(frame))])
    self._check_rows(enc.encode(extra), ids, labels)
    extra.to_csv(other, index=False)
    self._check_rows(enc.encode(other), ids, labels)
    # A file whose header names another field: its cells are not device's.
    renamed = frame.rename(columns={'device': 'dev'})
    renamed.to_csv(other, index=False)
    renamed.to_parquet(parquet)
    for source in (other, parquet):
      with self.assertRaisesRegex(
        data.DataError,
        f"^{source}: no column 'device', which the model reads \\(its"
        r' config.dataset.csv.categorical_columns\); the columns: clicked,'
        ' age, city, dev\\.',
      ):
        enc.encode(source)
    # A bool label (`clicks > 0`) was "label 'False' is not an integer".
    clicked = frame.assign(clicked=frame['clicked'] > 0)
    self._check_rows(enc.encode(clicked), ids, labels)
    clicked.to_csv(other, index=False)  # Its label written True and False.
    self._check_rows(enc.encode(other), ids, labels)
    # Rows to predict without a column the run named: no config key to fix.
    frame[['device', 'city']].to_csv(other, index=False)
    for rows, where in (
      (other, other),
      (frame[['device', 'city']], 'the DataFrame'),
    ):
      with self.assertRaisesRegex(
        data.DataError,
        f"^{where}: no column 'age', which the model reads \\(its"
        r' config.dataset.csv.numeric_columns\); the columns: .* Add it; an'
        ' empty cell is a value training did not see',
      ):
        enc.encode(rows)

  def test_csv_read_as_the_docstring_says_keeps_na_strings(self):
    # 'NA' (Namibia), 'null' and 'None' are values: training keys them as
    # written, so the DataFrame read that encode's docstring gives must too.
    rng = np.random.default_rng(4)
    countries = rng.choice(['NA', 'null', 'None', 'FR'], 120)
    path = os.path.join(self.tmp, 'train.csv')
    pd.DataFrame(
      {'clicked': rng.integers(0, 2, 120), 'country': countries}
    ).to_csv(path, index=False)
    options = {'label_column': 'clicked'}
    dataset, enc, _ = self._save('csv', path, csv=options)
    ids, labels = self._file_order(dataset)
    self.assertEqual(len(set(ids[:, 0].tolist())), 4)
    read = re.search(r'pd\.read_csv\(path, ([^)]*)\)', enc.encode.__doc__)
    kwargs = eval(f'dict({read[1]})', {'dict': dict, 'str': str})
    self._check_rows(enc.encode(pd.read_csv(path, **kwargs)), ids, labels)

  @parameterized.parameters(((),), ((4, 6, 5),))
  def test_libfm_with_and_without_field_dims(self, field_dims):
    rng = np.random.default_rng(4)
    dims = field_dims or (4, 6, 5)
    offsets = np.cumsum((0,) + dims[:-1]) if field_dims else np.zeros(3)
    feats = np.stack([rng.integers(0, d, 120) for d in dims], 1) + offsets
    labels = rng.choice([-1, 1], 120)
    rows = [
      [str(y)] + [f'{int(i)}:1' for i in row]
      for y, row in zip(labels, feats, strict=True)
    ]
    path = write_lines(os.path.join(self.tmp, 'train.libfm'), rows, ' ')
    dataset, enc, workdir = self._save(
      'libfm', path, libfm={'field_dims': field_dims}
    )
    has_vocabulary = os.path.exists(
      os.path.join(workdir, 'encoder', 'vocabulary.npy')
    )
    self.assertEqual(has_vocabulary, not field_dims)
    ids, labels = self._file_order(dataset)
    self._check_rows(enc.encode(path), ids, labels)
    bare = [r[1:] for r in rows]
    test = write_lines(os.path.join(self.tmp, 'test.libfm'), bare, ' ')
    self._check_rows(enc.encode(test), ids, None)
    frame = pd.DataFrame(feats.astype(int), columns=enc.field_names)
    self._check_rows(enc.encode(frame.assign(label=labels)), ids, labels)
    # A labelled line short of a feature is not read as an unlabelled one
    # whose first feature is the label.
    short = write_lines(
      os.path.join(self.tmp, 'short.libfm'), [r[:-1] for r in rows], ' '
    )
    with self.assertRaisesRegex(
      data.DataError,
      r'short\.libfm:1: expected 3 features idx:value \(one per field\),'
      ' found 2$',
    ):
      enc.encode(short)
    bare_indices = [[t.split(':')[0] for t in r] for r in bare]
    test = write_lines(os.path.join(self.tmp, 'test.libfm'), bare_indices, ' ')
    self._check_rows(enc.encode(test), ids, None)  # idx alone: value 1.

  def test_movielens_unseen_user_and_movie_get_the_oov_id(self):
    ratings = [(7, 10, 4.0), (7, 20, 2.0), (9, 10, 5.0), (3, 30, 3.5)]
    text = 'userId,movieId,rating,timestamp\n' + ''.join(
      f'{u},{i},{r},0\n' for u, i, r in ratings
    )
    path = os.path.join(self.tmp, 'ratings.csv')
    with open(path, 'w') as f:
      f.write(text)
    dataset, enc, _ = self._save('ml-20m', path)
    self.assertEqual(dataset.field_dims, (4, 4))  # 3 users, 3 movies, OOV.
    self.assertEqual(enc.oov_ids, (3, 3))
    ids, labels = self._file_order(dataset)
    np.testing.assert_array_equal(ids, [[1, 0], [1, 1], [2, 0], [0, 2]])
    self._check_rows(enc.encode(path), ids, labels)
    frame = pd.DataFrame({'user': [9, 5, 3], 'item': [99, 20, 30]})
    self._check_rows(enc.encode(frame), [[2, 3], [3, 1], [0, 2]], None)
    for names in ({'user': 'userId', 'item': 'movieId'}, {'item': 'movieId'}):
      # GroupLens's names, of both columns or of one: the same ids.
      got = enc.encode(frame.rename(columns=names))
      self._check_rows(got, [[2, 3], [3, 1], [0, 2]], None)
    for ours, theirs in (('user', 'userId'), ('item', 'movieId')):
      with self.assertRaisesRegex(
        data.DataError,
        f'^The DataFrame has both a {ours} and a {theirs} column, two names'
        ' of one field: drop one of them.$',
      ):
        enc.encode(frame.assign(**{theirs: frame[ours]}))
    unlabeled = os.path.join(self.tmp, 'pairs.csv')
    with open(unlabeled, 'w') as f:
      f.write('userId,movieId\n9,99\n\n5,20\n')
    self._check_rows(enc.encode(unlabeled), [[2, 3], [3, 1]], None)
    bad = os.path.join(self.tmp, 'bad.csv')
    for body, message in (
      ('userId,movieId\n9,99\nx,1\n', "3: user id 'x' is not a number"),
      ('9,99,4,0\n9,99,nan,0\n', "2: rating 'nan' is not a finite number"),
      ('9,99,4,0\n9,99,inf,0\n', "2: rating 'inf' is not a finite number"),
    ):
      with open(bad, 'w') as f:
        f.write(body)
      with self.assertRaisesRegex(data.DataError, f'bad.csv:{message}$'):
        enc.encode(bad)
    # Columns are read by position: a header must name them in that order.
    named = os.path.join(self.tmp, 'named.csv')
    for header, expected in (
      ('user,item', [[2, 3], [3, 1]]),
      ('userId,movieId,rating,timestamp', [[2, 3], [3, 1]]),
      ('movieId,userId', None),
      ('userId,foo', None),
    ):
      body = (
        '9,99,4.0,0\n5,20,1.0,0\n' if ',rating' in header else '9,99\n5,20\n'
      )
      with open(named, 'w') as f:
        f.write(f'{header}\n{body}')
      if expected is None:
        with self.assertRaisesRegex(
          data.DataError, f"named.csv:1: header '{header}' is not userId,"
        ):
          enc.encode(named)
      else:
        got = enc.encode(named)
        np.testing.assert_array_equal(got.ids, expected)
    # A line of another separator is no header: it is named as a bad line.
    with open(named, 'w') as f:
      f.write('9\t99\t4.0\t0\n5,20,1.0,0\n')
    with self.assertRaisesRegex(
      data.DataError,
      r"named.csv:1: expected 4 ','-separated columns \(user, item, rating,"
      r' timestamp\), found 1: .* \(rows to predict may also have 2: user,'
      r' item\)',
    ):
      enc.encode(named)

  def test_movielens_blank_chunks_and_an_empty_frame_have_no_rows(self):
    path = os.path.join(self.tmp, 'ratings.csv')
    with open(path, 'w') as f:
      f.write('userId,movieId,rating,timestamp\n7,10,4.0,0\n9,20,2.0,0\n')
    _, enc, _ = self._save('ml-20m', path)
    rows = os.path.join(self.tmp, 'rows.csv')
    with open(rows, 'w') as f:  # Lines 4-6: a chunk of blank lines.
      f.write('9,20,1.0,0\n\n\n\n\n\n7,10,5.0,0\n\n')
    chunks = list(enc.chunks(rows, chunk_rows=3))
    self.assertEqual([len(c.ids) for c in chunks], [1, 0, 1])
    self._check_rows(enc.encode(rows), [[1, 1], [0, 0]], [0, 1])
    for labeled in (False, True):
      columns = ['user', 'item'] + ['rating'] * labeled
      got = enc.encode(pd.DataFrame({c: [] for c in columns}))
      self.assertEqual((got.ids.shape, got.ids.dtype), ((0, 2), np.int32))
      self._check_rows(got, np.zeros((0, 2)), [] if labeled else None)

  def test_a_movielens_row_to_score_without_its_rating_says_what_to_do(self):
    path = os.path.join(self.tmp, 'ratings.csv')
    with open(path, 'w') as f:
      f.write('userId,movieId,rating,timestamp\n7,10,4.0,0\n9,20,2.0,0\n')
    _, enc, _ = self._save('ml-20m', path)
    rows = os.path.join(self.tmp, 'rows.csv')
    with open(rows, 'w') as f:
      f.write('userId,movieId,rating,timestamp\n7,10,5.0,0\n9,10,,0\n')
    message = (
      'missing rating: give every row its rating, or leave the rating and'
      ' timestamp columns out to score the rows unlabelled$'
    )
    with self.assertRaisesRegex(data.DataError, f'^{rows}:3: {message}'):
      enc.encode(rows)
    frame = pd.DataFrame({'user': [9], 'item': [10], 'rating': [None]})
    with self.assertRaisesRegex(data.DataError, f'^DataFrame row 0: {message}'):
      enc.encode(frame)

  def test_a_frame_missing_columns_names_them_and_its_own_columns(self):
    path = os.path.join(self.tmp, 'ratings.csv')
    with open(path, 'w') as f:
      f.write('userId,movieId,rating,timestamp\n7,10,4.0,0\n9,20,2.0,0\n')
    _, ml, _ = self._save('ml-20m', path)
    rows = criteo_rows(4, seed=1)
    criteo_path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    _, ct, _ = self._save('criteo', criteo_path)
    criteo_frame = _frame(rows, CRITEO_COLUMNS).drop(columns=['C3', 'I2'])
    rows = avazu_rows(8, seed=1)
    avazu_path = write_lines(
      os.path.join(self.tmp, 'avazu.csv'), rows, ',', AVAZU_HEADER
    )
    _, av, _ = self._save('avazu', avazu_path)
    avazu_frame = _frame(rows, AVAZU_HEADER).drop(columns=['hour', 'C1'])
    avazu_reads = [c for c in AVAZU_HEADER if c != 'id']  # hour: 2 fields.
    rated = pd.DataFrame({'user': [7], 'rating': [4.0]})
    movie_id = pd.DataFrame({'uid': [7], 'movieId': [10]})  # GroupLens's.
    for enc, frame, missing, reads in (
      (ml, rated, 'item', 'user, item, rating'),
      (ml, movie_id, 'user', 'user, movieId'),
      (ml, pd.DataFrame(), 'user, item', 'user, item'),
      (ct, criteo_frame, 'I2, C3', ', '.join(CRITEO_COLUMNS)),
      (av, avazu_frame, 'hour, C1', ', '.join(avazu_reads)),
    ):
      have = ', '.join(frame.columns) or 'none'
      with self.assertRaisesRegex(
        data.DataError,
        f'^The DataFrame has no column {missing}; the run reads {reads}, and'
        f' its columns are {have}\\.$',
      ):
        enc.encode(frame)

  def test_unseen_and_rare_values_get_the_oov_id(self):
    rows = [['1', *(['5'] * 13), *(['aa'] * 26)]] * 3
    rows += [['0', *(['9'] * 13), *(['bb'] * 26)]]  # Seen once: rare.
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    _, enc, _ = self._save('criteo', path, min_count=2)
    # Every field keeps one key ('aa', or the bucket of 5).
    self.assertEqual(enc.field_dims, (2,) * 39)
    self.assertEqual(enc.oov_ids, (1,) * 39)
    test = [['5'] * 13 + ['aa'] * 26, ['9'] * 13 + ['bb'] * 26]
    test += [['123456'] * 13 + ['never'] * 26, [''] * 39]
    got = enc.encode(_frame(test, CRITEO_COLUMNS[1:])).ids
    np.testing.assert_array_equal(got, [[0] * 39] + [[1] * 39] * 3)

  def test_a_field_whose_vocabulary_fills_its_dim_has_no_oov_id(self):
    # A dataset built in memory may keep every id: no id is left for OOV.
    enc = encoder.Encoder(
      name='mine',
      format='csv',
      options={},
      min_count=1,
      field_names=('a', 'b'),
      field_dims=(3, 3),
      vocabulary=(np.arange(2), np.arange(3)),
      model_name='fm',
      model={},
    )
    self.assertEqual(enc.oov_ids, (2, None))

  def test_bad_rows_name_file_and_line(self):
    rows = criteo_rows(20, seed=5)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    _, enc, _ = self._save('criteo', path, min_count=1)
    bad = rows[:3] + [rows[3][:-1]] + rows[4:]
    test = write_lines(os.path.join(self.tmp, 'bad.txt'), bad, '\t')
    with self.assertRaisesRegex(data.DataError, r'bad\.txt:4: expected 40'):
      enc.encode(test)
    frame = _frame(rows, CRITEO_COLUMNS).assign(I3='x')
    with self.assertRaisesRegex(data.DataError, 'DataFrame row 0: integer'):
      enc.encode(frame)
    # Labeled or not is decided from the first line's columns: an error at
    # a later line says what was assumed.
    for first, rest, how in (
      (rows[0][:-1], rows[1:], ('39', 'without', '39', '40')),
      (rows[0], [r[1:] for r in rows[1:]], ('40', 'with', '40', '39')),
    ):
      test = write_lines(os.path.join(self.tmp, 'a.txt'), [first, *rest], '\t')
      with self.assertRaisesRegex(
        data.DataError,
        r'^\S*a\.txt:2: expected {} columns \(label, 13 integer and 26'
        r' categorical, tab-separated; read {} the label column, as the first'
        r' line has {} columns\), found {}(;|$)'.format(*how),
      ):
        enc.encode(test)

  def test_frame_cells_with_newlines(self):
    # CSV: a cell with a newline, a CR or a quote is one value, the one
    # training read from Parquet.
    cells = ['new\nyork', 'a\r\nb', 'c"\r', 'rome, it', '']
    frame = pd.DataFrame({'clicked': [1, 0] * 10, 'city': cells * 4})
    frame = frame.assign(device=['x\n', 'y', 'z"'] * 6 + ['y', 'y'])
    path = os.path.join(self.tmp, 'train.parquet')
    frame.to_parquet(path)
    dataset, enc, _ = self._save('csv', path, csv={'label_column': 'clicked'})
    ids, labels = self._file_order(dataset)
    self.assertEqual(dataset.field_dims, (6, 4))
    self._check_rows(enc.encode(frame), ids, labels)
    self._check_rows(enc.encode(frame.drop(columns='clicked')), ids, None)
    # Criteo: a tab-separated row cannot hold a newline or a tab.
    rows = criteo_rows(20, seed=5)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    _, enc, _ = self._save('criteo', path)
    for value, what in (
      ('a\nb', 'a newline'),
      ('a\tb', r"the separator '\\t'"),
    ):
      frame = _frame(rows, CRITEO_COLUMNS)
      frame.loc[3, 'C2'] = value
      frame.loc[5, 'C1'] = value
      with self.assertRaisesRegex(
        data.DataError,
        rf'^DataFrame row 3: column C2 {re.escape(repr(value))} holds {what},'
        ' which a criteo row cannot carry; remove it from the value.$',
      ):
        enc.encode(frame)

  def test_files_are_json_and_npy_and_versioned(self):
    rows = criteo_rows(50, seed=6)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    dataset, enc, workdir = self._save('criteo', path, min_count=2)
    directory = os.path.join(workdir, 'encoder')
    self.assertEqual(
      sorted(os.listdir(directory)), ['encoder.json', 'vocabulary.npy']
    )
    with open(os.path.join(directory, 'encoder.json')) as f:
      meta = json.load(f)
    self.assertEqual(meta['version'], encoder.VERSION)
    self.assertEqual(meta['field_dims'], list(dataset.field_dims))
    self.assertEqual(meta['model_name'], 'fm')
    self.assertEqual(meta['model'], {'embed_dim': 3})
    self.assertEqual(
      meta['options'], {'log_bucket': True, 'numeric': 'buckets'}
    )
    self.assertIn('integer', meta['rules'])
    flat = np.load(os.path.join(directory, 'vocabulary.npy'))
    np.testing.assert_array_equal(flat, np.concatenate(dataset.vocabulary))
    self.assertEqual(sum(meta['vocabulary_sizes']), len(flat))
    self.assertEqual(enc.model_config().model.embed_dim, 3)
    # A write that fails (a full disk) leaves the earlier encoder.json.
    with open(os.path.join(directory, 'encoder.json')) as f:
      before = f.read()
    files = sorted(os.listdir(directory))

    def full(obj, f, **kwargs):
      del obj, kwargs
      f.write('{"vers')
      raise OSError('No space left on device')

    with mock.patch.object(json, 'dump', full), self.assertRaises(OSError):
      enc.write(directory)
    with open(os.path.join(directory, 'encoder.json')) as f:
      self.assertEqual(f.read(), before)
    # Nor any half-written copy, whichever file the disk refused.
    self.assertEqual(sorted(os.listdir(directory)), files)
    with (
      mock.patch.object(np, 'save', side_effect=OSError('No space left')),
      self.assertRaises(OSError),
    ):
      enc.write(directory)
    self.assertEqual(sorted(os.listdir(directory)), files)
    np.testing.assert_array_equal(
      np.load(os.path.join(directory, 'vocabulary.npy')), flat
    )
    meta['version'] = encoder.VERSION + 1
    for version in (encoder.VERSION + 1, None):  # Newer, or a damaged file.
      if version is None:
        del meta['version']
      with open(os.path.join(directory, 'encoder.json'), 'w') as f:
        json.dump(meta, f)
      with self.assertRaisesRegex(
        utils.UserError,
        f'encoder.json: layout version {version} is not one this code reads'
        rf' \(1 to {encoder.VERSION}\): update the code if a newer one wrote'
        ' it; without a version the file is damaged',
      ):
        encoder.load(workdir)
    with self.assertRaisesRegex(utils.UserError, 'no encoder.json'):
      encoder.load(self.tmp)
    meta['version'] = encoder.VERSION
    with open(os.path.join(directory, 'encoder.json'), 'w') as f:
      json.dump(meta, f)
    vocabulary = os.path.join(directory, 'vocabulary.npy')
    with open(vocabulary, 'r+b') as f:
      f.truncate(50)  # A damaged array: one line, not numpy's traceback.
    with self.assertRaisesRegex(
      utils.UserError, f'^{re.escape(vocabulary)}: unreadable \\(.*EOF'
    ):
      encoder.load(workdir)
    os.remove(vocabulary)
    with self.assertRaisesRegex(
      utils.UserError, f'^{re.escape(vocabulary)}: unreadable \\(.*No such'
    ):
      encoder.load(workdir)

  def test_dataset_without_vocabulary_saves_ids_only_encoder(self):
    rows = criteo_rows(30, seed=7)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    dataset, _, workdir = self._save('criteo', path)
    config = default.get_config()
    config.dataset = self.config('criteo', path)
    in_memory = dataclasses.replace(dataset, vocabulary=None)
    encoder.save(workdir, in_memory, config)
    enc = encoder.load(workdir)
    self.assertEqual(enc.field_dims, dataset.field_dims)
    self.assertEqual(enc.oov_ids, (None,) * 39)
    with self.assertRaisesRegex(utils.UserError, 'cannot encode raw rows'):
      enc.encode(path)


def _permuted(split, order):
  """`split`'s inputs and labels, rows in `order`."""
  return data.Split(
    *(
      None if a is None else np.asarray(a)[order]
      for a in (split.ids, split.labels, split.multi_ids, split.dense)
    )
  )


class SideInputsTest(EncoderTestCase):
  def _check_inputs(self, got, split, labeled=True):
    """`got` (`encoder.Rows`) holds `split`'s inputs, and labels if
    `labeled`, exactly."""
    for name in ('ids', 'multi_ids', 'dense'):
      want = getattr(split, name)
      if want is None:
        self.assertIsNone(getattr(got, name), name)
      else:
        self.assertEqual(getattr(got, name).dtype, want.dtype, name)
        np.testing.assert_array_equal(getattr(got, name), want, name)
    if labeled:
      np.testing.assert_array_equal(got.labels, split.labels)
    else:
      self.assertIsNone(got.labels)

  def test_csv_lists_and_numbers_from_file_frame_and_parquet(self):
    rows = feature_rows(300, seed=8)
    path = write_lines(os.path.join(self.tmp, 'train.csv'), rows, ',', HEADER)
    dataset, enc, workdir = self._save(
      'csv', path, min_count=MIN_COUNT, csv=csv_options()
    )
    train = dataset.train  # Every row, in file order.
    self.assertEqual(enc.side.multi_field_dims, dataset.multi_field_dims)
    self.assertEqual(
      enc.model_config().model.to_dict(),
      {
        'embed_dim': 3,
        'multi_field_dims': dataset.multi_field_dims,
        'num_dense': 2,
      },
    )
    self._check_inputs(enc.encode(path), train)
    chunks = list(enc.chunks(path, chunk_rows=64))
    self.assertLen(chunks, 5)
    np.testing.assert_array_equal(
      np.concatenate([c.multi_ids for c in chunks]), train.multi_ids
    )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    shuffled = frame[['colors', 'count', 'tags', 'shop', 'price']]
    other = os.path.join(self.tmp, 'test.csv')
    shuffled.to_csv(other, index=False)
    self._check_inputs(enc.encode(other), train, labeled=False)
    # Unlabelled, without an integer column: a bad float is named (it was an
    # UnboundLocalError).
    shuffled.assign(price=['cheap'] * len(shuffled)).to_csv(other, index=False)
    with self.assertRaisesRegex(
      data.DataError, r"test.csv:2: float column price 'cheap' is not a number"
    ):
      enc.encode(other)
    shuffled.to_csv(other, index=False)
    typed = shuffled.assign(
      price=shuffled['price'].replace('', 'nan').astype(float),
      count=shuffled['count'].astype(float),
    )
    parquet = os.path.join(self.tmp, 'test.parquet')
    typed.to_parquet(parquet)
    self._check_inputs(enc.encode(parquet), train, labeled=False)
    # A DataFrame's multi-hot cells may be lists.
    lists = typed.assign(tags=[c.split('|') for c in typed['tags']])
    self._check_inputs(enc.encode(lists), train, labeled=False)
    # Unseen and repeated values, a list longer than max_len, empty cells.
    self.assertEqual(enc.side.max_len, 4)
    new = pd.DataFrame(
      {
        'shop': ['a', 'zz'],
        'price': ['', str(enc.side.dense_mean[0] + enc.side.dense_std[0])],
        'count': ['nan', '3'],
        'tags': ['never| t0 |t0|t1|t2|t3', ''],
        'colors': [None, 'c0'],
      }
    )
    got = enc.encode(new)
    index = {k: i for i, k in enumerate(enc.side.multi_vocabulary[0])}
    keys = keying.string_keys(np.array(['t0', 't0', 't1'], object))
    tag_ids = [index[k] for k in keys]
    oov = enc.side.multi_field_dims[0] - 1
    np.testing.assert_array_equal(got.multi_ids[0, 0], [oov, *tag_ids])
    np.testing.assert_array_equal(got.multi_ids[0, 1], [-1] * 4)
    np.testing.assert_array_equal(got.multi_ids[1, 0], [-1] * 4)
    shop_a = train.ids[[r[1] for r in rows].index('a'), 0]
    np.testing.assert_array_equal(got.ids[:, 0], [shop_a, 5])  # 'zz': OOV.
    count = (3 - enc.side.dense_mean[1]) / enc.side.dense_std[1]
    np.testing.assert_allclose(got.dense, [[0, 0], [1, count]], atol=1e-6)
    files = sorted(os.listdir(os.path.join(workdir, 'encoder')))
    self.assertEqual(
      files, ['encoder.json', 'multi_vocabulary.npy', 'vocabulary.npy']
    )
    with open(os.path.join(workdir, 'encoder', 'encoder.json')) as f:
      meta = json.load(f)
    self.assertEqual(meta['multi_field_names'], ['tags', 'colors'])
    self.assertEqual(meta['multi_hot_sep'], '|')
    self.assertEqual(meta['max_len'], 4)
    # A server in another language takes the OOV ids from here.
    oov = [d - 1 for d in dataset.multi_field_dims]
    self.assertEqual(meta['multi_oov_ids'], oov)
    self.assertEqual(meta['multi_vocabulary_sizes'], oov)
    self.assertEqual(meta['dense_mean'], list(dataset.dense_mean))
    self.assertEqual(meta['dense_std'], list(dataset.dense_std))
    self.assertIn('missing', meta['rules']['numeric'])
    # A missing value in a list is dropped, as an empty one in a cell is.
    holes = lists.assign(tags=[[None, *t, np.nan] for t in lists['tags']])
    self._check_inputs(enc.encode(holes), train, labeled=False)
    for source in (frame, shuffled):  # With and without the label column.
      source = source.drop(columns=['price', 'colors'])
      listed = ', '.join(source.columns)  # Its own columns, nothing added.
      with self.assertRaisesRegex(
        data.DataError,
        f"^the DataFrame: no column 'price', which the model reads \\(its"
        f' config.dataset.csv.float_columns\\); the columns: {listed}\\.'
        ' Add it; an empty cell is a missing number \\(the training mean\\)',
      ):
        enc.encode(source)
    # An empty multi-hot cell is an empty list, not an unseen value.
    with self.assertRaisesRegex(
      data.DataError,
      "^the DataFrame: no column 'tags', .* an empty cell is an empty list",
    ):
      enc.encode(frame.drop(columns='tags'))
    with self.assertRaisesRegex(  # No rows: pd.DataFrame([]).
      data.DataError,
      r"^the DataFrame: no column '\w+', .* the columns: none\.",
    ):
      enc.encode(pd.DataFrame([]))

  def test_a_frame_cell_holding_a_collection_is_refused(self):
    # Written as its row's text, a list in a one-hot or numeric column or a
    # set in a multi-hot one was keyed as one value ("['a']"): silently out
    # of vocabulary. Lists and tuples in a multi-hot column are its values.
    rows = feature_rows(120, seed=3)
    path = write_lines(os.path.join(self.tmp, 'train.csv'), rows, ',', HEADER)
    dataset, enc, _ = self._save(
      'csv', path, min_count=MIN_COUNT, csv=csv_options()
    )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    tuples = frame.assign(tags=[tuple(c.split('|')) for c in frame['tags']])
    self._check_inputs(enc.encode(tuples), dataset.train)
    cases = (
      ('shop', lambda c: [c], r"a list \"\['[a-e]'\]\"; give one value a cell"),
      ('price', lambda c: [c], 'a list .*; give one value a cell'),
      ('click', lambda c: (c,), 'a tuple .*; give one value a cell'),
      ('tags', lambda c: set(c.split('|')), "a set .*; give a list .* '\\|'"),
      ('colors', lambda c: {'c': c}, 'a dict .*; give a list'),
    )
    for column, wrap, message in cases:
      with self.subTest(column):
        cells = frame[column].tolist()
        cells[2] = wrap(cells[2])
        cells = pd.Series(cells, dtype=object)
        with self.assertRaisesRegex(
          data.DataError, f'^DataFrame row 2: column {column} holds {message}'
        ):
          enc.encode(frame.assign(**{column: cells}))

  def test_a_quoted_header_with_the_label(self):
    # R's write.csv and pandas' QUOTE_NONNUMERIC quote the names: training
    # read them, the encoder took the table for one without its label.
    rng = np.random.default_rng(5)
    frame = pd.DataFrame(
      {
        'clicked': rng.integers(0, 2, 80),
        'user': [f'u{i}' for i in rng.integers(0, 9, 80)],
        'city': [f'{i:03d}' for i in rng.integers(0, 5, 80)],
      }
    )
    path = os.path.join(self.tmp, 'quoted.csv')
    frame.to_csv(path, index=False, quoting=csv_module.QUOTE_NONNUMERIC)
    with open(path) as f:
      self.assertEqual(f.readline(), '"clicked","user","city"\n')
    dataset, enc, _ = self._save('csv', path, csv={'label_column': 'clicked'})
    ids, labels = self._file_order(dataset)
    self._check_rows(enc.encode(path), ids, labels)
    frame.drop(columns='clicked').to_csv(
      path, index=False, quoting=csv_module.QUOTE_ALL
    )
    self._check_rows(enc.encode(path), ids, None)

  def test_parquet_lists_as_frames_read_as_training_reads_them(self):
    # pd.read_parquet gives every list of a list<int64> column with a null
    # as floats (7.0), keyed apart from training's 7: the docstring says to
    # read it as training does. A list<double> column keys its floats.
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(6)
    ints = [list(rng.integers(0, 12, rng.integers(0, 4))) for _ in range(90)]
    ints[4] = [3, None, 5]
    for kind, tags in (
      ('int64', pa.array(ints, pa.list_(pa.int64()))),
      ('float64', pa.array(ints, pa.list_(pa.float64()))),
    ):
      with self.subTest(kind):
        table = pa.table(
          {
            'y': rng.integers(0, 2, 90),
            'user': [f'u{i}' for i in rng.integers(0, 9, 90)],
            'tags': tags,
          }
        )
        path = os.path.join(self.tmp, f'{kind}.parquet')
        pq.write_table(table, path)
        options = {'label_column': 'y', 'multi_hot_columns': ('tags',)}
        dataset, enc, _ = self._save('csv', path, min_count=1, csv=options)
        frames = [pq.read_table(path).to_pandas(integer_object_nulls=True)]
        if kind == 'float64':
          frames.append(pd.read_parquet(path))
        for source in (path, *frames):
          got = enc.encode(source)
          np.testing.assert_array_equal(got.ids, dataset.train.ids)
          np.testing.assert_array_equal(got.multi_ids, dataset.train.multi_ids)

  def test_csv_header_only_blank_chunks_and_empty_frame_have_no_rows(self):
    rows = feature_rows(100, seed=8)
    path = write_lines(os.path.join(self.tmp, 'train.csv'), rows, ',', HEADER)
    _, enc, _ = self._save('csv', path, min_count=1, csv=csv_options())
    header_only = write_lines(os.path.join(self.tmp, 'h.csv'), [], ',', HEADER)
    blanks = write_lines(
      os.path.join(self.tmp, 'b.csv'),
      [rows[0], *[[]] * 3, rows[1]],
      ',',
      HEADER,
    )
    empty = pd.DataFrame({c: [] for c in HEADER[1:]})
    first_two = enc.encode(path)
    for source, n in ((header_only, 0), (blanks, 2), (empty, 0)):
      got = enc.encode(source)
      labeled = source is not empty  # The DataFrame has no click column.
      self.assertEqual(got.labels is None, not labeled)
      for name in ('ids', 'multi_ids', 'dense') + ('labels',) * labeled:
        want = getattr(first_two, name)[:n]
        self.assertEqual(getattr(got, name).dtype, want.dtype, name)
        np.testing.assert_array_equal(getattr(got, name), want, name)
    self.assertEqual(
      [len(c.ids) for c in enc.chunks(blanks, chunk_rows=2)], [1, 0, 1]
    )

  def test_inf_in_a_whole_number_column_is_a_data_error(self):
    rows = criteo_rows(20, seed=5)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    _, enc, _ = self._save('criteo', path)
    frame = _frame(rows, CRITEO_COLUMNS).astype({'I1': float})
    for value in (np.inf, -np.inf):
      frame.loc[2, 'I1'] = value
      with warnings.catch_warnings():  # No RuntimeWarning of the cast.
        warnings.simplefilter('error')
        with self.assertRaisesRegex(
          data.DataError,
          f"^DataFrame row 2: integer column I1 '{value}' is not an integer",
        ):
          enc.encode(frame)
    rows = feature_rows(50, seed=8)
    path = write_lines(os.path.join(self.tmp, 'train.csv'), rows, ',', HEADER)
    _, enc, _ = self._save('csv', path, csv=csv_options())
    frame = _frame(rows, HEADER).astype({'price': float}).round({'price': 0})
    frame.loc[3, 'price'] = np.inf
    with self.assertRaisesRegex(
      data.DataError, '^DataFrame row 3: float column price inf is not finite'
    ):
      enc.encode(frame)

  def test_criteo_dense_integers(self):
    rows = criteo_rows(200, seed=9)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    dataset, enc, _ = self._save(
      'criteo', path, min_count=2, criteo={'numeric': 'dense'}
    )
    self.assertEqual(enc.side.dense_names, tuple(CRITEO_COLUMNS[1:14]))
    self.assertLen(enc.field_dims, 26)
    # Its integers are numbers: no rule buckets them (encoder.json's words).
    rules = encoder_side.rules(enc.format, enc.options, enc.side)
    self.assertEqual(sorted(rules), ['categorical', 'ids', 'label', 'numeric'])
    self._check_inputs(enc.encode(path), dataset.train)
    frame = _frame(rows, CRITEO_COLUMNS).drop(columns='label')
    self._check_inputs(enc.encode(frame), dataset.train, labeled=False)

  def test_movielens_side_features_are_looked_up_by_user_and_movie(self):
    directory, ratings = self._ml100k()
    features = ('genres,year,age,gender',)
    dataset, enc, workdir = self._save(
      'ml-100k', directory, side_features=features
    )
    self.assertEqual(enc.side.features, ('genres', 'year', 'age', 'gender'))
    order = np.argsort(data.split_indices(len(ratings), (1, 0, 0), 0)[0])
    in_file_order = _permuted(dataset.train, order)
    got = enc.encode(os.path.join(directory, 'u.data'))
    self._check_inputs(got, in_file_order)
    # Unseen users and movies: OOV ids, empty lists, the mean year (0).
    frame = pd.DataFrame({'user': [1, 99, 99, 3], 'item': [4, 2, 77, 1]})
    got = enc.encode(frame)
    row = {(u, m): i for i, (u, m, _) in enumerate(ratings)}
    known = [row[1, 4], row[1, 2], None, row[3, 1]]
    oov = np.array(enc.field_dims) - 1
    for r, i in enumerate(known):
      if r != 2:  # Movie 77 is unseen: only the user part is known.
        np.testing.assert_array_equal(
          got.multi_ids[r], in_file_order.multi_ids[i]
        )
        np.testing.assert_array_equal(got.dense[r], in_file_order.dense[i])
    np.testing.assert_array_equal(got.ids[0], in_file_order.ids[row[1, 4]])
    np.testing.assert_array_equal(got.ids[3], in_file_order.ids[row[3, 1]])
    np.testing.assert_array_equal(got.ids[1, [0, 2, 3]], oov[[0, 2, 3]])
    self.assertEqual(got.ids[1, 1], in_file_order.ids[row[1, 2], 1])
    np.testing.assert_array_equal(got.ids[2], oov)
    np.testing.assert_array_equal(got.multi_ids[2], -1)
    np.testing.assert_array_equal(got.dense[2], 0)
    pairs = os.path.join(self.tmp, 'pairs.csv')
    with open(pairs, 'w') as f:
      f.write('1\t4\n99\t77\n')
    from_file = enc.encode(pairs)
    self.assertIsNone(from_file.labels)
    for name in ('ids', 'multi_ids', 'dense'):
      np.testing.assert_array_equal(
        getattr(from_file, name), getattr(got, name)[[0, 2]]
      )
    self.assertEqual(
      sorted(os.listdir(os.path.join(workdir, 'encoder'))),
      [
        'encoder.json',
        'multi_vocabulary.npy',
        'side_item_dense.npy',
        'side_item_multi_ids.npy',
        'side_user_ids.npy',
        'vocabulary.npy',
      ],
    )
    # A server without our code, following encoder.json's rules: the
    # encoded user and movie ids give the model's other inputs.
    directory = os.path.join(workdir, 'encoder')
    with open(os.path.join(directory, 'encoder.json')) as f:
      meta = json.load(f)
    rule = meta['rules']['side_features']
    tables = {
      name: np.load(os.path.join(directory, file))
      for name, file in meta['side_tables'].items()
    }
    self.assertIn('item_dense holds raw values, standardised', rule)
    # The ids of the raw user and movie ids, as the 'ids' rule says.
    self.assertIn("index in its field's part", meta['rules']['ids'])
    vocabulary = np.load(os.path.join(directory, 'vocabulary.npy'))
    ends = np.cumsum(meta['vocabulary_sizes'])
    raw_ids = frame[['user', 'item']].to_numpy()
    users, items = [
      np.array(
        [
          list(part).index(key) if key in part else meta['oov_ids'][f]
          for key in raw_ids[:, f]
        ]
      )
      for f, part in enumerate(np.split(vocabulary, ends[:-1])[:2])
    ]
    np.testing.assert_array_equal(users, got.ids[:, 0])
    np.testing.assert_array_equal(items, got.ids[:, 1])
    ids = np.concatenate([got.ids[:, :2], tables['user_ids'][users]], axis=1)
    raw = tables['item_dense'][items]
    dense = (raw - meta['dense_mean']) / meta['dense_std']
    np.testing.assert_array_equal(ids, got.ids)
    np.testing.assert_array_equal(tables['item_multi'][items], got.multi_ids)
    np.testing.assert_allclose(
      np.nan_to_num(dense).astype(np.float32), got.dense, rtol=1e-6
    )

  def test_a_resume_with_other_numbers_or_lists_is_refused(self):
    # The same one-hot vocabularies, other means or list vocabularies: the
    # checkpoints were trained on other inputs.
    path = write_lines(
      os.path.join(self.tmp, 'train.csv'),
      feature_rows(300, seed=8),
      ',',
      HEADER,
    )
    options = dict(min_count=MIN_COUNT, csv=csv_options())
    dataset, _, workdir = self._save('csv', path, **options)
    config = self._config('csv', path, **options)
    meta_path = os.path.join(workdir, 'encoder', 'encoder.json')
    with open(meta_path) as f:
      meta = json.load(f)
    encoder.save(workdir, dataset, config, resuming=True)  # The same.
    tags = dataset.multi_vocabulary[0]
    for changed, what in (
      (
        dict(dense_mean=(dataset.dense_mean[0] + 1, dataset.dense_mean[1])),
        'dense_mean',
      ),
      (
        dict(multi_vocabulary=(tags[:-1], *dataset.multi_vocabulary[1:])),
        'multi_vocabulary',
      ),
      (  # One more numeric column: every tuple longer.
        dict(
          dense_names=(*dataset.dense_names, 'new'),
          dense_mean=(*dataset.dense_mean, 0.0),
          dense_std=(*dataset.dense_std, 1.0),
        ),
        'dense_names',
      ),
      (  # Named by its field.
        dict(vocabulary=(dataset.vocabulary[0] + 1,)),
        'the shop vocabulary',
      ),
    ):
      other = dataclasses.replace(dataset, **changed)
      with self.assertRaisesRegex(utils.UserError, rf'\({what} changed\)'):
        encoder.save(workdir, other, config, resuming=True)
      with open(meta_path) as f:
        self.assertEqual(json.load(f), meta)

  def test_side_files_changed_since_the_data_were_loaded_are_refused(self):
    # The tables read again must fit the loaded dataset: not lists one
    # genre shorter (the same seven genres), nor another zip (as many).
    directory = os.path.join(self.tmp, 'ml-1m')
    os.makedirs(directory)
    _write_ml1m(directory)
    options = dict(side_features=('genres,zip',), min_count=1)
    config = self._config('ml-1m', directory, **options)
    dataset = data.load_dataset(config.dataset)
    workdir = os.path.join(self.tmp, 'run')
    shorter = (
      (b"::Animation|Children's|Comedy", b"::Animation|Children's"),
      (b'::Action|Adventure|Thriller', b'::Action|Adventure'),
      (b'::Action|Crime|Thriller', b'::Crime|Thriller'),
      (b'Noir::\n', b'Noir::Comedy\n'),
    )
    zip_code = ((b'::32067', b'::33067'),)
    for name, edits in (('movies.dat', shorter), ('users.dat', zip_code)):
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        text = original = f.read()
      for old, new in edits:
        self.assertIn(old, text)
        text = text.replace(old, new)
      with open(path, 'wb') as f:
        f.write(text)
      with self.assertRaisesRegex(
        RuntimeError,
        '^ml-1m: the side files give other fields than the cached dataset',
      ):
        encoder.save(workdir, dataset, config)
      self.assertFalse(os.path.exists(workdir))
      with open(path, 'wb') as f:
        f.write(original)
    encoder.save(workdir, dataset, config)  # The files as loaded.

  def test_a_new_encoder_without_side_tables_removes_theirs(self):
    # A run started again, without side features, in the workdir of one
    # stopped before its first checkpoint.
    directory, _ = self._ml100k()
    self._save('ml-100k', directory, side_features=('genres,year,age',))
    _, enc, workdir = self._save('ml-100k', directory)
    self.assertEqual(
      sorted(os.listdir(os.path.join(workdir, 'encoder'))),
      ['encoder.json', 'vocabulary.npy'],
    )
    self.assertEqual(enc.side, encoder_side.SideInputs())

  def test_a_resume_of_movielens_side_features_is_accepted(self):
    # The year table's last row, the OOV movie's, is NaN: equal to itself.
    directory, _ = self._ml100k()
    options = dict(side_features=('genres,year,age,gender',))
    dataset, enc, workdir = self._save('ml-100k', directory, **options)
    self.assertTrue(np.isnan(enc.side.item_dense[-1, 0]))
    config = self._config('ml-100k', directory, **options)
    encoder.save(workdir, dataset, config, resuming=True)

  def test_damaged_arrays_are_named_not_split_as_they_are(self):
    directory, _ = self._ml100k()
    options = dict(side_features=('genres,age',))
    _, _, workdir = self._save('ml-100k', directory, **options)
    path = os.path.join(workdir, 'encoder', 'vocabulary.npy')
    flat = np.load(path)
    np.save(path, flat[:-1])
    with self.assertRaisesRegex(
      utils.UserError,
      rf'vocabulary.npy: int64 \({len(flat) - 1},\), expected int64'
      rf' \({len(flat)},\)',
    ):
      encoder.load(workdir)
    np.save(path, flat.astype(np.int32))  # Keys of another type.
    with self.assertRaisesRegex(
      utils.UserError, rf'vocabulary.npy: int32 \({len(flat)},\), expected'
    ):
      encoder.load(workdir)
    np.save(path, flat)
    path = os.path.join(workdir, 'encoder', 'side_user_ids.npy')
    users = np.load(path)
    np.save(path, users[:-1])
    with self.assertRaisesRegex(
      utils.UserError,
      rf'side_user_ids.npy: {len(users) - 1} rows, expected {len(users)}',
    ):
      encoder.load(workdir)
    np.save(path, users.astype(np.int64))
    with self.assertRaisesRegex(
      utils.UserError,
      rf'^{re.escape(f"{path}: int64 {users.shape}, expected int32.")}$',
    ):
      encoder.load(workdir)
    np.save(path, users)
    path = os.path.join(workdir, 'encoder', 'multi_vocabulary.npy')
    flat = np.load(path)
    np.save(path, flat[:-1])  # np.split would give a genre fewer.
    with self.assertRaisesRegex(
      utils.UserError,
      rf'^{re.escape(path)}: int64 \({len(flat) - 1},\), expected int64'
      rf' \({len(flat)},\)\.$',
    ):
      encoder.load(workdir)
    with open(path, 'wb') as f:
      f.write(b'not an array')
    with self.assertRaisesRegex(
      utils.UserError, rf'^{re.escape(path)}: unreadable \(.*pickled'
    ):
      encoder.load(workdir)

  def test_a_resume_over_a_version_1_encoder_compares_its_ids_alone(self):
    # Layout 1 kept no side inputs: a resume of such a run (numeric or
    # multi-hot fields) was refused, "multi_field_names changed".
    rows = criteo_rows(60, seed=10)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    options = dict(min_count=2, criteo={'numeric': 'dense'})
    dataset, _, workdir = self._save('criteo', path, **options)
    meta_path = os.path.join(workdir, 'encoder', 'encoder.json')
    with open(meta_path) as f:
      meta = json.load(f)
    old = {key: meta[key] for key in V1_KEYS} | {'version': 1}
    with open(meta_path, 'w') as f:
      json.dump(old, f)
    config = default.get_config()
    config.dataset = self.config('criteo', path, split=(1.0, 0.0, 0.0))
    config.dataset.update(options)
    config.dataset.criteo.numeric = 'dense'
    config.model_name = 'fm'
    config.model = ml_collections.ConfigDict({'embed_dim': 3})
    encoder.save(workdir, dataset, config, resuming=True)
    with open(meta_path) as f:
      self.assertEqual(json.load(f), meta)
    with open(meta_path, 'w') as f:  # Its ids are still compared.
      json.dump(old | {'field_dims': [d + 1 for d in old['field_dims']]}, f)
    with self.assertRaisesRegex(utils.UserError, r'\(field_dims changed\)'):
      encoder.save(workdir, dataset, config, resuming=True)

  def test_version_1_encoders_still_load(self):
    rows = criteo_rows(60, seed=10)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    dataset, _, workdir = self._save('criteo', path, min_count=2)
    meta_path = os.path.join(workdir, 'encoder', 'encoder.json')
    with open(meta_path) as f:
      meta = json.load(f)
    self.assertEqual(meta['version'], 2)
    meta = {key: meta[key] for key in V1_KEYS} | {'version': 1}
    with open(meta_path, 'w') as f:
      json.dump(meta, f)
    old = encoder.load(workdir)
    self.assertEqual(old.side, encoder_side.SideInputs())
    self._check_inputs(old.encode(path), dataset.train)
    self.assertEqual(
      old.model_config().to_dict(),
      {'model_name': 'fm', 'model': {'embed_dim': 3}},
    )


_MULTI = encoder_side.SideInputs(multi_field_names=('tags',))
_DENSE = encoder_side.SideInputs(dense_names=('price',))


class RulesTest(parameterized.TestCase):
  """encoder.json's rules, in words, follow each format's options."""

  def test_numeric_rule_names_the_arithmetic_that_gives_dense(self):
    # It said "in float32": a server computing in float32 got other inputs
    # than predict.py for about half the values.
    side = dataclasses.replace(
      _DENSE, dense_mean=(49.794032700254554,), dense_std=(29.5118921810568,)
    )
    raw = np.random.default_rng(0).normal(50, 30, (1000, 1))
    want = side.standardized(raw, len(raw))
    mean, std = side.dense_mean[0], side.dense_std[0]
    wide = ((raw - mean) / std).astype(np.float32)
    narrow = (raw.astype(np.float32) - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(want, wide)
    self.assertGreater(np.mean(want != narrow), 0.2)
    rule = encoder_side.rules('csv', {}, side)['numeric']
    self.assertIn(', computed in float64 and then rounded to float32', rule)

  @parameterized.named_parameters(
    ('movielens', 'movielens', {}, None, {'keys': 'the raw user id and'}),
    ('libfm', 'libfm', {}, None, {'keys': 'the feature index of the line'}),
    (
      'libfm_ids',
      'libfm',
      {'field_dims': (3, 4)},
      None,
      {'keys': 'the feature index minus'},
    ),
    (
      'criteo',
      'criteo',
      {'log_bucket': True, 'numeric': 'buckets'},
      None,
      {'integer': 'key of an integer v: int(math.log'},
    ),
    (
      'criteo_raw',
      'criteo',
      {'log_bucket': False, 'numeric': 'buckets'},
      None,
      {'integer': 'key of an integer: the integer;'},
    ),
    (
      'criteo_dense',
      'criteo',
      {'log_bucket': True, 'numeric': 'dense'},
      _DENSE,
      {'numeric': 'log(1 + max(x, 0)) of the integer'},
    ),
    (
      'avazu',
      'avazu',
      {'hour_features': True},
      None,
      {'hour': 'hour_of_day and weekday'},
    ),
    (
      'avazu_hashed',
      'avazu',
      {'hour_features': False},
      None,
      {'hour': 'key of a categorical string'},
    ),
    ('csv', 'csv', {'numeric_columns': (), 'log_bucket': True}, None, {}),
    (
      'csv_ints',
      'csv',
      {'numeric_columns': ('n',), 'log_bucket': True},
      None,
      {'integer': 'key of an integer v: int(math.log'},
    ),
    (
      'csv_side',
      'csv',
      {'numeric_columns': (), 'multi_hot_sep': ';'},
      dataclasses.replace(_MULTI, dense_names=('price',)),
      {'multi_hot': "a cell split at ';'; each", 'numeric': '(value - '},
    ),
    (
      'movielens_side',
      'movielens',
      {},
      dataclasses.replace(_MULTI, features=('genres',)),
      {'keys': '', 'multi_hot': "the movie's list;", 'side_features': ''},
    ),
  )
  def test_words_of_each_format(self, fmt, options, inputs, starts):
    """Each rule starts with `starts[name]`; so do the label's and, for a
    CSV, Criteo or Avazu file, the categorical rule."""
    rules = encoder_side.rules(
      fmt, options, inputs or encoder_side.SideInputs()
    )
    label = {'movielens': 'rating > 3 is', 'libfm': 'a label > 0 is'}
    starts = {'label': label.get(fmt, '1 is a positive, 0 or -1')} | starts
    if fmt in ('csv', 'criteo', 'avazu'):
      starts = {'categorical': 'key of a categorical string'} | starts
    if 'field_dims' not in options:  # Else the keys are the ids.
      starts = {'ids': 'vocabulary.npy (int64) holds each field'} | starts
    self.assertEqual(sorted(rules), sorted(starts))
    for name, start in starts.items():
      self.assertStartsWith(rules[name], start)
