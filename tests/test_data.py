"""Tests of data.py: MovieLens parsing, downloads, the cache and batches."""

import hashlib
import http.server
import io
import os
import tempfile
import threading
from unittest import mock
import zipfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import default
import data


def _dataset_config(tmp, **overrides):
  config = default.get_config().dataset
  config.cache_dir = os.path.join(tmp, 'cache')
  config.update(overrides)
  return config


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  return path


def _ml100k_zip(rows):
  """A zip laid out as GroupLens's ml-100k.zip, with `rows` in u.data."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as z:
    z.writestr(
      'ml-100k/u.data', ''.join(f'{u}\t{i}\t{r}\t0\n' for u, i, r in rows)
    )
    z.writestr('ml-100k/README', 'test archive')
  return buffer.getvalue()


class _Server:
  """A one-file HTTP server on 127.0.0.1 that can cut a transfer short."""

  def __init__(self, payload: bytes, truncate: bool = False):
    payload_ = payload

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header('Content-Length', str(len(payload_)))
        self.end_headers()
        if truncate:
          self.wfile.write(payload_[: len(payload_) // 2])
          self.wfile.flush()
          self.connection.shutdown(2)  # The server goes away mid-transfer.
        else:
          self.wfile.write(payload_)

      def log_message(self, *args):
        pass

    self.httpd = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_port}'
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


def _files_under(root):
  return sorted(
    os.path.relpath(os.path.join(d, f), root)
    for d, _, files in os.walk(root)
    for f in files
  )


class DownloadTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    rows = [(u, i, (u * i) % 5 + 1) for u in range(1, 30) for i in range(1, 9)]
    self.rows = rows
    self.payload = _ml100k_zip(rows)
    self.md5 = hashlib.md5(self.payload).hexdigest()

  def test_good_archive_is_verified_unpacked_and_loaded(self):
    with _Server(self.payload) as server:
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      with mock.patch.dict(data.GROUPLENS_MD5, {'ml-100k': self.md5}):
        dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_dims, (29, 8))
    n = len(dataset.train) + len(dataset.valid) + len(dataset.test)
    self.assertEqual(n, len(self.rows))
    positives = sum(r > 3 for _, _, r in self.rows)
    labels = np.concatenate(
      [dataset.train.labels, dataset.valid.labels, dataset.test.labels]
    )
    self.assertEqual(int(labels.sum()), positives)
    # Only the unpacked directory and the encoded cache remain.
    downloads = os.path.join(config.cache_dir, 'downloads')
    self.assertEqual(os.listdir(downloads), ['ml-100k'])
    self.assertIn('u.data', os.listdir(os.path.join(downloads, 'ml-100k')))

  def test_checksum_mismatch_is_a_clear_error_and_leaves_cache_clean(self):
    with _Server(self.payload) as server:
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      with mock.patch.dict(data.GROUPLENS_MD5, {'ml-100k': '0' * 32}):
        with self.assertRaisesRegex(data.DownloadError, 'Checksum mismatch'):
          data.load_dataset(config)
    self.assertEqual(_files_under(config.cache_dir), [])

  def test_server_gone_mid_transfer_leaves_nothing_half_written(self):
    with _Server(self.payload, truncate=True) as server:
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      with mock.patch.dict(data.GROUPLENS_MD5, {'ml-100k': self.md5}):
        with self.assertRaises(data.DownloadError):
          data.load_dataset(config)
    self.assertEqual(_files_under(config.cache_dir), [])

  def test_unreachable_server(self):
    with _Server(b'') as server:
      url = server.url
    config = _dataset_config(self.tmp, name='ml-1m', url=url)
    with self.assertRaisesRegex(data.DownloadError, 'Could not download'):
      data.load_dataset(config)


class MovieLensParsingTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()

  def test_embedded_data_loads_offline(self):
    dataset = data.load_dataset(_dataset_config(self.tmp))
    self.assertEqual(dataset.field_names, ('user', 'item'))
    self.assertEqual(dataset.field_dims, (610, 9724))  # Dense ids.
    self.assertEqual(
      (len(dataset.train), len(dataset.valid), len(dataset.test)),
      (80668, 10083, 10085),
    )
    for split in (dataset.train, dataset.valid, dataset.test):
      self.assertEqual(split.ids.dtype, np.int32)
      self.assertTrue(np.all(split.ids < np.array(dataset.field_dims)))

  @parameterized.named_parameters(
    ('csv', 'ml-20m', 'ratings.csv', 'userId,movieId,rating,timestamp\n', ','),
    ('dat', 'ml-1m', 'ratings.dat', '', '::'),
    ('tsv', 'ml-100k', 'u.data', '', '\t'),
  )
  def test_formats_encode_to_dense_ids(self, name, filename, header, sep):
    rows = [(10, 500, 4.5), (10, 7, 2.0), (99, 500, 3.0), (5, 7, 5.0)]
    text = header + ''.join(
      f'{u}{sep}{i}{sep}{r}{sep}123\n' for u, i, r in rows
    )
    path = _write(os.path.join(self.tmp, name, filename), text)
    frame = data.read_movielens(path, name)
    np.testing.assert_array_equal(frame['user'], [10, 10, 99, 5])
    ids, dims = data.encode_columns([frame['user'], frame['item']])
    self.assertEqual(dims, (3, 2))
    np.testing.assert_array_equal(ids, [[1, 1], [1, 0], [2, 1], [0, 0]])
    # The directory works as config.dataset.path too.
    config = _dataset_config(
      self.tmp, name=name, path=os.path.dirname(path), split=(0.5, 0.25, 0.25)
    )
    dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_dims, (3, 2))

  @parameterized.named_parameters(
    ('columns', '1,2,4.0,5\n3,4,5.0\n', ':3: expected 4'),
    ('extra', '1,2,4.0,5\n3,4,5.0,6,7\n', ':3: expected 4'),
    ('user', '1,2,4.0,5\nx1,4,5.0,6\n', ":3: user id 'x1' is not a number"),
    ('rating', '1,2,4.0,5\n1,4,good,6\n', ":3: rating 'good' is not a"),
  )
  def test_malformed_lines_name_file_and_line(self, body, message):
    path = _write(
      os.path.join(self.tmp, 'bad', 'ratings.csv'),
      'userId,movieId,rating,timestamp\n' + body,
    )
    config = _dataset_config(self.tmp, name='ml-20m', path=path)
    with self.assertRaises(data.DataError) as cm:
      data.load_dataset(config)
    self.assertIn(path, str(cm.exception))
    self.assertIn(message, str(cm.exception))
    self.assertFalse(os.path.exists(os.path.join(config.cache_dir, 'encoded')))

  def test_missing_path_and_unknown_name_name_the_config_key(self):
    config = _dataset_config(self.tmp, name='ml-20m', path='/nonexistent/x')
    with self.assertRaisesRegex(data.DataError, 'config.dataset.path'):
      data.load_dataset(config)
    config = _dataset_config(self.tmp, name='ml-7m')
    with self.assertRaisesRegex(data.DataError, 'config.dataset.name'):
      data.load_dataset(config)
    config = _dataset_config(self.tmp, split=(0.8, 0.3, 0.1))
    with self.assertRaisesRegex(data.DataError, 'config.dataset.split'):
      data.load_dataset(config)


class CacheTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.path = _write(
      os.path.join(self.tmp, 'src', 'ratings.csv'),
      'userId,movieId,rating,timestamp\n'
      + ''.join(f'{u},{u % 7},{u % 5 + 1},0\n' for u in range(200)),
    )

  def test_second_load_reads_the_cache_not_the_source(self):
    config = _dataset_config(self.tmp, name='ml-20m', path=self.path)
    first = data.load_dataset(config)
    with mock.patch.object(data, 'read_movielens', side_effect=AssertionError):
      second = data.load_dataset(config)
    self.assertIsInstance(second.train.ids, np.memmap)
    np.testing.assert_array_equal(first.train.ids, second.train.ids)

  def test_changed_source_or_option_is_not_served_stale(self):
    config = _dataset_config(self.tmp, name='ml-20m', path=self.path)
    before = data.load_dataset(config)
    with open(self.path, 'a') as f:
      f.write('500,3,5,0\n')
    after = data.load_dataset(config)
    self.assertEqual(after.field_dims[0], before.field_dims[0] + 1)
    config.seed = 1
    reseeded = data.load_dataset(config)
    self.assertFalse(np.array_equal(reseeded.train.ids, after.train.ids))
    encoded = os.listdir(os.path.join(config.cache_dir, 'encoded'))
    self.assertLen(encoded, 3)

  def test_failed_write_leaves_no_trusted_cache(self):
    config = _dataset_config(self.tmp, name='ml-20m', path=self.path)
    with mock.patch.object(np, 'save', side_effect=OSError('disk full')):
      with self.assertRaises(OSError):
        data.load_dataset(config)
    encoded = os.path.join(config.cache_dir, 'encoded')
    self.assertEqual(os.listdir(encoded), [])
    self.assertLen(data.load_dataset(config).train, 160)


class BatchTest(parameterized.TestCase):
  def _split(self, n):
    ids = np.stack([np.arange(n), np.arange(n) % 3], 1).astype(np.int32)
    return data.Split(ids, (np.arange(n) % 2).astype(np.float32))

  @parameterized.parameters(7, 8, 9, 16, 17)
  def test_train_batches_drop_remainder_and_processes_partition(self, n):
    split = self._split(n)
    whole = list(data.train_batches(split, 4, seed=3, epoch=1))
    self.assertLen(whole, n // 4)
    seen = np.concatenate([b['ids'][:, 0] for b in whole])
    self.assertLen(np.unique(seen), len(seen))  # No row twice in an epoch.
    parts = [
      list(
        data.train_batches(
          split, 4, seed=3, epoch=1, process_index=p, process_count=2
        )
      )
      for p in range(2)
    ]
    for step, batch in enumerate(whole):
      union = np.concatenate([parts[0][step]['ids'], parts[1][step]['ids']])
      self.assertEqual(sorted(union[:, 0]), sorted(batch['ids'][:, 0]))
    # Another epoch, another order; the same epoch, the same order.
    other = list(data.train_batches(split, 4, seed=3, epoch=2))
    again = list(data.train_batches(split, 4, seed=3, epoch=1))
    np.testing.assert_array_equal(whole[0]['ids'], again[0]['ids'])
    if n >= 16:
      self.assertFalse(
        all(
          np.array_equal(a['ids'], b['ids'])
          for a, b in zip(whole, other, strict=True)
        )
      )

  @parameterized.parameters((7, 1), (7, 2), (8, 2), (9, 2), (3, 4), (17, 3))
  def test_eval_batches_cover_every_row_once_with_a_mask(self, n, processes):
    split = self._split(n)
    per_process = [
      list(
        data.eval_batches(
          split, 4 * processes, process_index=p, process_count=processes
        )
      )
      for p in range(processes)
    ]
    self.assertLen({len(b) for b in per_process}, 1)  # Same batch count.
    rows = []
    for batches in per_process:
      for b in batches:
        self.assertEqual(b['ids'].shape, (4, 2))
        rows.extend(b['ids'][b['mask'] == 1, 0])
        self.assertTrue(np.all(b['label'][b['mask'] == 0] == 0))
    self.assertEqual(sorted(rows), list(range(n)))

  def test_shard_reshapes_and_rejects_uneven_batches(self):
    batch = {'ids': np.zeros((6, 2), np.int32), 'label': np.zeros(6)}
    self.assertEqual(data.shard(batch, 2)['ids'].shape, (2, 3, 2))
    with self.assertRaisesRegex(data.DataError, 'batch_size'):
      data.shard(batch, 4)


if __name__ == '__main__':
  absltest.main()
