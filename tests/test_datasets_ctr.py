"""Tests of the CTR sources: Criteo, Avazu, libFM and CSV/Parquet.

Every file is synthetic, written by the test. Encodings are checked against
a pure-Python transcription of pytorch-fm's preprocessing
(tests/dataset_testing.py) run on the same lines.
"""

import collections
import datetime
import gzip
import json
import logging
import os
import random

from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import DatasetTestCase
from dataset_testing import all_rows
from dataset_testing import assert_same_encoding
from dataset_testing import avazu_rows
from dataset_testing import convert_numeric_feature
from dataset_testing import criteo_rows
from dataset_testing import reference_encode
from dataset_testing import write_lines
import ml_collections
import numpy as np
import pandas as pd

import config_check
from configs import default
import data
from datasets import avazu
from datasets import criteo
from datasets import csv
from datasets import encode
from datasets import keying
from datasets import libfm
from datasets import streaming


def _csv_table(header=('y', 'a', 'b'), **options):
  """The table of a CSV file `f.csv` with `header`, label column y."""
  options = ml_collections.ConfigDict(
    dict(csv.DEFAULTS, label_column='y', **options)
  )
  return csv.table(options, header, 'f.csv')


def _parse(table, lines, skip=False):
  """(keys, labels, lines skipped) of `table.parse` of lines 1, 2, ..."""
  bad = streaming.BadLines(skip, log=False)
  lines = [
    line if isinstance(line, bytes) else line.encode() + b'\n' for line in lines
  ]
  keys, labels, *_ = table.parse(lines, 1, lambda n: f'f.csv:{n}', bad)
  return keys, labels, bad.count


class IntegerRuleTest(absltest.TestCase):
  def test_keys_are_pytorch_fm_classes_on_every_bucket_edge(self):
    edges = keying.log_bucket_edges()
    values = set(range(-5, 3000))
    for e in edges[:: max(1, len(edges) // 300)].tolist() + edges[-3:].tolist():
      values.update((e - 1, e, e + 1))
    values.update(random.Random(0).randrange(3, 1 << 62) for _ in range(2000))
    values = np.array(sorted(values), np.int64)
    keys = keying.int_feature_keys(values, np.zeros(len(values), bool))
    expected = [int(convert_numeric_feature(str(v))) for v in values.tolist()]
    np.testing.assert_array_equal(keys, expected)
    missing = keying.int_feature_keys(np.array([7, 7]), np.array([True, False]))
    self.assertEqual(missing[0], keying.MISSING_INT)
    self.assertEqual(missing[1], 3)  # int(log(7) ** 2) = int(3.79)

  def test_int64_min_is_out_of_range_not_a_missing_value(self):
    lines = [
      '1,5,x',
      '0,-9223372036854775808,y',
      '1,,z',
      '0,-4611686018427387903,w',
    ]
    for bucket in (True, False):
      table = _csv_table(numeric_columns='a', log_bucket=bucket)
      with self.assertRaisesRegex(
        data.DataError, r'^f\.csv:2: a -9223372036854775808 is out of range'
      ):
        _parse(table, lines)
      keys, labels, skipped = _parse(table, lines, skip=True)
      self.assertEqual(skipped, 1)
      np.testing.assert_array_equal(labels, [1, 1, 0])
      self.assertEqual(keys[1, 0], keying.MISSING_INT)  # The empty cell only.
      self.assertNotIn(keying.MISSING_INT, keys[[0, 2], 0])

  def test_integers_next_to_the_limit_beside_a_bad_value(self):
    # A float64 rounds 2**62 - 1 to 2**62: the check of a chunk with a bad
    # value must not call the good ones next to the limit bad.
    limit = keying.INT_LIMIT
    lines = [f'1,{limit - 1},x', '0,z,y', f'1,{1 - limit},w', f'0,{limit},v']
    table = _csv_table(numeric_columns='a', log_bucket=False)
    with self.assertRaisesRegex(
      data.DataError, r"^f\.csv:2: integer column a 'z' is not an integer"
    ):
      _parse(table, lines)
    with self.assertRaisesRegex(
      data.DataError, rf'^f\.csv:4: a {limit} is out of range'
    ):
      _parse(table, [lines[0], '0,5,y', *lines[2:]])
    keys, labels, skipped = _parse(table, lines, skip=True)
    self.assertEqual(skipped, 2)
    np.testing.assert_array_equal(keys[:, 0], [limit - 1, 1 - limit])

  def test_a_whole_float_in_a_chunk_rounds_no_other_integer(self):
    # pandas reads the column as floats for '1e2': 2**53 + 1 kept its digits.
    table = _csv_table(numeric_columns='a', log_bucket=False)
    big = [2**53 + 1, keying.INT_LIMIT - 1, 1 - keying.INT_LIMIT]
    lines = ['1,1e2,x', *(f'0,{v},y' for v in big), '1,,z', '0,"1.0",w']
    keys, _, skipped = _parse(table, lines)
    self.assertEqual(skipped, 0)
    np.testing.assert_array_equal(
      keys[:, 0], [100, *big, keying.MISSING_INT, 1]
    )

  def test_two_to_the_53_beside_a_whole_float_keeps_its_neighbour(self):
    # Read as floats, 2**53 + 1 becomes 2**53: both must keep their digits.
    table = _csv_table(numeric_columns='a', log_bucket=False)
    lines = ['1,1.0,x', f'0,{2**53},y', f'1,{2**53 + 1},z']
    keys, _, _ = _parse(table, lines)
    np.testing.assert_array_equal(keys[:, 0], [1, 2**53, 2**53 + 1])

  def test_minus_the_limit_is_out_of_range_as_the_limit_is(self):
    table = _csv_table(numeric_columns='a', log_bucket=False)
    limit = keying.INT_LIMIT
    with self.assertRaisesRegex(
      data.DataError, rf'^f\.csv:2: a {-limit} is out of range'
    ):
      _parse(table, ['1,5,x', f'0,{-limit},y', f'1,{2**53},z'])

  def test_an_infinite_criteo_count_read_as_a_number_is_a_bad_line(self):
    # log(1 + max(x, 0)) would make -inf a finite 0.
    options = ml_collections.ConfigDict(dict(criteo.DEFAULTS, numeric='dense'))
    table = criteo.reader(options, '')
    rows = criteo_rows(3, seed=2)
    rows[1][1] = '-inf'
    lines = ['\t'.join(r) for r in rows]
    with self.assertRaisesRegex(
      data.DataError, r'^f\.csv:2: float column I1 -inf is not finite'
    ):
      _parse(table, lines)

  def test_a_line_with_two_bad_integers_is_one_bad_line(self):
    table = _csv_table(numeric_columns=('a', 'b'))
    lines = ['1,5,6', '0,x,y', '1,7,8']
    keys, labels, skipped = _parse(table, lines, skip=True)
    self.assertEqual(skipped, 1)
    np.testing.assert_array_equal(labels, [1, 1])

  def test_only_whole_floats_in_range_become_integers(self):
    # A DataFrame's integer column with a missing value holds floats; one
    # beyond the range stays a float, which the parser names, where a cast
    # would raise a TypeError.
    whole = pd.Series([3.0, np.nan, -7.0])
    self.assertEqual(str(csv.integral(whole).dtype), 'Int64')
    for values in ([3.0, np.nan, 1e20], [3.5, np.nan]):
      column = pd.Series(values)
      self.assertIs(csv.integral(column), column)

  def test_an_integer_beyond_int64_is_out_of_range(self):
    table = _csv_table(numeric_columns='a')
    for value in ('99999999999999999999', '-1e30'):
      with self.assertRaisesRegex(
        data.DataError,
        rf"^f\.csv:2: integer column a '{value}' is out of range",
      ):
        _parse(table, ['1,5,x', f'0,{value},y'])

  def test_bytes_that_are_not_utf8_are_a_bad_line(self):
    # Latin-1's a-umlaut and o-umlaut would both read as U+FFFD: one id.
    table = _csv_table()
    lines = ['1,K\u00e4se,x'.encode('latin-1') + b'\n', b'0,Kase,y\n']
    lines.insert(1, '0,K\u00f6se,z'.encode('latin-1') + b'\n')
    with self.assertRaisesRegex(
      data.DataError, r'^f\.csv:1: byte 0xe4 at column 4 is not UTF-8'
    ):
      _parse(table, lines)
    keys, labels, skipped = _parse(table, lines, skip=True)
    self.assertEqual(skipped, 2)
    np.testing.assert_array_equal(labels, [0])
    utf8 = [x.decode('latin-1').encode() for x in lines]
    keys, _, skipped = _parse(table, utf8)
    self.assertEqual(skipped, 0)
    self.assertEqual(len(set(keys[:, 0])), 3)

  def test_a_quoted_line_longer_than_the_csv_modules_field_limit(self):
    table = _csv_table()
    tags = '|'.join(f't{j}' for j in range(30_000))  # 200 KB.
    keys, _, skipped = _parse(table, ['1,a,b', f'0,"u,1",{tags}'])
    self.assertEqual(skipped, 0)
    self.assertEqual(keys[1, 1], keying.string_keys(np.array([tags]))[0])

  def test_counts_merge_in_chunks_like_a_counter(self):
    rng = np.random.default_rng(0)
    counter = encode.Counts()
    counter.MIN_MERGE = 10  # Merge often.
    expected = collections.Counter()
    for _ in range(30):
      keys = rng.zipf(1.5, size=rng.integers(1, 200)) * 7 - 50
      counter.add(keys.astype(np.int64))
      expected.update(keys.tolist())
    for min_count in (1, 2, 5):
      np.testing.assert_array_equal(
        counter.kept(min_count),
        sorted(k for k, c in expected.items() if c >= min_count),
      )

  def test_counts_widen_before_they_could_overflow_int32(self):
    counter = encode.Counts()
    counter.MIN_MERGE = 1
    counter.add(np.array([5, 5, 7], np.int64))
    self.assertEqual(counter.counts.dtype, np.int32)
    counter.counts[0] = np.iinfo(np.int32).max - 1  # As if seen that often.
    counter._added = np.iinfo(np.int32).max - 1
    counter.add(np.array([5, 5, 9], np.int64))  # 5 passes 2**31 - 1.
    self.assertEqual(counter.counts.dtype, np.int64)
    np.testing.assert_array_equal(counter.keys, [5, 7, 9])
    np.testing.assert_array_equal(counter.counts, [2**31, 1, 1])

  def test_counts_widen_by_rows_added_not_distinct_keys(self):
    counter = encode.Counts()
    counter.MIN_MERGE = 1
    counter.add(np.array([5], np.int64))
    counter.counts[0] = np.iinfo(np.int32).max - 1  # As if seen that often.
    counter._added = np.iinfo(np.int32).max - 1
    counter.add(np.array([5, 5], np.int64))  # One distinct key, two rows.
    np.testing.assert_array_equal(counter.counts, [2**31])


class CriteoTest(DatasetTestCase):
  @parameterized.parameters(
    dict(min_count=-1, log_bucket=True, expected_min=10),
    dict(min_count=3, log_bucket=True, expected_min=3),
    dict(min_count=1, log_bucket=False, expected_min=1),
  )
  def test_encoding_matches_reference(
    self, min_count, log_bucket, expected_min
  ):
    rows = criteo_rows(700)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    config = self.config(
      'criteo',
      path,
      split=(1.0, 0.0, 0.0),
      min_count=min_count,
      criteo=dict(log_bucket=log_bucket),
    )
    dataset = data.load_dataset(config)
    ids, labels = all_rows(dataset)
    ref_ids, ref_dims = reference_encode(
      [r[1:] for r in rows], set(range(13)), expected_min, bucket=log_bucket
    )
    assert_same_encoding(self, ids, dataset.field_dims, ref_ids, ref_dims)
    np.testing.assert_array_equal(labels, [float(r[0]) for r in rows])
    self.assertEqual(dataset.field_names[0], 'I1')
    self.assertEqual(dataset.field_names[-1], 'C26')
    self.assertIsInstance(dataset.train.ids, np.memmap)
    self.assertEqual(dataset.train.ids.dtype, np.int32)
    self.assertEqual(dataset.train.labels.dtype, np.float32)

  def test_a_directory_says_which_of_its_files_it_does_not_read(self):
    # Its dev and test files were passed over, silently: the training file
    # was split at random.
    directory = os.path.join(self.tmp, 'criteo')
    os.makedirs(directory)
    rows = criteo_rows(40, seed=2)
    for name in ('train.txt', 'dev.txt', 'test.txt', 'readme.txt'):
      write_lines(os.path.join(directory, name), rows, '\t')
    config = self.config('criteo', directory)
    with self.assertLogs(level='WARNING') as logs:
      files = encode.source_files(config)
    self.assertEqual(files, {'all': os.path.join(directory, 'train.txt')})
    self.assertEqual(
      [r.getMessage() for r in logs.records],
      [
        f'config.dataset.path {directory} is a directory: train.txt trains,'
        ' split at random; dev.txt, test.txt there not read (labelled'
        ' validation and test files are named with config.dataset.valid_path'
        ' and test_path).'
      ],
    )
    config = self.config(
      'criteo',
      directory,
      valid_path=os.path.join(directory, 'dev.txt'),
      test_path=os.path.join(directory, 'test.txt'),
    )
    with self.assertNoLogs(level='WARNING'):
      encode.source_files(config)
    os.remove(os.path.join(directory, 'dev.txt'))
    os.remove(os.path.join(directory, 'test.txt'))
    with self.assertNoLogs(level='WARNING'):
      encode.source_files(self.config('criteo', directory))

  def test_gzip_and_crlf_sources_encode_the_same(self):
    rows = criteo_rows(300, seed=2)
    plain = write_lines(os.path.join(self.tmp, 'a.txt'), rows, '\t')
    packed = os.path.join(self.tmp, 'b.txt.gz')
    with gzip.open(packed, 'wt', newline='') as f:
      f.write(''.join('\t'.join(r) + '\r\n' for r in rows))
    a = data.load_dataset(self.config('criteo', plain))
    b = data.load_dataset(self.config('criteo', packed))
    self.assertEqual(a.field_dims, b.field_dims)
    for split in ('train', 'valid', 'test'):
      np.testing.assert_array_equal(
        getattr(a, split).ids, getattr(b, split).ids
      )

  def test_predefined_splits_count_values_on_train_only(self):
    rows = criteo_rows(400, seed=3)
    paths = [
      write_lines(os.path.join(self.tmp, f'{n}.txt'), part, '\t')
      for n, part in (
        ('tr', rows[:300]),
        ('va', rows[300:350]),
        ('te', rows[350:]),
      )
    ]
    config = self.config(
      'criteo', paths[0], valid_path=paths[1], test_path=paths[2], min_count=2
    )
    dataset = data.load_dataset(config)
    # The reference learns its vocabulary on the 300 training rows only.
    ref_train, dims = reference_encode(
      [r[1:] for r in rows[:300]], set(range(13)), 2
    )
    self.assertEqual(dataset.field_dims, dims)
    assert_same_encoding(self, dataset.train.ids, dims, ref_train, dims)
    self.assertEqual(
      (len(dataset.train), len(dataset.valid), len(dataset.test)), (300, 50, 50)
    )
    np.testing.assert_array_equal(
      dataset.valid.labels, [float(r[0]) for r in rows[300:350]]
    )
    # A test value never seen in training is out of vocabulary.
    seen = [set(r[14 + c] for r in rows[:300]) for c in range(26)]
    for i, r in enumerate(rows[350:]):
      for c in range(26):
        if r[14 + c] not in seen[c]:
          self.assertEqual(dataset.test.ids[i, 13 + c], dims[13 + c] - 1)


class AvazuTest(DatasetTestCase):
  def test_pytorch_fm_fields_with_raw_hour(self):
    rows = avazu_rows(600)
    path = write_lines(
      os.path.join(self.tmp, 'train.csv'), rows, ',', avazu.COLUMNS
    )
    config = self.config(
      'avazu', path, split=(1.0, 0, 0), avazu=dict(hour_features=False)
    )
    dataset = data.load_dataset(config)
    ids, labels = all_rows(dataset)
    ref_ids, ref_dims = reference_encode([r[2:] for r in rows], set(), 4)
    assert_same_encoding(self, ids, dataset.field_dims, ref_ids, ref_dims)
    np.testing.assert_array_equal(labels, [float(r[1]) for r in rows])
    self.assertEqual(dataset.field_names[:2], ('hour', 'C1'))
    self.assertLen(dataset.field_names, 22)

  def test_hour_of_day_weekday_and_id_without_header(self):
    rows = avazu_rows(300, seed=1)
    path = write_lines(os.path.join(self.tmp, 'dev.csv'), rows, ',')
    config = self.config(
      'avazu', path, split=(1.0, 0, 0), avazu=dict(drop_id=False)
    )
    dataset = data.load_dataset(config)
    self.assertEqual(
      dataset.field_names[:4], ('id', 'hour_of_day', 'weekday', 'C1')
    )
    ids, _ = all_rows(dataset)
    derived = [
      [
        r[0],
        str(int(r[2][6:])),
        str(datetime.date(2014, 10, int(r[2][4:6])).weekday()),
      ]
      + r[3:]
      for r in rows
    ]
    ref_ids, ref_dims = reference_encode(derived, set(), 4)
    assert_same_encoding(self, ids, dataset.field_dims, ref_ids, ref_dims)
    self.assertEqual(dataset.field_dims[0], 1)  # Every id unique: all OOV.
    for f in (1, 2):  # The keys are the hours and weekdays (0 = Monday).
      counts = collections.Counter(int(r[f]) for r in derived)
      kept = sorted(k for k, c in counts.items() if c >= 4)
      np.testing.assert_array_equal(dataset.vocabulary[f], kept)

  def test_hour_keys_by_the_calendar(self):
    hours = [14102100, 14102623, 16022912, 15022900, 14103224, 14103024]
    hours = np.array(hours + [14102100], np.int64)
    # Tuesday, Sunday, a leap day (Monday); no 2015-02-29, no October 32nd,
    # no hour 24.
    valid = [True, True, True, False, False, False, True]
    for kind, expected in (
      ('hour_of_day', [0, 23, 12, 0, 0, 0, 0]),
      ('weekday', [1, 6, 0, 0, 0, 0, 1]),
    ):
      keys, ok = avazu.hour_keys(hours, kind)
      np.testing.assert_array_equal(ok, valid)
      np.testing.assert_array_equal(np.where(ok, keys, 0), expected)

  def test_wrong_header_and_bad_hour(self):
    rows = avazu_rows(20)
    header = list(avazu.COLUMNS)
    header[5] = 'site'
    path = write_lines(os.path.join(self.tmp, 'a.csv'), rows, ',', header)
    with self.assertRaisesRegex(data.DataError, r'a\.csv:1: header'):
      data.load_dataset(self.config('avazu', path))
    for hour, said in (
      ('14103224', "hour '14103224' is not"),  # October 32nd.
      ('14103024', "hour '14103024' is not"),  # Hour 24.
      ('', 'hour is empty, not'),  # Was "hour '<NA>' is not".
    ):
      rows[6][2] = hour
      path = write_lines(os.path.join(self.tmp, 'b.csv'), rows, ',')
      with self.assertRaisesRegex(
        data.DataError, rf'b\.csv:7: {said} YYMMDDHH'
      ):
        data.load_dataset(self.config('avazu', path))

  def test_a_header_amid_the_rows_is_named(self):
    # Two files joined with cat: the second's header said only "label
    # 'click' is not 0 or 1".
    rows = avazu_rows(20)
    path = os.path.join(self.tmp, 'joined.csv')
    write_lines(path, rows[:10] + [list(avazu.COLUMNS)] + rows[10:], ',')
    with self.assertRaisesRegex(
      data.DataError,
      r"^.*joined\.csv:11: label 'click' is not 0 or 1 \(or -1, True,"
      r' False\); a header line amid the rows \(files joined\?\): delete it',
    ):
      data.load_dataset(self.config('avazu', path))

  def test_a_tab_separated_file_is_told_the_separator(self):
    # The Criteo message says 'tab-separated'; Avazu's said only the
    # columns, and a tab-separated copy found 1 of them.
    rows = avazu_rows(20)
    path = write_lines(os.path.join(self.tmp, 'a.tsv'), rows, '\t')
    with self.assertRaisesRegex(
      data.DataError,
      r'a\.tsv:1: expected 24 columns \(id, click, hour and 21 categorical,'
      r' comma-separated; .*\), found 1',
    ):
      data.load_dataset(self.config('avazu', path))


class LibFMTest(DatasetTestCase):
  def _lines(self, n, seed, fields=(30, 8, 5)):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
      values = [int(d * rng.random() ** 2) for d in fields]
      rows.append((rng.choice((-1, 1)), values))
    return rows

  def write_text(self, name, rows, offsets):
    lines = [
      f'{label} '
      + ' '.join(f'{o + v}:1' for o, v in zip(offsets, values, strict=True))
      for label, values in rows
    ]
    return write_lines(
      os.path.join(self.tmp, 'd', name), [[x] for x in lines], ''
    )

  def test_directory_of_predefined_splits_positional_fields(self):
    os.makedirs(os.path.join(self.tmp, 'd'))
    offsets = (0, 30, 38)
    parts = [self._lines(n, s) for n, s in ((200, 0), (40, 1), (30, 2))]
    for name, rows in zip(
      ('x.train.libfm', 'x.validation.libfm', 'x.test.libfm'),
      parts,
      strict=True,
    ):
      self.write_text(name, rows, offsets)
    # Hidden files are not candidates: an editor's or macOS's beside them.
    for hidden in ('.x.train.libfm.swp', '._x.train.libfm'):
      write_lines(os.path.join(self.tmp, 'd', hidden), [['\x00']], '')
    dataset = data.load_dataset(
      self.config('libfm', os.path.join(self.tmp, 'd'))
    )
    self.assertEqual(
      (len(dataset.train), len(dataset.valid), len(dataset.test)), (200, 40, 30)
    )
    raw = [
      [str(o + v) for o, v in zip(offsets, values, strict=True)]
      for _, values in parts[0]
    ]
    ref_ids, ref_dims = reference_encode(raw, set(), 1)
    assert_same_encoding(
      self, dataset.train.ids, dataset.field_dims, ref_ids, ref_dims
    )
    np.testing.assert_array_equal(
      dataset.valid.labels, [float(label > 0) for label, _ in parts[1]]
    )
    vocab = [
      set(np.asarray(dataset.train.ids)[:, f].tolist()) for f in range(3)
    ]
    seen = [set(v[f] for _, v in parts[0]) for f in range(3)]
    for i, (_, values) in enumerate(parts[2]):
      for f in range(3):
        if values[f] not in seen[f]:
          self.assertEqual(dataset.test.ids[i, f], dataset.field_dims[f] - 1)
        else:
          self.assertIn(dataset.test.ids[i, f], vocab[f])

  def test_a_split_that_predefined_files_leave_unused_is_warned(self):
    # Validation and test come from their own files: `split` is not used.
    # Not an error (config_check allows (1, 0, 0) there, and runs recorded
    # with such a config resume), but a warning says so.
    self.assertEqual(data.DEFAULT_SPLIT, default.get_config().dataset.split)
    os.makedirs(os.path.join(self.tmp, 'd'))
    names = ('x.train.libfm', 'x.valid.libfm', 'x.test.libfm')
    for name, n in zip(names, (60, 20, 20), strict=True):
      self.write_text(name, self._lines(n, n), (0, 30, 38))
    directory = os.path.join(self.tmp, 'd')
    train, valid, test = (os.path.join(directory, name) for name in names)
    predefined = dict(valid_path=valid, test_path=test)

    def warnings(path, **overrides):
      config = self.config('libfm', path, **overrides)
      with self.assertLogs(level='WARNING') as logs:
        logging.warning('sentinel')
        dataset = data.load_dataset(config)
      said = [r.getMessage() for r in logs.records[1:]]
      return dataset, [m for m in said if 'is not used' in m]

    for path, overrides, given in (
      (directory, {}, 'found in the libfm directory config.dataset.path'),
      (train, predefined, 'config.dataset.valid_path and test_path'),
    ):
      with self.subTest(given=given):
        dataset, [message] = warnings(path, split=(1.0, 0.0, 0.0), **overrides)
        self.assertEqual(len(dataset.valid), 20)
        self.assertStartsWith(
          message,
          f'config.dataset.split=(1.0, 0.0, 0.0) is not used: validation and'
          f' test are the predefined files {valid} and {test} ({given}), and'
          f' all of {train} trains. In a new run, leave split at its default'
          ' (0.8, 0.1, 0.1), or ',
        )
        # A resume refuses a changed split: the advice is for a new run.
        self.assertEndsWith(
          message, ' at random (a resumed run must keep its recorded split).'
        )
        self.assertEqual(warnings(path, **overrides)[1], [])  # The default.
    _, said = warnings(train, split=(0.6, 0.2, 0.2))  # Split at random.
    self.assertEqual(said, [])

  def test_a_dataset_seed_that_predefined_files_leave_unused_is_warned(self):
    # With predefined validation and test files nothing is drawn at random:
    # config.dataset.seed=3 trained exactly as seed 0, and nothing said so.
    self.assertEqual(data.DEFAULT_SEED, default.get_config().dataset.seed)
    os.makedirs(os.path.join(self.tmp, 'd'))
    names = ('x.train.libfm', 'x.valid.libfm', 'x.test.libfm')
    for name, n in zip(names, (60, 20, 20), strict=True):
      self.write_text(name, self._lines(n, n), (0, 30, 38))
    directory = os.path.join(self.tmp, 'd')
    train, valid, test = (os.path.join(directory, name) for name in names)
    predefined = dict(valid_path=valid, test_path=test)

    def warnings(path, **overrides):
      config = self.config('libfm', path, **overrides)
      with self.assertLogs(level='WARNING') as logs:
        logging.warning('sentinel')
        data.load_dataset(config)
      said = [r.getMessage() for r in logs.records[1:]]
      return [m for m in said if m.startswith('config.dataset.seed=')]

    for path, overrides, given in (
      (directory, {}, 'found in the libfm directory config.dataset.path'),
      (train, predefined, 'config.dataset.valid_path and test_path'),
    ):
      with self.subTest(given=given):
        [message] = warnings(path, seed=3, **overrides)
        self.assertEqual(
          message,
          'config.dataset.seed=3 is not used: it seeds the random split, and'
          f' validation and test are the predefined files {valid} and {test}'
          f' ({given}), and all of {train} trains: the seed draws nothing'
          ' (config.seed seeds the parameters, the shuffle and dropout). In a'
          ' new run, leave dataset.seed at its default 0, or '
          + (
            f'name {train} itself as config.dataset.path to split it'
            if path == directory
            else f'leave valid_path and test_path empty to split {train}'
          )
          + ' at random (a resumed run must keep its recorded seed).',
        )
        self.assertEqual(warnings(path, **overrides), [])  # The default.
    self.assertEqual(warnings(train, seed=3), [])  # Split at random.

  def test_a_utf8_bom_is_not_part_of_the_first_label(self):
    os.makedirs(os.path.join(self.tmp, 'd'))
    rows = self._lines(60, 5)
    path = self.write_text('all.libfm', rows, (0, 30, 38))
    with open(path, 'rb') as f:
      body = f.read()
    with open(path, 'wb') as f:
      f.write(b'\xef\xbb\xbf' + body)
    config = self.config(
      'libfm', path, libfm=dict(field_dims=(30, 8, 5)), split=(1.0, 0, 0)
    )
    dataset = data.load_dataset(config)
    np.testing.assert_array_equal(dataset.train.ids, [v for _, v in rows])
    np.testing.assert_array_equal(
      dataset.train.labels, [float(y > 0) for y, _ in rows]
    )

  def test_given_field_dims_take_global_indices_as_they_are(self):
    os.makedirs(os.path.join(self.tmp, 'd'))
    rows = self._lines(120, 3)
    path = self.write_text('all.libfm', rows, (0, 30, 38))
    with open(path) as f:  # Features in any order on a line.
      lines = [line.split() for line in f]
    with open(path, 'w') as f:
      f.writelines(' '.join([p[0]] + p[:0:-1]) + '\n' for p in lines)
    config = self.config(
      'libfm', path, libfm=dict(field_dims=(30, 8, 5)), split=(1.0, 0, 0)
    )
    dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_dims, (30, 8, 5))
    np.testing.assert_array_equal(dataset.train.ids, [v for _, v in rows])
    bad = self.write_text('bad.libfm', [(1, [0, 7, 4])], (0, 30, 38))
    with open(bad, 'a') as f:
      f.write('1 3:1 31:1 43:1\n')  # Indices end at 30 + 8 + 5 - 1.
    with self.assertRaisesRegex(
      data.DataError, r'bad\.libfm:2: feature index 43 is beyond'
    ):
      data.load_dataset(
        self.config('libfm', bad, libfm=dict(field_dims=(30, 8, 5)))
      )
    with self.assertRaisesRegex(
      data.DataError, r'field_dims must be positive, got \(30, 0, 5\)'
    ):
      data.load_dataset(
        self.config('libfm', bad, libfm=dict(field_dims=(30, 0, 5)))
      )

  def test_splits_are_predefined_only_with_both_valid_and_test(self):
    os.makedirs(os.path.join(self.tmp, 'd'))
    for name in ('x.train.libfm', 'x.dev.libfm'):  # No test file.
      self.write_text(name, self._lines(10, 0), (0, 30, 38))
    train = os.path.join(self.tmp, 'd', 'x.train.libfm')
    config = self.config('libfm', os.path.join(self.tmp, 'd'))
    files = encode.source_files(config, find_splits=True)
    self.assertEqual(files, {'all': train})  # Split at random.
    config = self.config('libfm', train, valid_path=train)
    with self.assertRaisesRegex(
      data.DataError,
      r'^config\.dataset\.valid_path and config\.dataset\.test_path: set'
      r' both \(predefined splits\) or neither',
    ):
      encode.source_files(config, find_splits=True)

  def test_given_field_dims_need_one_feature_of_each_field(self):
    reader = libfm.Reader(3, (30, 8, 5))
    bad = streaming.BadLines(skip=False)
    with self.assertRaisesRegex(
      data.DataError, r'^f:1: expected one feature of each field'
    ):
      reader.parse([b'1 3:1 4:1 40:1\n'], 1, lambda n: f'f:{n}', bad)

  def test_a_directory_with_two_training_files_is_refused(self):
    os.makedirs(os.path.join(self.tmp, 'd'))
    for name in ('x.train.libfm', 'x.train.old.libfm'):
      self.write_text(name, self._lines(10, 0), (0, 30, 38))
    with self.assertRaisesRegex(
      data.DataError,
      r'expected exactly one file with "train" in its name, found'
      r" \['.*/x\.train\.libfm', '.*/x\.train\.old\.libfm'\]",
    ):
      data.load_dataset(self.config('libfm', os.path.join(self.tmp, 'd')))

  @parameterized.parameters(
    ('2 1:1 2:1\n', 'label 2'),
    ('1 1:1\n', 'expected 2 features'),
    ('1 1:0.5 2:1\n', '.*one-hot'),
    ('1 a:1 2:1\n', '.*not idx:value'),
    ('1 -1:1 2:1\n', 'feature index -1 is out of range'),
  )
  def test_bad_lines(self, line, message):
    path = write_lines(
      os.path.join(self.tmp, 'f.libfm'), [['-1 3:1 7:1'], ['1 4:1 7:1']], ''
    )
    with open(path, 'a') as f:
      f.write(line)
    with self.assertRaisesRegex(data.DataError, rf'f\.libfm:3: {message}'):
      data.load_dataset(self.config('libfm', path))


class CsvTest(DatasetTestCase):
  def test_named_columns_quotes_and_numeric_buckets(self):
    rng = random.Random(0)
    header = ['user', 'clicked', 'age', 'city']
    rows = [
      [
        f'u{rng.randint(0, 9)}',
        str(rng.randint(0, 1)),
        str(rng.randint(0, 90)) if rng.random() > 0.1 else '',
        rng.choice(['"Paris, FR"', 'Oslo', '""', 'Rome']),
      ]
      for _ in range(400)
    ]
    path = write_lines(os.path.join(self.tmp, 'clicks.csv'), rows, ',', header)
    config = self.config(
      'csv',
      path,
      split=(1.0, 0, 0),
      csv=dict(label_column='clicked', numeric_columns=('age',)),
      min_count=3,
    )
    dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_names, ('user', 'age', 'city'))
    raw = [[r[0], r[2], r[3].strip('"')] for r in rows]
    ref_ids, ref_dims = reference_encode(raw, {1}, 3)
    assert_same_encoding(
      self, dataset.train.ids, dataset.field_dims, ref_ids, ref_dims
    )
    np.testing.assert_array_equal(
      dataset.train.labels, [float(r[1]) for r in rows]
    )
    config.csv.categorical_columns = ('city',)
    config.csv.numeric_columns = ()
    self.assertEqual(data.load_dataset(config).field_names, ('city',))
    config.csv.categorical_columns = ('city, user',)  # As a flag gives 'a,b'.
    self.assertEqual(data.load_dataset(config).field_names, ('user', 'city'))
    config.csv.label_column = 'click'
    with self.assertRaisesRegex(
      data.DataError, 'label_column.*click.*clicks.csv'
    ):
      data.load_dataset(config)

  def test_a_label_of_minus_one_is_a_negative(self):
    rows = [[str(y), f'u{i % 3}'] for i, y in enumerate([-1, 1, 0] * 10)]
    path = write_lines(
      os.path.join(self.tmp, 'c.csv'), rows, ',', ['clicked', 'user']
    )
    config = self.config(
      'csv', path, split=(1.0, 0, 0), csv=dict(label_column='clicked')
    )
    np.testing.assert_array_equal(
      data.load_dataset(config).train.labels, [0, 1, 0] * 10
    )
    rows[4][0] = '2'
    path = write_lines(path, rows, ',', ['clicked', 'user'])
    with self.assertRaisesRegex(
      data.DataError,
      r'c\.csv:6: label 2 is not 0 or 1 \(or -1, True, False\)',
    ):
      data.load_dataset(config)

  def test_a_utf8_bom_is_not_part_of_the_first_column_name(self):
    # As Excel writes "CSV UTF-8": the label column must still be found.
    rows = [[str(i % 2), f'u{i % 3}'] for i in range(30)]
    path = write_lines(os.path.join(self.tmp, 'c.csv'), rows, ',', ['y', 'u'])
    with open(path, 'rb') as f:
      body = f.read()
    with open(path, 'wb') as f:
      f.write(b'\xef\xbb\xbf' + body)
    config = self.config(
      'csv', path, split=(1.0, 0, 0), csv=dict(label_column='y')
    )
    dataset = data.load_dataset(config)
    np.testing.assert_array_equal(dataset.train.labels, [0, 1] * 15)
    self.assertEqual(dataset.field_names, ('u',))

  def test_a_quoted_column_name_may_hold_the_separator(self):
    rows = [[str(i % 2), f'p{i % 4}', f'u{i % 3}'] for i in range(30)]
    header = ['y', '"price, usd"', 'u']
    path = write_lines(os.path.join(self.tmp, 'c.csv'), rows, ',', header)
    config = self.config(
      'csv', path, split=(1.0, 0, 0), csv=dict(label_column='y')
    )
    dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_names, ('price, usd', 'u'))
    self.assertEqual(dataset.field_dims, (5, 4))

  def test_valid_and_test_files_may_order_the_training_fields_otherwise(self):
    # Columns are read by name: a file with the training's columns in another
    # order gives the same ids (it was refused, as other fields still are).
    header = ['clicked', 'user', 'city']
    rows = [[str(i % 2), f'u{i % 4}', f'c{i % 3}'] for i in range(40)]
    paths = [
      write_lines(os.path.join(self.tmp, f'{name}.csv'), rows, ',', header)
      for name in ('train', 'valid', 'test')
    ]
    os.makedirs(os.path.join(self.tmp, 'other'))
    reordered = write_lines(
      os.path.join(self.tmp, 'other', 'test.csv'),
      [[r[2], r[0], r[1]] for r in rows],
      ',',
      ['city', 'clicked', 'user'],
    )
    other = write_lines(
      os.path.join(self.tmp, 'other', 'fewer.csv'),
      [[r[0], r[1]] for r in rows],
      ',',
      ['clicked', 'user'],
    )

    def load(test_path):
      return data.load_dataset(
        self.config(
          'csv',
          paths[0],
          valid_path=paths[1],
          test_path=test_path,
          csv=dict(label_column='clicked'),
        )
      )

    same, swapped = load(paths[2]), load(reordered)
    self.assertEqual(swapped.field_names, ('user', 'city'))
    np.testing.assert_array_equal(swapped.test.ids, same.test.ids)
    np.testing.assert_array_equal(swapped.test.labels, same.test.labels)
    self.assertGreater(len(np.unique(same.test.ids[:, 1])), 2)
    with self.assertRaisesRegex(
      data.DataError,
      r"fewer\.csv: fields \('user',\) differ from those of"
      r" .*train\.csv: \('user', 'city'\)\. Give every file the training"
      r" file's columns, or name the columns to read in config\.dataset\.csv"
      r' \(categorical_columns, .*\)\.$',
    ):
      load(other)

  def test_columns_named_by_numbers_as_a_flag_gives_them(self):
    # `--config.dataset.csv.categorical_columns=1` arrives as (1,).
    rows = [[str(i % 2), f'c{i % 3}', str(i % 5)] for i in range(60)]
    path = write_lines(
      os.path.join(self.tmp, 'n.csv'), rows, ',', ['y', '1', '2019']
    )
    options = dict(label_column='y', categorical_columns=(1,))
    options.update(numeric_columns=(2019,))
    self.assertIsNone(config_check.columns((1,)))
    dataset = data.load_dataset(self.config('csv', path, csv=options))
    self.assertEqual(dataset.field_names, ('1', '2019'))

  def test_parquet_reads_like_csv(self):
    try:
      import pandas as pd
      import pyarrow  # noqa: F401
    except ImportError:
      self.skipTest('pyarrow is not installed')
    rows = [[f'u{i % 7}', str(i % 2), f'c{i % 3}'] for i in range(200)]
    csv_path = write_lines(
      os.path.join(self.tmp, 'a.csv'), rows, ',', ['u', 'y', 'c']
    )
    pq_path = os.path.join(self.tmp, 'a.parquet')
    pd.read_csv(csv_path, dtype=str).astype({'y': int}).to_parquet(pq_path)
    a = data.load_dataset(
      self.config('csv', csv_path, csv=dict(label_column='y'))
    )
    b = data.load_dataset(
      self.config('csv', pq_path, csv=dict(label_column='y'))
    )
    self.assertEqual(a.field_dims, b.field_dims)
    np.testing.assert_array_equal(a.train.ids, b.train.ids)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)

  def test_a_boolean_parquet_label_reads_as_0_and_1(self):
    # pandas writes `clicks > 0` as a bool column; it read as 'True', 'False'
    # ("label 'True' is not an integer") though a DataFrame's was 1 and 0.
    try:
      import pandas as pd
      import pyarrow  # noqa: F401
    except ImportError:
      self.skipTest('pyarrow is not installed')
    frame = pd.DataFrame({'u': [f'u{i % 7}' for i in range(200)]})
    frame['y'] = np.arange(200) % 3 == 0
    paths = [os.path.join(self.tmp, f'{k}.parquet') for k in ('b', 'i')]
    frame.to_parquet(paths[0])
    frame.astype({'y': int}).to_parquet(paths[1])
    b, i = (
      data.load_dataset(self.config('csv', p, csv=dict(label_column='y')))
      for p in paths
    )
    np.testing.assert_array_equal(b.train.labels, i.train.labels)
    np.testing.assert_array_equal(b.train.ids, i.train.ids)
    frame.astype({'y': object}).assign(y=[True, None] * 100).to_parquet(
      paths[0]
    )
    with self.assertRaisesRegex(data.DataError, r'b\.parquet: row 2: missing'):
      data.load_dataset(
        self.config('csv', paths[0], csv=dict(label_column='y'))
      )

  @parameterized.parameters(0, 2)
  def test_a_true_false_csv_label_reads_as_1_and_0(self, workers):
    # `to_csv` of a bool column writes True and False: a label so written
    # was a bad line ("label 'True' is not an integer"). A categorical
    # column of True and False keeps them as two values.
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({'u': [f'u{i % 7}' for i in range(300)]})
    frame['y'] = rng.random(300) < 0.3
    frame['flag'] = rng.random(300) < 0.5
    paths = [os.path.join(self.tmp, f'{k}.csv') for k in ('b', 'i', 'c')]
    frame.to_csv(paths[0], index=False)
    frame.astype({'y': int}).to_csv(paths[1], index=False)
    cased = frame.astype({'y': str})
    cased['y'] = cased['y'].str.upper().where(np.arange(300) % 2 == 0)
    cased['y'] = cased['y'].fillna(frame['y'].astype(str).str.lower())
    cased.to_csv(paths[2], index=False)  # TRUE, false, ...
    with open(paths[0]) as f:
      self.assertEqual(f.readline(), 'u,y,flag\n')
      self.assertRegex(f.readline(), r'^u0,(True|False),(True|False)\n$')
    b, i, c = (
      data.load_dataset(
        self.config(
          'csv',
          p,
          csv=dict(label_column='y'),
          parse_workers=workers,
          cache_dir=os.path.join(self.tmp, f'cache{k}'),
        )
      )
      for k, p in enumerate(paths)
    )
    self.assertEqual(b.field_names, ('u', 'flag'))
    self.assertEqual(b.field_dims, (8, 3))  # flag: True, False and OOV.
    for split in ('train', 'valid', 'test'):
      for other in (i, c):
        np.testing.assert_array_equal(
          getattr(b, split).labels, getattr(other, split).labels
        )
        np.testing.assert_array_equal(
          getattr(b, split).ids, getattr(other, split).ids
        )
    self.assertEqual(set(np.unique(b.train.labels)), {0.0, 1.0})
    with open(paths[2], 'rb') as f:
      lines = f.readlines()[1:]
    keys, labels, _ = _parse(_csv_table(('u', 'y', 'flag')), lines)
    np.testing.assert_array_equal(labels, frame['y'])
    flags = frame['flag'].astype(str).to_numpy(object)
    np.testing.assert_array_equal(keys[:, 1], keying.string_keys(flags))
    frame.astype({'y': object}).assign(y=['True', 'yes'] * 150).to_csv(
      paths[0], index=False
    )
    with self.assertRaisesRegex(
      data.DataError,
      r"b\.csv:3: label 'yes' is not 0 or 1 \(or -1, True, False\) \(set"
      r' config\.dataset\.skip_bad_lines=True',
    ):
      data.load_dataset(
        self.config(
          'csv', paths[0], csv=dict(label_column='y'), parse_workers=workers
        )
      )
    # An empty label is missing, also in a chunk whose other bad label
    # (maybe) makes the parser search it line by line.
    for written in ('True', '1'):
      frame.astype({'y': object}).assign(y=[written, '', 'maybe'] * 100).to_csv(
        paths[0], index=False
      )
      with self.assertRaisesRegex(data.DataError, r'b\.csv:3: missing label'):
        data.load_dataset(
          self.config(
            'csv', paths[0], csv=dict(label_column='y'), parse_workers=workers
          )
        )

  def test_a_bad_parquet_row_is_named_by_its_row_across_batches(self):
    try:
      import pandas as pd
      import pyarrow  # noqa: F401
    except ImportError:
      self.skipTest('pyarrow is not installed')
    frame = pd.DataFrame({'u': [f'u{i % 7}' for i in range(200)]})
    frame['y'] = np.arange(200) % 2
    frame.loc[150, 'y'] = 2  # Row 151, in the second batch of 97.
    path = os.path.join(self.tmp, 'a.parquet')
    frame.to_parquet(path)
    with self.assertRaisesRegex(
      data.DataError, rf'^{path}: row 151: label 2 is not 0 or 1'
    ):
      data.load_dataset(self.config('csv', path, csv=dict(label_column='y')))

  @parameterized.parameters(
    (('y', 'a', 'a'), ()), (('y', 'a', 'b', ' a'), ('b',))
  )
  def test_a_column_twice_in_the_header_is_a_data_error(self, header, cats):
    rows = [[str(i % 2)] + [f'v{i % 3}'] * (len(header) - 1) for i in range(20)]
    path = write_lines(os.path.join(self.tmp, 'd.csv'), rows, ',', header)
    config = self.config(
      'csv', path, csv=dict(label_column='y', categorical_columns=cats)
    )
    with self.assertRaisesRegex(
      data.DataError,
      r"^\S*d\.csv:1: column 'a' appears twice in the header \(y, a, .*\);"
      ' rename one',
    ):
      data.load_dataset(config)
    try:
      import pyarrow as pa
      import pyarrow.parquet as pq
    except ImportError:
      return
    columns = [pa.array([r[k] for r in rows]) for k in range(len(header))]
    config.path = os.path.join(self.tmp, 'd.parquet')
    names = [c.strip() for c in header]  # Parquet names are not stripped.
    pq.write_table(pa.table(columns, names=names), config.path)
    with self.assertRaisesRegex(
      data.DataError, r"^\S*d\.parquet: column 'a' appears twice in the header"
    ):
      data.load_dataset(config)

  @parameterized.parameters(
    ('y,a,b\r1,x,z\r0,w,v\r', 'a carriage return'),
    ('y,"a,b\n1,x,z\n', 'a quoted column name is not closed'),
  )
  def test_a_broken_header_line_is_a_data_error(self, body, message):
    path = os.path.join(self.tmp, 'h.csv')
    with open(path, 'w', newline='') as f:
      f.write(body)
    with self.assertRaisesRegex(data.DataError, rf'^\S*h\.csv:1: {message}'):
      data.load_dataset(self.config('csv', path, csv=dict(label_column='y')))

  def test_a_header_split_by_another_separator_says_so(self):
    # A TSV read with the default sep=',' is one column named 'y\ta\tb'.
    rows = [[str(i % 2), f'v{i % 3}', f'w{i % 2}'] for i in range(20)]
    path = write_lines(os.path.join(self.tmp, 't.tsv'), rows, '\t', 'yab')
    with self.assertRaisesRegex(
      data.DataError,
      r"^config.dataset.csv.label_column: column 'y' is not in the header of"
      r" \S*t\.tsv: y\ta\tb\. The header is one column, with '\\t' in it:"
      r" is the file '\\t'-separated\? config.dataset.csv.sep is ','\.$",
    ):
      data.load_dataset(self.config('csv', path, csv=dict(label_column='y')))
    config = self.config('csv', path, csv=dict(label_column='y', sep='\t'))
    self.assertEqual(data.load_dataset(config).field_names, ('a', 'b'))

  def test_parquet_cells_keep_newlines_quotes_and_crs(self):
    try:
      import pandas as pd
      import pyarrow  # noqa: F401
    except ImportError:
      self.skipTest('pyarrow is not installed')
    cells = [['p\nq', 'x'], ['s\rt', 'r,\r\n'], ['u"v\n', '"'], ['', 'e\r']]
    frame = pd.DataFrame(cells, columns=['a', 'b']).assign(y=[1, 0, 1, 0])
    path = os.path.join(self.tmp, 'a.parquet')
    frame.to_parquet(path)
    table = csv.reader(
      ml_collections.ConfigDict(dict(csv.DEFAULTS, label_column='y')), path
    )
    bad = streaming.BadLines(False)
    parts = list(streaming.chunks(table, path, 3, bad, 'test'))
    keys = np.concatenate([k for k, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    np.testing.assert_array_equal(labels, [1, 0, 1, 0])
    expected = keying.string_keys(np.array(sum(cells, []), object))
    np.testing.assert_array_equal(keys.ravel(), expected)
    frame.assign(y=[1, 0, 7, 0]).to_parquet(path)
    with self.assertRaisesRegex(data.DataError, r'a\.parquet: row 3: label 7'):
      list(streaming.chunks(table, path, 3, bad, 'test'))


# --------------------------------------------------------------------------
# Bad lines, the cache key, interrupted runs.


class BadLinesTest(DatasetTestCase):
  @parameterized.parameters(
    (lambda r: r[:-1], 'expected 40 columns .* found 39'),
    (lambda r: r + ['x'], 'expected 40 columns .* found 41'),
    (lambda r: r[:3] + ['12x'] + r[4:], 'integer column I3 .*12x'),
    (lambda r: ['2'] + r[1:], 'label 2 is not 0 or 1'),
    (lambda r: [''] + r[1:], 'missing label'),
    (lambda r: ['yes'] + r[1:], "label 'yes'"),
  )
  def test_error_names_file_and_line_or_skip_counts(self, corrupt, message):
    rows = criteo_rows(300, seed=4)
    for k in (150, 151, 251):  # Line numbers 151, 152 and 252.
      rows[k] = corrupt(rows[k])
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    with self.assertRaisesRegex(data.DataError, rf'train\.txt:151: {message}'):
      data.load_dataset(self.config('criteo', path))
    self.assertEqual(self.encoded(), [])

    config = self.config('criteo', path, skip_bad_lines=True, split=(1.0, 0, 0))
    with self.assertLogs(level='WARNING') as logs:
      dataset = data.load_dataset(config)
    self.assertTrue(any('skipped 3 malformed lines' in m for m in logs.output))
    good = [r for k, r in enumerate(rows) if k not in (150, 151, 251)]
    ref_ids, ref_dims = reference_encode(
      [r[1:] for r in good], set(range(13)), 10
    )
    assert_same_encoding(
      self, dataset.train.ids, dataset.field_dims, ref_ids, ref_dims
    )
    [name] = self.encoded()
    with open(
      os.path.join(self.tmp, 'cache', 'encoded', name, 'meta.json')
    ) as f:
      self.assertEqual(json.load(f)['skipped_lines'], 3)

  @parameterized.parameters(
    ('criteo', 'train.txt', '\n\n', 'no examples found'),
    ('csv', 'c.csv', 'y,u\n', 'no examples found'),  # A header alone.
    ('libfm', 'f.libfm', '\n \n', 'no libFM line with features found'),
  )
  def test_a_file_without_examples_is_named(self, name, file, text, message):
    path = os.path.join(self.tmp, file)
    with open(path, 'w') as f:
      f.write(text)
    config = self.config(name, path)
    if name == 'csv':
      config.csv.label_column = 'y'
    with self.assertRaisesRegex(data.DataError, rf'^{path}: {message}\.$'):
      data.load_dataset(config)
    self.assertEqual(self.encoded(), [])

  def test_a_file_whose_every_line_was_skipped_says_so(self):
    path = os.path.join(self.tmp, 'c.csv')
    with open(path, 'w') as f:
      f.write('y,u\nparis,1\nlyon,2\n')  # A label_column that is not one.
    config = self.config('csv', path, skip_bad_lines=True)
    config.csv.label_column = 'y'
    with self.assertRaisesRegex(
      data.DataError,
      rf'^{path}: no examples found; 2 malformed lines were skipped \(the'
      r' first logged above\): check the format options\.$',
    ):
      data.load_dataset(config)

  def test_error_names_the_first_bad_line_of_a_chunk(self):
    rows = criteo_rows(60, seed=6)
    rows[9] = rows[9][:3] + ['12x'] + rows[9][4:]  # Line 10: parse stage.
    rows[19] = ['7'] + rows[19][1:]  # Line 20: label check.
    rows[29] = rows[29][:-1]  # Line 30: column count, checked first.
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    with self.assertRaisesRegex(data.DataError, r'train\.txt:10: integer'):
      data.load_dataset(self.config('criteo', path))
    rows[9] = rows[8]
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    with self.assertRaisesRegex(data.DataError, r'train\.txt:20: label 7'):
      data.load_dataset(self.config('criteo', path))

  def test_blank_lines_are_ignored(self):
    rows = criteo_rows(50, seed=5)
    path = os.path.join(self.tmp, 'train.txt')
    with open(path, 'w') as f:
      f.write('\n'.join('\t'.join(r) for r in rows[:20]) + '\n\n')
      f.write('\n'.join('\t'.join(r) for r in rows[20:]) + '\n\n')
    dataset = data.load_dataset(self.config('criteo', path, split=(1.0, 0, 0)))
    self.assertLen(dataset.train, 50)


class LineAlignmentTest(parameterized.TestCase):
  """Each line is one row: a bare CR is data, a quote cannot span lines."""

  def test_bare_cr_in_a_criteo_line_is_data_or_a_bad_line(self):
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    rows = criteo_rows(6, seed=3)
    rows[2][30] = 'ab\rcd'  # C17: a categorical value with a CR inside.
    lines = ['\t'.join(r) for r in rows]
    keys, labels, _ = _parse(table, lines)
    np.testing.assert_array_equal(labels, [float(r[0]) for r in rows])
    self.assertEqual(keys[2, 29], keying.string_keys(np.array(['ab\rcd']))[0])
    rows[2][30] = 'ab'
    keys_ab, _, _ = _parse(table, ['\t'.join(r) for r in rows])
    np.testing.assert_array_equal(
      np.delete(keys, 2, 0), np.delete(keys_ab, 2, 0)
    )
    # CRLF line ends are not data; a CR inside an integer is a bad line.
    crlf = [line.encode() + b'\r\n' for line in lines]
    np.testing.assert_array_equal(_parse(table, crlf)[0], keys)
    rows[4][3] = '12\r3'
    with self.assertRaisesRegex(
      data.DataError, r"^f\.csv:5: integer column I3 '12\\r3' is not an integer"
    ):
      _parse(table, ['\t'.join(r) for r in rows])

  def test_a_line_of_separators_and_spaces_is_not_blank(self):
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    good = ['\t'.join(r) for r in criteo_rows(2, seed=1)]
    lines = [good[0], '\t' * 38, ' \t \r', '', ' \r', good[1]]
    with self.assertRaisesRegex(
      data.DataError, r'^f\.csv:2: expected 40 columns .*, found 39'
    ):
      _parse(table, lines)
    _, labels, skipped = _parse(table, lines, skip=True)
    self.assertEqual(skipped, 2)  # Lines 2 and 3; 4 and 5 are blank.
    self.assertLen(labels, 2)

  def test_a_line_short_of_its_last_tabs_says_they_may_be_stripped(self):
    # Some copies of Criteo's files lost the tabs of empty last columns.
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    rows = criteo_rows(2, seed=1)
    rows[1][-2:] = ['', '']
    lines = ['\t'.join(rows[0]), '\t'.join(rows[1]).rstrip('\t')]
    with self.assertRaisesRegex(
      data.DataError,
      r'^f\.csv:2: expected 40 columns .*, found 38; empty columns at the'
      r' end of a line keep their tabs, which a tool that strips trailing'
      r' whitespace drops \(set config\.dataset\.skip_bad_lines=True',
    ):
      _parse(table, lines)

  def test_a_short_last_line_without_its_line_end_says_the_file_is_cut(self):
    # A copy or download that stopped mid-line (`head -c`): its last line
    # was told that tabs of empty columns may have been stripped.
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    good = ['\t'.join(r) for r in criteo_rows(3, seed=1)]
    cut = good[2][: len(good[2]) // 2].encode()
    with self.assertRaisesRegex(
      data.DataError,
      r'^f\.csv:3: expected 40 columns .*, found \d+; the last line, with no'
      r' line end: a cut-short file\? \(set config\.dataset\.skip_bad_lines',
    ):
      _parse(table, [*good[:2], cut])
    keys, _, skipped = _parse(table, [*good[:2], cut], skip=True)
    self.assertEqual((len(keys), skipped), (2, 1))
    # A whole last line needs no line end; a short one with it is not cut.
    self.assertLen(_parse(table, [*good[:2], good[2].encode()])[0], 3)
    with self.assertRaisesRegex(data.DataError, 'keep their tabs'):
      _parse(table, [*good[:2], cut + b'\n'])

  def test_a_file_without_its_label_column_is_told_it_can_only_be_scored(self):
    # Kaggle's test.txt (39 columns) as a training or test file was told
    # only that empty last columns may have lost their tabs.
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    rows = criteo_rows(2, seed=1)
    lines = ['\t'.join(r[1:]) for r in rows]
    with self.assertRaisesRegex(
      data.DataError,
      r'^f\.csv:1: expected 40 columns .*, found 39; a file without its label'
      r" column \(as Kaggle's test\.txt\) can only be scored, by predict\.py;"
      r' empty columns at the end',
    ):
      _parse(table, lines)
    # Rows to score read the first line's way: a later short line is not
    # told to go to predict.py, where it is.
    labeled = '\t'.join(rows[0])
    scored = table.for_rows(labeled.encode())
    with self.assertRaisesRegex(data.DataError, 'found 39') as caught:
      _parse(scored, [labeled, lines[1]])
    self.assertNotIn('scored', str(caught.exception))
    # Without the label from the first line, the rows are read so.
    keys, labels, _ = _parse(table.for_rows(lines[0].encode()), lines)
    self.assertLen(keys, 2)
    self.assertTrue(np.isnan(labels).all())

  def test_a_header_line_is_told_the_format_has_none(self):
    # 'label 'label' is not 0 or 1' said nothing of a header.
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    header = '\t'.join(criteo.COLUMNS)
    good = ['\t'.join(r) for r in criteo_rows(2, seed=1)]
    with self.assertRaisesRegex(
      data.DataError,
      r"^f\.csv:1: label 'label' is not 0 or 1 \(or -1, True, False\); a"
      r' header line\? This format has none: delete it \(set',
    ):
      _parse(table, [header, *good])
    # A later line is a header amid the rows (files joined with cat) only
    # where its label is the label column's name.
    with self.assertRaisesRegex(
      data.DataError,
      r"^f\.csv:2: label 'label' is not 0 or 1 \(or -1, True, False\); a"
      r' header line amid the rows \(files joined\?\): delete it \(set',
    ):
      _parse(table, [good[0], header, good[1]])
    other = '\t'.join(['click'] + header.split('\t')[1:])
    with self.assertRaisesRegex(data.DataError, 'f.csv:2: label') as caught:
      _parse(table, [good[0], other, good[1]])
    self.assertNotIn('header', str(caught.exception))

  def test_a_line_of_text_without_separators_is_not_blank(self):
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    good = ['\t'.join(r) for r in criteo_rows(2, seed=1)]
    lines = [good[0], 'garbage', good[1]]
    with self.assertRaisesRegex(
      data.DataError, r'^f\.csv:2: expected 40 columns .*, found 1'
    ):
      _parse(table, lines)
    _, labels, skipped = _parse(table, lines, skip=True)
    self.assertEqual(skipped, 1)
    self.assertLen(labels, 2)

  def test_rows_to_predict_lack_the_label_only_when_one_column_short(self):
    table = criteo.reader(ml_collections.ConfigDict(criteo.DEFAULTS), '')
    for n, label, how in (
      (40, 'label', 'with'),
      (39, '', 'without'),
      (41, 'label', None),  # Neither: read as labeled, its error says 40.
      (1, 'label', None),
    ):
      rows = table.for_rows(('\t'.join(['1'] * n) + '\n').encode())
      self.assertEqual(rows.label, label, n)
      self.assertLen(rows.columns, 40 if label else 39)
      if how:
        self.assertIn(
          f'read {how} the label column, as the first line has {n} columns',
          rows.hint,
        )
      else:
        self.assertEqual(rows.hint, table.hint)

  def test_bare_cr_in_a_csv_cell_is_data(self):
    keys, labels, _ = _parse(_csv_table(), ['1,p\rq,r', '0,s,"t\r"\r'])
    np.testing.assert_array_equal(labels, [1, 0])
    expected = keying.string_keys(np.array(['p\rq', 'r', 's', 't\r']))
    np.testing.assert_array_equal(keys.ravel(), expected)

  def test_quoted_separators_count_as_pandas_reads_them(self):
    table = _csv_table()
    keys, labels, _ = _parse(table, ['1,"p,q",r', '0,"s""x",t\r', '1,a"b,c'])
    np.testing.assert_array_equal(labels, [1, 0, 1])
    expected = keying.string_keys(
      np.array(['p,q', 'r', 's"x', 't', 'a"b', 'c'])
    )
    np.testing.assert_array_equal(keys.ravel(), expected)
    with self.assertRaisesRegex(
      data.DataError, r'^f\.csv:2: expected 3 columns .*, found 2'
    ):
      _parse(table, ['0,s,t', '1,"p,q"', '0,s,t'])

  @parameterized.parameters(
    (['1,"p,q', '0,s,t"', '1,u,v'], [0, 1], 1),
    (['1,"p,q', '0,s', '1,u,v"'], [1], 2),
    (['1,"p', 'q",r'], [], 2),
  )
  def test_a_quote_not_closed_on_its_line_is_a_bad_line(
    self, lines, labels, skipped
  ):
    table = _csv_table()
    with self.assertRaisesRegex(
      data.DataError, r'^f\.csv:1: a quoted field is not closed on its line'
    ):
      _parse(table, lines)
    _, got, count = _parse(table, lines, skip=True)
    np.testing.assert_array_equal(got, labels)
    self.assertEqual(count, skipped)


class BenchmarkScriptsTest(DatasetTestCase):
  def _seeded(self, fmt, lines):
    """A synthetic file's path and text, checked to repeat byte for byte."""
    from benchmarks import synthetic

    a = synthetic.write(fmt, lines, os.path.join(self.tmp, f'{fmt}_a'))
    b = synthetic.write(fmt, lines, os.path.join(self.tmp, f'{fmt}_b'))
    with open(a) as f, open(b) as g:
      text = f.read()
      self.assertEqual(text, g.read())
    return a, text

  def test_synthetic_files_are_seeded_and_parse_as_the_real_format(self):
    from benchmarks import synthetic

    a, text = self._seeded('criteo', 400)
    rows = [line.split('\t') for line in text.splitlines()]
    self.assertEqual({len(r) for r in rows}, {40})
    self.assertEqual({r[0] for r in rows}, {'0', '1'})
    hexes = {v for r in rows for v in r[14:] if v}
    self.assertTrue(all(len(v) == 8 and int(v, 16) >= 0 for v in hexes))
    dataset = data.load_dataset(self.config('criteo', a, split=(1.0, 0, 0)))
    _, dims = reference_encode([r[1:] for r in rows], set(range(13)), 10)
    self.assertEqual(dataset.field_dims, dims)

    c = synthetic.write('avazu', 300, os.path.join(self.tmp, 'c.csv'))
    with open(c) as f:
      self.assertEqual(tuple(f.readline().strip().split(',')), avazu.COLUMNS)
    self.assertLen(
      data.load_dataset(self.config('avazu', c, split=(1.0, 0, 0))).train, 300
    )

  def test_synthetic_movielens_covers_its_ids_and_parses_as_ml_20m(self):
    from benchmarks import synthetic

    a, text = self._seeded('movielens', 700)
    header, *lines = text.splitlines()
    self.assertEqual(header, 'userId,movieId,rating,timestamp')
    rows = np.array([line.split(',') for line in lines], float)
    self.assertEqual(rows.shape, (700, 4))
    # Each of the first lines brings a user and a movie not seen before.
    self.assertLen(set(rows[:, 0]), 700)
    self.assertLen(set(rows[:, 1]), 700)
    self.assertTrue(set(rows[:, 2]) <= set(np.arange(1, 11) / 2))
    positives = int((rows[:, 2] > 3).sum())
    self.assertBetween(positives, 200, 500)
    dataset = data.load_dataset(self.config('ml-20m', a, split=(1.0, 0, 0)))
    self.assertEqual(dataset.field_dims, (701, 701))  # And one unseen id.
    self.assertEqual(int(np.sum(dataset.train.labels)), positives)
    # Past ML-20M's 26,744 movies, the movies repeat.
    many = synthetic.write('movielens', 30_000, os.path.join(self.tmp, 'c'))
    movies = np.loadtxt(many, delimiter=',', skiprows=1, usecols=1)
    self.assertLen(set(movies), synthetic.ML20M_MOVIES)

  def test_preprocess_benchmark_reports_what_it_made(self):
    from benchmarks import preprocess

    row = preprocess.benchmark(
      'avazu', 300, self.tmp, keep=False, chunk_rows=64
    )
    self.assertEqual(os.listdir(self.tmp), [])  # File and cache deleted.
    self.assertEqual(row['lines'], 300)
    # seconds is rounded to 0.1 s, lines_per_sec is not.
    self.assertAlmostEqual(
      300 / row['lines_per_sec'], row['seconds'], delta=0.051
    )
    self.assertGreater(row['peak_rss_mib'], 0)
    self.assertEqual(row['workers_peak_rss_mib'], 0)  # 300 lines: none.
    workers = preprocess.benchmark(
      'avazu', 300, self.tmp, keep=False, chunk_rows=64, parse_workers=2
    )
    self.assertEqual(workers['field_dims_sum'], row['field_dims_sum'])
    self.assertGreater(workers['workers_peak_rss_mib'], 40)  # 3 processes.
    from benchmarks import synthetic

    path = synthetic.write('avazu', 300, os.path.join(self.tmp, 'x.csv'))
    dataset = data.load_dataset(self.config('avazu', path))
    self.assertEqual(row['field_dims_sum'], sum(dataset.field_dims))
    out = os.path.join(self.tmp, 'r')
    preprocess.write_results('avazu', [dict(row, lines=5)], out)
    preprocess.write_results('avazu', [row], out)
    md = preprocess.write_results('avazu', [workers], out)
    with open(md) as f:
      text = f.read()
    table = [line for line in text.splitlines() if line.startswith('| ')]
    self.assertLen(table, 4)  # Header, both sizes, both settings of 300.
    self.assertIn('--lines=5,300 --parse_workers=-1,2`', text)


if __name__ == '__main__':
  absltest.main()
