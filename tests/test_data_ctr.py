"""Tests of the CTR datasets of data.py: Criteo, Avazu, libFM, CSV/Parquet.

Every file is synthetic, written by the test. Encodings are checked against
a pure-Python transcription of pytorch-fm's preprocessing
(torchfm/dataset/criteo.py and avazu.py) run on the same lines; the ids of
kept values may be numbered differently (pytorch-fm enumerates a set), so
the check is that each field's ids correspond one to one, with the
out-of-vocabulary id last in both.
"""

import collections
import datetime
import gzip
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import default
from configs import fm
import data
import train

# --------------------------------------------------------------------------
# pytorch-fm's rules in plain Python (the reference).


def convert_numeric_feature(val: str) -> str:
  """torchfm/dataset/criteo.py's function, verbatim."""
  if val == '':
    return 'NULL'
  v = int(val)
  if v > 2:
    return str(int(math.log(v) ** 2))
  else:
    return str(v - 2)


def reference_encode(rows, int_fields, min_count, bucket=True):
  """pytorch-fm's feature mapper: rows of raw strings -> ids, field_dims.

  Values of `int_fields` go through `convert_numeric_feature` (when
  `bucket`); values seen fewer than `min_count` times share the last id.
  """
  num_fields = len(rows[0])
  convert = convert_numeric_feature if bucket else (lambda v: v or 'NULL')
  counts = [collections.Counter() for _ in range(num_fields)]
  for row in rows:
    for f, value in enumerate(row):
      counts[f][convert(value) if f in int_fields else value] += 1
  mappers = [
    {v: i for i, v in enumerate(sorted(v for v, c in cnt.items() if c >= m))}
    for cnt, m in zip(counts, [min_count] * num_fields, strict=True)
  ]
  ids = [
    [
      mappers[f].get(
        convert(value) if f in int_fields else value, len(mappers[f])
      )
      for f, value in enumerate(row)
    ]
    for row in rows
  ]
  return np.array(ids), tuple(len(m) + 1 for m in mappers)


def assert_same_encoding(test, ids, dims, ref_ids, ref_dims):
  """Equal up to a renaming of each field's in-vocabulary ids."""
  ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
  test.assertEqual(tuple(dims), tuple(ref_dims))
  test.assertEqual(ids.shape, ref_ids.shape)
  for f in range(ids.shape[1]):
    pairs = set(zip(ids[:, f].tolist(), ref_ids[:, f].tolist(), strict=True))
    ours = {a for a, _ in pairs}
    theirs = {b for _, b in pairs}
    test.assertTrue(
      len(pairs) == len(ours) == len(theirs), f'field {f} is not 1:1'
    )
    for a, b in pairs:
      test.assertEqual(a == dims[f] - 1, b == ref_dims[f] - 1, f'OOV of {f}')
    test.assertLess(ids[:, f].max(), dims[f])


# --------------------------------------------------------------------------
# Synthetic files.


def _hex(rng, vocab):
  """A skewed draw from `vocab` hex values, sometimes missing."""
  if rng.random() < 0.1:
    return ''
  return f'{int(vocab * rng.random() ** 3):08x}'


def _integer(rng):
  kind = rng.random()
  if kind < 0.15:
    return ''
  if kind < 0.5:
    return str(rng.randint(-3, 5))
  if kind < 0.9:
    return str(rng.randint(6, 300))
  return str(rng.randint(300, 10**9))


def criteo_rows(n, seed=0):
  rng = random.Random(seed)
  return [
    [str(rng.randint(0, 1))]
    + [_integer(rng) for _ in range(13)]
    + [_hex(rng, 5 + 20 * (c % 4)) for c in range(26)]
    for _ in range(n)
  ]


def avazu_rows(n, seed=0):
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    day, hour = rng.randint(21, 30), rng.randint(0, 23)
    rows.append(
      [str(rng.getrandbits(63)), str(rng.randint(0, 1)), f'1410{day}{hour:02d}']
      + [_hex(rng, 3 + 7 * (c % 3)) or '0' for c in range(21)]
    )
  return rows


def write_lines(path, rows, sep, header=None):
  with open(path, 'w') as f:
    if header:
      f.write(sep.join(header) + '\n')
    for row in rows:
      f.write(sep.join(row) + '\n')
  return path


class _TmpTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = self.enter_context(tempfile.TemporaryDirectory())

  def config(self, name, path, **overrides):
    config = default.get_config().dataset
    config.name = name
    config.path = path
    config.cache_dir = os.path.join(self.tmp, 'cache')
    config.chunk_rows = 97  # Several chunks, and a short last one.
    config.update(overrides)
    return config

  def encoded(self):
    root = os.path.join(self.tmp, 'cache', 'encoded')
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def _all_rows(dataset):
  return np.asarray(dataset.train.ids), np.asarray(dataset.train.labels)


# --------------------------------------------------------------------------
# Encoding against the reference.


class IntegerRuleTest(absltest.TestCase):
  def test_keys_are_pytorch_fm_classes_on_every_bucket_edge(self):
    edges = data._log_bucket_edges()
    values = set(range(-5, 3000))
    for e in edges[:: max(1, len(edges) // 300)].tolist() + edges[-3:].tolist():
      values.update((e - 1, e, e + 1))
    values.update(random.Random(0).randrange(3, 1 << 62) for _ in range(2000))
    values = np.array(sorted(values), np.int64)
    keys = data.int_feature_keys(values, np.zeros(len(values), bool))
    expected = [int(convert_numeric_feature(str(v))) for v in values.tolist()]
    np.testing.assert_array_equal(keys, expected)
    missing = data.int_feature_keys(np.array([7, 7]), np.array([True, False]))
    self.assertEqual(missing[0], data._MISSING_INT)
    self.assertEqual(missing[1], 3)  # int(log(7) ** 2) = int(3.79)

  def test_counts_merge_in_chunks_like_a_counter(self):
    rng = np.random.default_rng(0)
    counter = data._Counts()
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


class CriteoTest(_TmpTest):
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
      log_bucket=log_bucket,
    )
    dataset = data.load_dataset(config)
    ids, labels = _all_rows(dataset)
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

  def test_random_split_is_split_indices_in_file_order(self):
    rows = criteo_rows(500, seed=1)
    path = write_lines(os.path.join(self.tmp, 'train.txt'), rows, '\t')
    whole = data.load_dataset(self.config('criteo', path, split=(1.0, 0, 0)))
    ids, labels = _all_rows(whole)
    config = self.config('criteo', path, split=(0.7, 0.2, 0.1), seed=5)
    dataset = data.load_dataset(config)
    parts = data.split_indices(500, (0.7, 0.2, 0.1), 5)
    for split, part in zip(('train', 'valid', 'test'), parts, strict=True):
      rows_ = np.sort(part)
      np.testing.assert_array_equal(getattr(dataset, split).ids, ids[rows_])
      np.testing.assert_array_equal(
        getattr(dataset, split).labels, labels[rows_]
      )
    assignment = data.split_assignment(500, (0.7, 0.2, 0.1), 5)
    for s, part in enumerate(parts):
      np.testing.assert_array_equal(
        np.flatnonzero(assignment == s), sorted(part)
      )

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


class AvazuTest(_TmpTest):
  def test_pytorch_fm_fields_with_raw_hour(self):
    rows = avazu_rows(600)
    path = write_lines(
      os.path.join(self.tmp, 'train.csv'), rows, ',', data.AVAZU_COLUMNS
    )
    config = self.config('avazu', path, split=(1.0, 0, 0), hour_features=False)
    dataset = data.load_dataset(config)
    ids, labels = _all_rows(dataset)
    ref_ids, ref_dims = reference_encode([r[2:] for r in rows], set(), 4)
    assert_same_encoding(self, ids, dataset.field_dims, ref_ids, ref_dims)
    np.testing.assert_array_equal(labels, [float(r[1]) for r in rows])
    self.assertEqual(dataset.field_names[:2], ('hour', 'C1'))
    self.assertLen(dataset.field_names, 22)

  def test_hour_of_day_weekday_and_id_without_header(self):
    rows = avazu_rows(300, seed=1)
    path = write_lines(os.path.join(self.tmp, 'dev.csv'), rows, ',')
    config = self.config('avazu', path, split=(1.0, 0, 0), drop_id=False)
    dataset = data.load_dataset(config)
    self.assertEqual(
      dataset.field_names[:4], ('id', 'hour_of_day', 'weekday', 'C1')
    )
    ids, _ = _all_rows(dataset)
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

  def test_wrong_header_and_bad_hour(self):
    rows = avazu_rows(20)
    header = list(data.AVAZU_COLUMNS)
    header[5] = 'site'
    path = write_lines(os.path.join(self.tmp, 'a.csv'), rows, ',', header)
    with self.assertRaisesRegex(data.DataError, r'a\.csv:1: header'):
      data.load_dataset(self.config('avazu', path))
    rows[6][2] = '14103224'
    path = write_lines(os.path.join(self.tmp, 'b.csv'), rows, ',')
    with self.assertRaisesRegex(data.DataError, r'b\.csv:7: hour .* YYMMDDHH'):
      data.load_dataset(self.config('avazu', path))


class LibFMTest(_TmpTest):
  def _lines(self, n, seed, fields=(30, 8, 5)):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
      values = [int(d * rng.random() ** 2) for d in fields]
      rows.append((rng.choice((-1, 1)), values))
    return rows

  def _write(self, name, rows, offsets):
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
      self._write(name, rows, offsets)
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

  def test_given_field_dims_take_global_indices_as_they_are(self):
    os.makedirs(os.path.join(self.tmp, 'd'))
    rows = self._lines(120, 3)
    path = self._write('all.libfm', rows, (0, 30, 38))
    with open(path) as f:  # Features in any order on a line.
      lines = [line.split() for line in f]
    with open(path, 'w') as f:
      f.writelines(' '.join([p[0]] + p[:0:-1]) + '\n' for p in lines)
    config = self.config(
      'libfm', path, field_dims=(30, 8, 5), split=(1.0, 0, 0)
    )
    dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_dims, (30, 8, 5))
    np.testing.assert_array_equal(dataset.train.ids, [v for _, v in rows])
    bad = self._write('bad.libfm', [(1, [0, 7, 4])], (0, 30, 38))
    with open(bad, 'a') as f:
      f.write('1 3:1 31:1 44:1\n')  # 44 is beyond 30 + 8 + 5.
    with self.assertRaisesRegex(data.DataError, r'bad\.libfm:2: .*beyond'):
      data.load_dataset(self.config('libfm', bad, field_dims=(30, 8, 5)))

  @parameterized.parameters(
    ('2 1:1 2:1\n', 'label 2'),
    ('1 1:1\n', 'expected 2 features'),
    ('1 1:0.5 2:1\n', '.*one-hot'),
    ('1 a:1 2:1\n', '.*not idx:value'),
  )
  def test_bad_lines(self, line, message):
    path = write_lines(
      os.path.join(self.tmp, 'f.libfm'), [['-1 3:1 7:1'], ['1 4:1 7:1']], ''
    )
    with open(path, 'a') as f:
      f.write(line)
    with self.assertRaisesRegex(data.DataError, rf'f\.libfm:3: {message}'):
      data.load_dataset(self.config('libfm', path))


class CsvTest(_TmpTest):
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
      label_column='clicked',
      numeric_columns=('age',),
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
    config.categorical_columns = ('city',)
    config.numeric_columns = ()
    self.assertEqual(data.load_dataset(config).field_names, ('city',))
    config.categorical_columns = ('city, user',)  # As a flag gives 'a,b'.
    self.assertEqual(data.load_dataset(config).field_names, ('user', 'city'))
    config.label_column = 'click'
    with self.assertRaisesRegex(
      data.DataError, 'label_column.*click.*clicks.csv'
    ):
      data.load_dataset(config)

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
    a = data.load_dataset(self.config('csv', csv_path, label_column='y'))
    b = data.load_dataset(self.config('csv', pq_path, label_column='y'))
    self.assertEqual(a.field_dims, b.field_dims)
    np.testing.assert_array_equal(a.train.ids, b.train.ids)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)


# --------------------------------------------------------------------------
# Bad lines, the cache key, interrupted runs.


class BadLinesTest(_TmpTest):
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


class CacheKeyTest(_TmpTest):
  def test_every_option_and_the_source_change_the_key(self):
    path = write_lines(os.path.join(self.tmp, 'a.csv'), avazu_rows(30), ',')

    def key(name='csv', **overrides):
      config = self.config(name, path, label_column='click')
      config.update(overrides)
      return data.cache_key(data.ctr_spec(config, data._ctr_files(config)))

    changed = [
      key(min_count=2),
      key(log_bucket=False),
      key(split=(0.7, 0.2, 0.1)),
      key(seed=1),
      key(skip_bad_lines=True),
      key(label_column='hour'),
      key(numeric_columns=('hour',)),
      key(categorical_columns=('C1',)),
      key(sep=';'),
      key('criteo'),
      key('avazu'),
      key('avazu', hour_features=False),
      key('avazu', drop_id=False),
      key('libfm'),
      key('libfm', field_dims=(3, 4)),
      key(valid_path=path, test_path=path),
    ]
    base_key = key()
    self.assertEqual(base_key, key(chunk_rows=5))  # Not an output option.
    self.assertEqual(base_key, key(min_count=1))  # The default, spelt out.
    self.assertLen(set(changed + [base_key]), len(changed) + 1)
    os.utime(path, ns=(1, 1))
    self.assertNotEqual(base_key, key())

  def test_exception_mid_way_leaves_no_trusted_cache_and_old_intact(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(400), '\t'
    )
    old = data.load_dataset(self.config('criteo', path))
    old_ids = np.array(old.train.ids)
    [old_name] = self.encoded()
    real = data._encode_chunk
    calls = []

    def failing(*args):
      calls.append(1)
      if len(calls) == 3:
        raise RuntimeError('injected')
      return real(*args)

    config = self.config('criteo', path, min_count=2)
    with mock.patch.object(data, '_encode_chunk', failing):
      with self.assertRaisesRegex(RuntimeError, 'injected'):
        data.load_dataset(config)
    self.assertEqual(self.encoded(), [old_name])  # No partial, no temp dir.
    np.testing.assert_array_equal(
      data.load_dataset(self.config('criteo', path)).train.ids, old_ids
    )
    fresh = data.load_dataset(config)  # Rebuilt, not a partial one.
    self.assertLen(self.encoded(), 2)
    self.assertLen(fresh.train, 320)
    self.assertEqual(fresh.train.ids.shape[1], 39)

  def test_sigkill_mid_way_leaves_nothing_trusted(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(400), '\t'
    )
    config = self.config('criteo', path, chunk_rows=40)
    encoded = os.path.join(self.tmp, 'cache', 'encoded')
    # A child preprocesses slowly (0.3 s per chunk of pass 2) until killed.
    script = (
      'import sys, time, ml_collections\n'
      f'sys.path.insert(0, {data.ROOT!r})\n'
      'import data\n'
      'real = data._encode_chunk\n'
      'def slow(*args):\n'
      '  time.sleep(0.3)\n'
      '  return real(*args)\n'
      'data._encode_chunk = slow\n'
      f'data.load_dataset(ml_collections.ConfigDict({config.to_dict()!r}))\n'
    )
    child = subprocess.Popen([sys.executable, '-c', script])
    try:
      deadline = time.monotonic() + 60
      while not any(n.startswith('.tmp-') for n in self.encoded()):
        self.assertIsNone(child.poll(), 'the child ended before the kill')
        self.assertLess(time.monotonic(), deadline)
        time.sleep(0.05)
      time.sleep(0.4)  # Some rows written.
    finally:
      child.kill()
      child.wait()
    [partial] = self.encoded()
    self.assertTrue(partial.startswith('.tmp-criteo-'))
    self.assertTrue(os.listdir(os.path.join(encoded, partial)))
    dataset = data.load_dataset(config)  # Not served from the partial.
    [name] = self.encoded()  # And the partial is gone.
    self.assertFalse(name.startswith('.'))
    self.assertEqual(
      (len(dataset.train), len(dataset.valid), len(dataset.test)), (320, 40, 40)
    )

  def test_killed_runs_temporary_directories_are_removed(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(50), '\t'
    )
    encoded = os.path.join(self.tmp, 'cache', 'encoded')
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    owners = {
      '.tmp-criteo-dead': dead.pid,  # A run that was killed.
      '.tmp-criteo-alive': os.getpid(),  # A run still writing.
    }
    for name, pid in owners.items():
      os.makedirs(os.path.join(encoded, name))
      with open(os.path.join(encoded, name, 'owner.json'), 'w') as f:
        json.dump({'host': socket.gethostname(), 'pid': pid}, f)
    os.makedirs(os.path.join(encoded, '.tmp-other'))  # No owner: not ours.
    data.load_dataset(self.config('criteo', path))
    left = self.encoded()
    self.assertNotIn('.tmp-criteo-dead', left)
    self.assertIn('.tmp-criteo-alive', left)
    self.assertIn('.tmp-other', left)
    self.assertLen(left, 3)  # And the new cache, without its owner file.
    [new] = [n for n in left if not n.startswith('.')]
    self.assertFalse(os.path.exists(os.path.join(encoded, new, 'owner.json')))


# --------------------------------------------------------------------------
# Training from memory maps.


class MemmapTrainingTest(_TmpTest):
  def test_train_batches_permutation_unchanged_and_memmap_equal(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(900), '\t'
    )
    dataset = data.load_dataset(self.config('criteo', path))
    split = dataset.train
    memory = data.Split(np.array(split.ids), np.array(split.labels))
    for process in range(2):
      got = list(
        data.train_batches(
          split, 100, seed=3, epoch=1, process_index=process, process_count=2
        )
      )
      want = list(
        data.train_batches(
          memory, 100, seed=3, epoch=1, process_index=process, process_count=2
        )
      )
      perm = np.random.default_rng([3, 1]).permutation(len(memory))
      self.assertLen(got, len(memory) // 100)
      for step, (a, b) in enumerate(zip(got, want, strict=True)):
        rows = np.sort(
          perm[step * 100 + process * 50 : step * 100 + process * 50 + 50]
        )
        np.testing.assert_array_equal(a['ids'], b['ids'])
        np.testing.assert_array_equal(a['ids'], memory.ids[rows])
        np.testing.assert_array_equal(a['label'], memory.labels[rows])

  def test_memmap_training_gives_in_memory_metrics(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(2000), '\t'
    )
    config = fm.get_config('smoke')
    config.dataset = self.config('criteo', path, min_count=2)
    config.batch_size = 256
    config.progress_bar = False
    load = data.load_dataset

    def in_memory(dataset_config):
      dataset = load(dataset_config)
      splits = {
        s: data.Split(
          np.array(getattr(dataset, s).ids),
          np.array(getattr(dataset, s).labels),
        )
        for s in ('train', 'valid', 'test')
      }
      for split in splits.values():
        self.assertNotIsInstance(split.ids, np.memmap)
      return data.Dataset(
        dataset.name, dataset.field_names, dataset.field_dims, **splits
      )

    mapped = train.train_and_evaluate(config, os.path.join(self.tmp, 'a'))
    self.assertIsInstance(load(config.dataset).train.ids, np.memmap)
    with mock.patch.object(data, 'load_dataset', in_memory):
      memory = train.train_and_evaluate(config, os.path.join(self.tmp, 'b'))
    self.assertEqual(mapped, memory)
    self.assertGreater(mapped['auc'], 0.0)
    self.assertEqual(mapped['num_examples'], 200)


# --------------------------------------------------------------------------
# The benchmark scripts, tiny.


class BenchmarkScriptsTest(_TmpTest):
  def test_synthetic_files_are_seeded_and_parse_as_the_real_format(self):
    from benchmarks import synthetic

    a = synthetic.write('criteo', 400, os.path.join(self.tmp, 'a.txt'))
    b = synthetic.write('criteo', 400, os.path.join(self.tmp, 'b.txt'))
    with open(a) as f, open(b) as g:
      text = f.read()
      self.assertEqual(text, g.read())
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
      self.assertEqual(
        tuple(f.readline().strip().split(',')), data.AVAZU_COLUMNS
      )
    self.assertLen(
      data.load_dataset(self.config('avazu', c, split=(1.0, 0, 0))).train, 300
    )

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
    from benchmarks import synthetic

    path = synthetic.write('avazu', 300, os.path.join(self.tmp, 'x.csv'))
    dataset = data.load_dataset(self.config('avazu', path))
    self.assertEqual(row['field_dims_sum'], sum(dataset.field_dims))
    with mock.patch.object(preprocess, 'RESULTS', os.path.join(self.tmp, 'r')):
      preprocess.write_results('avazu', [dict(row, lines=5)])
      md = preprocess.write_results('avazu', [row])
      with open(md) as f:
        table = [line for line in f if line.startswith('| ')]
    self.assertLen(table, 3)  # Header and both sizes.


if __name__ == '__main__':
  absltest.main()
