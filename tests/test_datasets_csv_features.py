"""CSV float and multi-hot columns, Criteo's dense option, and their cache.

Every array is compared with a brute-force parse of the same file: Python's
csv module, numpy statistics over the training rows, dicts for the
vocabularies.
"""

import collections
import csv as csv_module
import os
import random
from unittest import mock
import warnings

from absl import logging
from absl.testing import absltest
from dataset_testing import DatasetTestCase
from dataset_testing import criteo_rows
from dataset_testing import write_lines
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from test_data_integrity import _edit_meta
from test_data_integrity import _overwrite
from test_data_integrity import _update_checksum

import data
from datasets import cache
from datasets import csv
from datasets import keying

HEADER = ('click', 'shop', 'price', 'count', 'tags', 'colors')
MAX_LEN = 4
MIN_COUNT = 3


def _list(rng, prefix, vocab):
  """A '|' list of skewed values (some rare), with blanks and spaces."""
  k = rng.choice((0, 0, 1, 2, 3, 5, 7))
  values = [f'{prefix}{int(vocab * rng.random() ** 3)}' for _ in range(k)]
  if values and rng.random() < 0.2:
    values.insert(1, '')  # 'a||b': an empty value is dropped.
  return ' | '.join(values) if rng.random() < 0.5 else '|'.join(values)


def feature_rows(n, seed=0):
  """Rows of HEADER; the label depends on price and on the tags."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    kind = rng.random()
    price = rng.gauss(50, 20)
    cell = '' if kind < 0.1 else 'nan' if kind < 0.15 else f'{price:.3f}'
    tags = _list(rng, 't', 300)
    score = (price - 50) / 20 + (1.5 if 't0' in tags.split('|') else -0.5)
    label = int(score + rng.gauss(0, 0.5) > 0)
    rows.append(
      [
        str(label),
        rng.choice('abcde'),
        cell,
        str(rng.randint(0, 9)),
        tags,
        _list(rng, 'c', 6),
      ]
    )
  return rows


def parse_lists(cell):
  values = [v.strip() for v in cell.split('|')]
  return [v for v in values if v][:MAX_LEN]


def brute_force(rows, train_rows, columns=('tags', 'colors')):
  """Expected dense (standardised) and multi-hot ids of every row.

  Args:
    rows: the file's rows (lists of strings, HEADER order).
    train_rows: indices of the rows whose statistics and counts are used.
    columns: the multi-hot columns.

  Returns:
    dense float32 `[n, 2]`, mean `[2]`, std `[2]`, and per multi-hot column
    (kept values sorted by key, ids int32 `[n, longest]`).
  """
  raw = np.array([[float(r[2]) if r[2] else np.nan, float(r[3])] for r in rows])
  mean = np.nanmean(raw[train_rows], axis=0)
  std = np.nanstd(raw[train_rows], axis=0)
  dense = np.nan_to_num((raw - mean) / std, nan=0.0).astype(np.float32)
  lists = {c: [parse_lists(r[HEADER.index(c)]) for r in rows] for c in columns}
  longest = max(len(x) for c in columns for x in lists[c])
  multi = {}
  for c in columns:
    counts = collections.Counter(v for i in train_rows for v in lists[c][i])
    kept = [v for v, k in counts.items() if k >= MIN_COUNT]
    keys = keying.string_keys(np.array(kept, object))
    kept = [kept[i] for i in np.argsort(keys)]
    index = {v: i for i, v in enumerate(kept)}
    ids = np.full((len(rows), longest), -1, np.int32)
    for r, values in enumerate(lists[c]):
      ids[r, : len(values)] = [index.get(v, len(kept)) for v in values]
    multi[c] = (kept, ids)
  return dense, mean, std, multi


def csv_options(**overrides):
  options = dict(
    label_column='click',
    float_columns=('price', 'count'),
    multi_hot_columns=('tags,colors',),  # As a flag gives it.
    multi_hot_max_len=MAX_LEN,
  )
  options.update(overrides)
  return options


class CsvFeaturesTest(DatasetTestCase):
  def write(self, rows, name='train.csv', sep=','):
    return write_lines(os.path.join(self.tmp, name), rows, sep, HEADER)

  def load(self, path, **overrides):
    csv_overrides = overrides.pop('csv', {})
    config = self.config(
      'csv', path, min_count=MIN_COUNT, csv=csv_options(**csv_overrides)
    )
    config.update(overrides)
    return data.load_dataset(config)

  def test_random_split_matches_a_brute_force_parse(self):
    rows = feature_rows(600)
    dataset = self.load(self.write(rows))
    # Streamed rows stay in file order within each split; the vocabulary is
    # counted over every row (as the categorical fields' with a random split)
    # and the statistics over the training rows.
    parts = [np.sort(p) for p in data.split_indices(600, (0.8, 0.1, 0.1), 0)]
    dense, mean, std, multi = brute_force(rows, parts[0])
    all_rows = np.arange(600)
    _, _, _, multi = brute_force(rows, all_rows)
    self.assertEqual(dataset.field_names, ('shop',))
    self.assertEqual(dataset.dense_names, ('price', 'count'))
    self.assertEqual(dataset.multi_field_names, ('tags', 'colors'))
    np.testing.assert_allclose(dataset.dense_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(dataset.dense_std, std, rtol=1e-12)
    for split, part in zip(
      (dataset.train, dataset.valid, dataset.test), parts, strict=True
    ):
      np.testing.assert_allclose(split.dense, dense[part], atol=1e-6)
      self.assertEqual(split.dense.dtype, np.float32)
      self.assertEqual(split.multi_ids.dtype, np.int32)
      for m, column in enumerate(('tags', 'colors')):
        np.testing.assert_array_equal(
          split.multi_ids[:, m], multi[column][1][part]
        )
    for m, column in enumerate(('tags', 'colors')):
      kept = multi[column][0]
      self.assertEqual(dataset.multi_field_dims[m], len(kept) + 1)
      np.testing.assert_array_equal(
        dataset.multi_vocabulary[m], np.sort(keying.string_keys(kept))
      )
    # Lists longer than MAX_LEN were cut, and some values are OOV.
    self.assertEqual(dataset.train.multi_ids.shape[2], MAX_LEN)
    self.assertIn(dataset.multi_field_dims[0] - 1, dataset.train.multi_ids)

  def test_predefined_splits_use_the_training_file_statistics(self):
    rows = [feature_rows(300, seed=s) for s in (1, 2, 3)]
    for row in rows[0]:  # Training lists of 2 values at most.
      row[4], row[5] = ('|'.join(parse_lists(c)[:2]) for c in row[4:6])
    paths = [
      self.write(r, f'{name}.csv')
      for r, name in zip(rows, ('train', 'valid', 'test'), strict=True)
    ]
    dataset = self.load(paths[0], valid_path=paths[1], test_path=paths[2])
    everything = rows[0] + rows[1] + rows[2]
    # Statistics and counts of the training rows; the longest list of all.
    dense, mean, std, multi = brute_force(everything, np.arange(300))
    np.testing.assert_allclose(dataset.dense_mean, mean, rtol=1e-12)
    self.assertEqual(dataset.valid.multi_ids.shape[2], MAX_LEN)
    for s, split in enumerate((dataset.train, dataset.valid, dataset.test)):
      part = slice(300 * s, 300 * (s + 1))
      np.testing.assert_allclose(split.dense, dense[part], atol=1e-6)
      for m, column in enumerate(('tags', 'colors')):
        np.testing.assert_array_equal(
          split.multi_ids[:, m], multi[column][1][part]
        )
    for m, column in enumerate(('tags', 'colors')):
      np.testing.assert_array_equal(
        dataset.multi_vocabulary[m],
        np.sort(keying.string_keys(multi[column][0])),
      )

  def test_a_bad_float_names_file_line_and_column(self):
    rows = feature_rows(200)
    rows[130][2] = '"12,5"'  # A decimal comma, quoted: one column.
    path = self.write(rows)
    with self.assertRaisesRegex(
      data.DataError,
      rf"^{path}:132: float column price '12,5' is not a number \(set",
    ):
      self.load(path)
    # With an integer column beside it, still not a number (it said 'is out
    # of range', the integer column's word for an integral row).
    with self.assertRaisesRegex(
      data.DataError, rf"^{path}:132: float column price '12,5' is not a num"
    ):
      self.load(
        path, csv=dict(float_columns=('price',), numeric_columns=('count',))
      )
    rows[130][2] = 'inf'
    with self.assertRaisesRegex(
      data.DataError, rf'^{path}:132: float column price inf is not finite'
    ):
      self.load(self.write(rows))
    dataset = self.load(self.write(rows), skip_bad_lines=True)
    splits = (dataset.train, dataset.valid, dataset.test)
    self.assertEqual(sum(map(len, splits)), 199)
    # Finite, but beyond float32: named while parsing, without a warning.
    beyond = r'is beyond float32 range \(\+-3\.403e\+38\) \(set'
    for cell, shown in (('1e300', r'1e\+300'), ('-1e39', r'-1e\+39')):
      rows[130][2] = cell
      rows[7][3] = '3.4e38'  # Within float32's range.
      with warnings.catch_warnings():
        warnings.simplefilter('error')
        with self.assertRaisesRegex(
          data.DataError, rf'^{path}:132: float column price {shown} {beyond}'
        ):
          self.load(self.write(rows))
        dataset = self.load(self.write(rows), skip_bad_lines=True)
      splits = (dataset.train, dataset.valid, dataset.test)
      self.assertEqual(sum(map(len, splits)), 199)

  def test_config_errors_name_the_key(self):
    path = self.write(feature_rows(50))
    cases = (
      (dict(multi_hot_sep=','), r'multi_hot_sep=\',\' must be a non-empty'),
      (
        dict(float_columns=('shop',), categorical_columns=('shop',)),
        r"\['shop'\] named twice",
      ),
      (dict(multi_hot_columns=('no',)), "multi_hot_columns: column 'no'"),
    )
    for options, message in cases:
      with self.assertRaisesRegex(data.DataError, message):
        self.load(path, csv=options)

  def test_parquet_gives_the_csv_arrays(self):
    rows = feature_rows(300)
    path = self.write(rows)
    parquet = os.path.join(self.tmp, 'train.parquet')
    with open(path) as f:
      header, *body = list(csv_module.reader(f))
    pd.DataFrame(body, columns=header).to_parquet(parquet)
    a, b = self.load(path), self.load(parquet)
    np.testing.assert_array_equal(a.train.multi_ids, b.train.multi_ids)
    np.testing.assert_allclose(a.train.dense, b.train.dense, atol=1e-6)

  def test_a_multi_hot_column_empty_in_every_row(self):
    rows = feature_rows(200)
    for row in rows:
      row[5] = ''  # colors.
    dataset = self.load(self.write(rows))
    self.assertEqual(dataset.multi_field_dims[1], 1)  # The rare values' id.
    for split in (dataset.train, dataset.valid, dataset.test):
      np.testing.assert_array_equal(split.multi_ids[:, 1], -1)
    self.assertGreater(dataset.multi_field_dims[0], 1)  # tags as before.
    for row in rows:
      row[4] = ''  # tags too: every list empty, still one column of -1.
    dataset = self.load(self.write(rows))
    self.assertEqual(dataset.multi_field_dims, (1, 1))
    for split in (dataset.train, dataset.valid, dataset.test):
      np.testing.assert_array_equal(
        split.multi_ids, np.full((len(split), 2, 1), -1)
      )

  def test_typed_parquet_gives_the_csv_arrays(self):
    # Parquet as a user writes it: integer ids with nulls in some record
    # batches only, and the multi-hot values as list columns.
    rows = feature_rows(300)
    for i in range(0, 100, 7):
      rows[i][1] = ''  # shop, missing in the first batches only.
    for row in rows:
      row[1] = str('abcde'.index(row[1]) + 1) if row[1] else ''
    path = self.write(rows)
    frame = pd.DataFrame(rows, columns=HEADER)
    frame = frame.assign(
      click=frame.click.astype(int),
      shop=pd.array([int(x) if x else None for x in frame.shop], 'Int64'),
      price=[float(x) if x else None for x in frame.price],
      count=frame['count'].astype(int),
      tags=[[v.strip() for v in x.split('|') if v.strip()] for x in frame.tags],
      colors=[
        [v.strip() for v in x.split('|') if v.strip()] for x in frame.colors
      ],
    )
    parquet = os.path.join(self.tmp, 'typed.parquet')
    # Without pandas' metadata, as other writers (Spark, pyarrow) leave it.
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata(None), parquet)
    a = self.load(path, chunk_rows=20)
    b = self.load(parquet, chunk_rows=20)  # Batches with and without nulls.
    self.assertEqual(a.field_dims, b.field_dims)
    # Five shops, the missing value and the rare values' id.
    self.assertEqual(a.field_dims[0], 7)
    for x, y in ((a.train, b.train), (a.test, b.test)):
      np.testing.assert_array_equal(x.ids, y.ids)
      np.testing.assert_array_equal(x.multi_ids, y.multi_ids)
      np.testing.assert_allclose(x.dense, y.dense, atol=1e-6)

  def test_parquet_list_column_outside_multi_hot_is_refused(self):
    # A list column that is not a multi-hot field (here one of the default
    # categorical columns, every column not named) was keyed as the printed
    # array "['a' 'b']", one opaque value per list.
    frame = pd.DataFrame(
      {
        'click': [1, 0, 1, 0],
        'shop': ['a', 'b', 'a', 'c'],
        'tags': [['x'], ['x', 'y'], [], ['y']],
      }
    )
    parquet = os.path.join(self.tmp, 'lists.parquet')
    frame.to_parquet(parquet)
    message = (
      rf'^{parquet}: column tags holds lists, which only a multi-hot field'
      r' reads: name it in config\.dataset\.csv\.multi_hot_columns'
    )
    for options in (
      dict(float_columns=(), multi_hot_columns=()),
      dict(
        float_columns=(), multi_hot_columns=(), categorical_columns=('tags',)
      ),
    ):
      with self.subTest(**options):
        with self.assertRaisesRegex(data.DataError, message):
          self.load(parquet, csv=options)
    dataset = self.load(
      parquet,
      csv=dict(float_columns=(), multi_hot_columns=('tags',)),
      min_count=1,
      split=(0.5, 0.25, 0.25),
    )
    self.assertEqual(dataset.multi_field_dims, (3,))  # x, y and unseen.

  def test_column_lists_are_names_however_given(self):
    # A flag's 'tags,colors' was kept as one string: encoder.json showed
    # ['tags,colors'], and the same columns as a tuple built another cache.
    path = self.write(feature_rows(200))
    flag = self.load(path)
    _, _, options = data.resolve(self.config('csv', path, csv=csv_options()))
    self.assertEqual(options.multi_hot_columns, ('tags', 'colors'))
    self.assertEqual(options.float_columns, ('price', 'count'))
    with mock.patch.object(csv, 'build', side_effect=AssertionError):
      names = self.load(path, csv=dict(multi_hot_columns=('tags', 'colors')))
    self.assertLen(self.encoded(), 1)  # Served from the flag's cache.
    self.assertEqual(names.multi_field_names, flag.multi_field_names)

  def test_cache_round_trip_and_damage_of_the_new_arrays(self):
    path = self.write(feature_rows(400))
    first = self.load(path)
    with mock.patch.object(csv, 'build', side_effect=AssertionError):
      again = self.load(path)  # Served from the cache.
    for name in ('train', 'valid', 'test'):
      for key in ('multi_ids', 'dense'):
        np.testing.assert_array_equal(
          getattr(getattr(first, name), key), getattr(getattr(again, name), key)
        )
    self.assertEqual(again.dense_mean, first.dense_mean)
    np.testing.assert_array_equal(
      again.multi_vocabulary[1], first.multi_vocabulary[1]
    )
    [directory] = [
      os.path.join(self.tmp, 'cache', 'encoded', n) for n in self.encoded()
    ]
    # Nothing else: the raw float64 values went once standardised.
    arrays = ('ids', 'labels', 'multi_ids', 'dense')
    expected = [
      f'{s}_{a}.npy' for s in ('train', 'valid', 'test') for a in arrays
    ]
    expected += ['vocab.npy', 'multi_vocab.npy', 'meta.json']
    self.assertCountEqual(os.listdir(directory), expected)
    config = self.config('csv', path, min_count=MIN_COUNT, csv=csv_options())
    _, config, options = data.resolve(config)
    spec = data.cache_spec(config, options, {'all': path})
    del first, again

    def damaged(file, change):
      """Messages of `change` to `file`, then with its checksum updated."""
      kept = {}
      for name in (f'{file}.npy', 'meta.json'):
        with open(f'{directory}/{name}', 'rb') as f:
          kept[name] = f.read()
      values = np.load(f'{directory}/{file}.npy')
      change(values)
      _overwrite(f'{directory}/{file}.npy', values, values.dtype)
      with self.assertRaises(cache.Damaged) as caught:
        cache.read(directory, spec)
      _update_checksum(directory, file)
      with self.assertRaises(cache.Damaged) as matching:
        cache.read(directory, spec)
      for name, content in kept.items():  # Undone for the next damage.
        with open(f'{directory}/{name}', 'wb') as f:
          f.write(content)
      cache.read(directory, spec)
      return str(caught.exception), str(matching.exception)

    def big_id(v):
      v[3, 1, 0] = 10**6

    def id_after_padding(v):
      v[:, 0, -1] = np.where(v[:, 0, 0] < 0, 0, v[:, 0, -1])

    def nan(v):
      v[2, 1] = np.nan

    self.assertEqual(
      damaged('train_multi_ids', big_id),
      (
        'train_multi_ids.npy: its checksum differs from meta.json',
        'train_multi_ids.npy: multi-hot ids outside [-1, multi_field_dims)'
        ' in field(s) [1]',
      ),
    )
    self.assertIn(
      'after the -1 padding', damaged('valid_multi_ids', id_after_padding)[1]
    )
    self.assertEqual(
      damaged('test_dense', nan)[1],
      'test_dense.npy: numeric values that are not finite in field(s) [1]',
    )
    _overwrite(f'{directory}/test_dense.npy', np.inf, np.float32)
    with self.assertLogs(level='WARNING') as logs:
      repaired = self.load(path)
    self.assertIn('Rebuilding the damaged cache', logs.output[0])
    self.assertLen(  # Once, not again when the cache's lock is taken.
      [line for line in logs.output if 'damaged cache' in line], 1
    )
    self.assertTrue(np.isfinite(repaired.test.dense).all())
    os.remove(f'{directory}/train_dense.npy')
    with self.assertRaisesRegex(cache.Damaged, 'train_dense.npy'):
      cache.read(directory, spec)
    _edit_meta(directory, lambda meta: meta.update(max_len=0))
    with self.assertRaisesRegex(
      cache.Damaged, r'^meta\.json: multi-hot names, dims and max_len disagree'
    ):
      cache.read(directory, spec)


class CriteoDenseTest(DatasetTestCase):
  def test_integer_columns_become_standardised_log_values(self):
    rows = criteo_rows(400, seed=3)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    dense = data.load_dataset(
      self.config('criteo', path, min_count=2, criteo=dict(numeric='dense'))
    )
    buckets = data.load_dataset(self.config('criteo', path, min_count=2))
    self.assertEqual(dense.field_names, buckets.field_names[13:])
    self.assertEqual(dense.dense_names, buckets.field_names[:13])
    # The categorical fields are encoded as before.
    np.testing.assert_array_equal(dense.train.ids, buckets.train.ids[:, 13:])
    raw = np.array(
      [
        [np.log1p(max(int(v), 0)) if v else np.nan for v in r[1:14]]
        for r in rows
      ]
    )
    parts = [np.sort(p) for p in data.split_indices(400, (0.8, 0.1, 0.1), 0)]
    mean = np.nanmean(raw[parts[0]], axis=0)
    std = np.nanstd(raw[parts[0]], axis=0)
    expected = np.nan_to_num((raw - mean) / std, nan=0.0)
    for split, part in zip(
      (dense.train, dense.valid, dense.test), parts, strict=True
    ):
      np.testing.assert_allclose(split.dense, expected[part], atol=1e-5)
    self.assertIsNone(buckets.train.dense)

  def test_log_bucket_off_with_dense_numbers_is_said_to_do_nothing(self):
    # It was silently ignored: dense numbers are never bucketed.
    path = write_lines(os.path.join(self.tmp, 't.txt'), criteo_rows(40), '\t')
    for options, warned in (
      (dict(numeric='dense', log_bucket=False), True),
      (dict(numeric='dense'), False),
      (dict(log_bucket=False), False),  # Buckets: it applies.
    ):
      with self.subTest(**options):
        with self.assertLogs(level='WARNING') as logs:
          logging.warning('sentinel')
          data.load_dataset(
            self.config('criteo', path, split=(1.0, 0, 0), criteo=options)
          )
        said = [r.getMessage() for r in logs.records[1:]]
        self.assertEqual(
          [m for m in said if 'log_bucket=False has no effect' in m] != [],
          warned,
          said,
        )

  def test_unknown_numeric_mode_is_an_error(self):
    path = write_lines(os.path.join(self.tmp, 't.txt'), criteo_rows(20), '\t')
    config = self.config('criteo', path, criteo=dict(numeric='log'))
    with self.assertRaisesRegex(data.DataError, 'criteo.numeric=.log. must'):
      data.load_dataset(config)


if __name__ == '__main__':
  absltest.main()
