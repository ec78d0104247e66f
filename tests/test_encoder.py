"""Tests of encoder.py: a saved encoder gives raw rows the ids of training.

Each format's tiny file is preprocessed by data.py (one split holding every
row), its encoder saved and loaded back, and the same rows encoded again,
from the file, without their label, and as a DataFrame: the ids must be
the cache's. Unseen and rare values get the OOV id.
"""

import dataclasses
import json
import os

from absl.testing import parameterized
from dataset_testing import DatasetTestCase
from dataset_testing import avazu_rows
from dataset_testing import criteo_rows
from dataset_testing import write_lines
import ml_collections
import numpy as np
import pandas as pd

from configs import default
import data
from datasets import criteo
import encoder
import utils

CRITEO_COLUMNS = list(criteo.COLUMNS)
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


class EncoderTest(DatasetTestCase):
  def _save(self, name, path, **overrides):
    """Preprocesses `path` as one split, saves and loads its encoder."""
    config = default.get_config()
    config.dataset = self.config(name, path, split=(1.0, 0.0, 0.0))
    for key, value in overrides.items():
      if isinstance(value, dict):
        config.dataset[key].update(value)
      else:
        config.dataset[key] = value
    config.model_name = 'fm'
    config.model = ml_collections.ConfigDict({'embed_dim': 3})
    dataset = data.load_dataset(config.dataset)
    workdir = os.path.join(self.tmp, 'run')
    encoder.save(workdir, dataset, config)
    return dataset, encoder.load(workdir), workdir

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
    with self.assertRaisesRegex(data.DataError, 'differ from those the model'):
      enc.encode(frame.assign(extra=1))

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
    unlabeled = os.path.join(self.tmp, 'pairs.csv')
    with open(unlabeled, 'w') as f:
      f.write('userId,movieId\n9,99\n\n5,20\n')
    self._check_rows(enc.encode(unlabeled), [[2, 3], [3, 1]], None)
    bad = os.path.join(self.tmp, 'bad.csv')
    with open(bad, 'w') as f:
      f.write('userId,movieId\n9,99\nx,1\n')
    with self.assertRaisesRegex(data.DataError, "bad.csv:3: user id 'x'"):
      enc.encode(bad)

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
    meta['version'] = encoder.VERSION + 1
    with open(os.path.join(directory, 'encoder.json'), 'w') as f:
      json.dump(meta, f)
    with self.assertRaisesRegex(utils.UserError, 'newer'):
      encoder.load(workdir)
    with self.assertRaisesRegex(utils.UserError, 'no encoder.json'):
      encoder.load(self.tmp)

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
