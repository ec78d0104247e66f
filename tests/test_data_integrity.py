"""Faults injected into the data side: nothing on disk is trusted unchecked.

Damaged caches are rebuilt with a warning, a source edited in place is
noticed, files that cannot be read give one `DataError` naming the file,
a failed write leaves the other caches as they were, and cache directories
serve every user of a shared `cache_dir`.
"""

import builtins
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import DatasetTestCase
from dataset_testing import criteo_rows
from dataset_testing import write_lines
from dataset_testing import write_text
import numpy as np

import data
from datasets import cache
from datasets import core
from datasets import encode
from datasets import housekeeping
from datasets import movielens
from datasets import streaming
import utils

RATINGS_HEADER = 'userId,movieId,rating,timestamp\n'


def _ratings(n=200, rating=lambda u: u % 5 + 1):
  return RATINGS_HEADER + ''.join(
    f'{u},{u % 7},{rating(u)},0\n' for u in range(n)
  )


def _tree(root):
  """{relative path: SHA-256 of its bytes} of every file under `root`."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _arrays(dataset):
  return [
    np.array(a)
    for s in (dataset.train, dataset.valid, dataset.test)
    for a in (s.ids, s.labels)
  ]


class IntegrityTestCase(DatasetTestCase):
  def setUp(self):
    super().setUp()
    self.path = write_text(
      os.path.join(self.tmp, 'src', 'ratings.csv'), _ratings()
    )

  def cache_path(self, *names):
    [name] = [n for n in self.encoded() if not n.startswith('.')]
    return os.path.join(self.tmp, 'cache', 'encoded', name, *names)

  def assert_same(self, a, b):
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
      np.testing.assert_array_equal(x, y)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 7)


def _empty(path):
  open(path, 'w').close()


def _invalid_json(path):
  with open(path, 'w') as f:
    f.write('{"version": 3, "files": ')


def _edit_meta(directory, edit):
  """Rewrites `directory`'s meta.json after `edit(meta)`."""
  path = os.path.join(directory, 'meta.json')
  with open(path) as f:
    meta = json.load(f)
  edit(meta)
  _write_meta(path, meta)


def _write_meta(path, meta):
  """Writes `meta` with its own checksum updated: only the checks of its
  content can tell."""
  meta['meta_sha256'] = cache.meta_digest(meta)
  with open(path, 'w') as f:
    json.dump(meta, f)


def _without_checksum(directory):
  path = os.path.join(directory, 'meta.json')
  with open(path) as f:
    meta = json.load(f)
  del meta['meta_sha256']
  with open(path, 'w') as f:
    json.dump(meta, f)


def _meta_with_another_file(directory):
  """meta.json lists a numeric array its fields do not name (as if its
  `dense_names` were lost): served, the numeric inputs would be dropped."""
  _edit_meta(
    directory,
    lambda m: m['files'].__setitem__('train_dense', m['files']['train_labels']),
  )


def _labels_as_a_column(directory):
  """train_labels.npy saved `[n, 1]`: same bytes but the header's shape,
  its checksum updated; served, labels would broadcast against logits."""
  path = os.path.join(directory, 'train_labels.npy')
  np.save(path, np.load(path).reshape(-1, 1))
  _update_checksum(directory, 'train_labels')


def _overwrite(path, values, dtype):
  """Overwrites the rows of an .npy file in place; the size is kept."""
  array = np.load(path, mmap_mode='r+')
  array[...] = np.asarray(values, dtype)
  array.flush()
  del array


def _npy_checksum(content: bytes) -> str:
  """The checksum of an .npy file's bytes as meta.json records it.

  The SHA-256 of the SHA-256s of its pieces: the header, then whole rows of
  about `cache.PIECE_BYTES` each.
  """
  f = io.BytesIO(content)
  np.lib.format.read_magic(f)
  shape, _, dtype = np.lib.format.read_array_header_1_0(f)
  start, row = f.tell(), dtype.itemsize * int(np.prod(shape[1:]))
  step = max(1, cache.PIECE_BYTES // row) * row
  pieces = [content[:start]] + [
    content[o : o + step] for o in range(start, len(content), step)
  ]
  digests = b''.join(hashlib.sha256(p).digest() for p in pieces)
  return hashlib.sha256(digests).hexdigest()


def _update_checksum(directory, name):
  """Makes meta.json agree with the file again: only invariants can tell."""
  with open(os.path.join(directory, f'{name}.npy'), 'rb') as f:
    checksum = _npy_checksum(f.read())
  meta_path = os.path.join(directory, 'meta.json')
  with open(meta_path) as f:
    meta = json.load(f)
  meta['files'][name]['sha256'] = checksum
  _write_meta(meta_path, meta)


class DamagedCacheTest(IntegrityTestCase):
  """Every damage is found, warned about and repaired from the source."""

  def damage_and_reload(self, damage):
    config = self.config('ml-20m', self.path)
    good = data.load_dataset(config)
    expected = _arrays(good)
    del good
    directory = self.cache_path()
    damage(directory)
    reads = []
    real = movielens.read_movielens

    def counting(*args):
      reads.append(args)
      return real(*args)

    with mock.patch.object(movielens, 'read_movielens', counting):
      with self.assertLogs(level='WARNING') as logs:
        again = data.load_dataset(config)
    self.assertLen(reads, 1)  # Rebuilt from the source, not served.
    for x, y in zip(_arrays(again), expected, strict=True):
      np.testing.assert_array_equal(x, y)
    # The repaired cache is served from then on, without a warning.
    with mock.patch.object(
      movielens, 'read_movielens', side_effect=AssertionError
    ):
      with self.assertNoLogs(level='WARNING'):
        data.load_dataset(config)
    return '\n'.join(logs.output)

  @parameterized.named_parameters(
    (
      'truncated_ids',
      lambda d: _truncate(f'{d}/train_ids.npy'),
      'train_ids.npy has',
    ),
    (
      'truncated_labels',
      lambda d: _truncate(f'{d}/test_labels.npy'),
      'test_labels.npy has',
    ),
    ('empty_meta', lambda d: _empty(f'{d}/meta.json'), 'meta.json'),
    ('invalid_meta', lambda d: _invalid_json(f'{d}/meta.json'), 'meta.json'),
    ('missing_meta', lambda d: os.remove(f'{d}/meta.json'), 'meta.json'),
    (
      'missing_file',
      lambda d: os.remove(f'{d}/valid_ids.npy'),
      'valid_ids.npy',
    ),
    (
      'empty_dir',
      lambda d: [os.remove(f'{d}/{n}') for n in os.listdir(d)],
      'meta.json',
    ),
    ('meta_of_other_fields', _meta_with_another_file, 'lists other files'),
    (
      'meta_of_another_key',  # A cache directory copied under another key.
      lambda d: _edit_meta(d, lambda m: m['spec'].update(min_count=7)),
      'meta.json describes other data than its key',
    ),
    (
      'meta_names_and_dims_disagree',
      lambda d: _edit_meta(d, lambda m: m['field_names'].append('x')),
      'field_dims and field_names differ in length',
    ),
    ('header_of_another_shape', _labels_as_a_column, 'train_labels.npy holds'),
  )
  def test_damaged_file_is_rebuilt_with_a_warning(self, damage, message):
    self.assertIn(message, self.damage_and_reload(damage))

  def test_labels_overwritten_with_seven_fail_the_checksum(self):
    output = self.damage_and_reload(
      lambda d: _overwrite(f'{d}/train_labels.npy', 7.0, np.float32)
    )
    self.assertIn('train_labels.npy: its checksum differs', output)

  def test_labels_not_0_1_are_found_even_with_a_matching_checksum(self):
    def damage(directory):
      _overwrite(f'{directory}/valid_labels.npy', 7.0, np.float32)
      _update_checksum(directory, 'valid_labels')

    output = self.damage_and_reload(damage)
    self.assertIn(
      'valid_labels.npy: labels other than 0 and 1 (e.g. 7.0)', output
    )

  def test_ids_out_of_range_are_found_even_with_a_matching_checksum(self):
    def damage(directory):
      ids = np.load(f'{directory}/train_ids.npy')
      ids[5, 1] = 10**6
      ids[9, 0] = -1
      _overwrite(f'{directory}/train_ids.npy', ids, np.int32)
      _update_checksum(directory, 'train_ids')

    output = self.damage_and_reload(damage)
    self.assertIn(
      'train_ids.npy: ids outside [0, field_dims) in field(s) [0, 1]', output
    )

  def test_a_flipped_bit_inside_the_id_range_fails_the_checksum(self):
    def damage(directory):
      ids = np.load(f'{directory}/test_ids.npy')
      ids[3, 1] ^= 1  # Still a valid id of another item.
      _overwrite(f'{directory}/test_ids.npy', ids, np.int32)

    self.assertIn('test_ids.npy: its checksum', self.damage_and_reload(damage))

  def test_meta_json_of_other_data_is_not_trusted(self):
    def damage(directory):
      with open(f'{directory}/meta.json') as f:
        meta = json.load(f)
      meta['field_dims'][0] = 1  # Would let ids of field 0 overflow.
      _write_meta(f'{directory}/meta.json', meta)  # Its checksum updated.

    self.assertIn('train_ids.npy: ids outside', self.damage_and_reload(damage))

  def test_a_hand_edited_meta_json_is_rebuilt_not_served(self):
    # A larger field_dims passes every check of the arrays' content (their
    # ids stay inside it): only meta.json's own checksum can tell.
    config = self.config('ml-20m', self.path)
    dims = data.load_dataset(config).field_dims
    path = self.cache_path('meta.json')
    with open(path) as f:
      meta = json.load(f)
    meta['field_dims'][1] += 100
    with open(path, 'w') as f:
      json.dump(meta, f)
    with self.assertLogs(level='WARNING') as logs:
      self.assertEqual(data.load_dataset(config).field_dims, dims)
    self.assertIn(
      'meta.json: its content differs from its checksum', logs.output[0]
    )
    with open(path) as f:
      self.assertEqual(json.load(f)['field_dims'], list(dims))

  def test_an_older_meta_json_without_its_checksum_is_served(self):
    # Caches written before meta.json had its checksum are not rebuilt.
    config = self.config('ml-20m', self.path)
    dims = data.load_dataset(config).field_dims
    _without_checksum(self.cache_path())
    with mock.patch.object(
      movielens, 'read_movielens', side_effect=AssertionError
    ):
      with self.assertNoLogs(level='WARNING'):
        self.assertEqual(data.load_dataset(config).field_dims, dims)

  def test_a_reformatted_meta_json_is_served(self):
    # Indentation and the order of keys are not content.
    config = self.config('ml-20m', self.path)
    data.load_dataset(config)
    path = self.cache_path('meta.json')
    with open(path) as f:
      meta = json.load(f)
    with open(path, 'w') as f:
      json.dump(dict(reversed(meta.items())), f, indent=4)
    with mock.patch.object(
      movielens, 'read_movielens', side_effect=AssertionError
    ):
      with self.assertNoLogs(level='WARNING'):
        data.load_dataset(config)


class PiecesTest(IntegrityTestCase):
  def test_checksums_and_checks_agree_across_many_pieces(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(900, seed=2), '\t'
    )
    config = self.config('criteo', path, chunk_rows=37)
    # Pieces of 3 rows of ids, 40 labels: every write crosses boundaries.
    with mock.patch.object(cache, 'PIECE_BYTES', 3 * 39 * 4 + 5):
      dataset = data.load_dataset(config)
      reference = _arrays(dataset)
      directory = self.cache_path()
      with open(os.path.join(directory, 'meta.json')) as f:
        meta = json.load(f)
      for name in ('train_ids', 'valid_labels', 'vocab'):
        record = meta['files'][name]
        with open(os.path.join(directory, f'{name}.npy'), 'rb') as f:
          content = f.read()
        self.assertLen(content, record['bytes'])
        self.assertEqual(record['sha256'], _npy_checksum(content))
      self.assertGreater(meta['examples']['train'], 100)  # 30+ pieces.
      # A bad id in a middle piece is found.
      ids = np.load(os.path.join(directory, 'train_ids.npy'))
      ids[400, 20] = dataset.field_dims[20]
      del dataset
      _overwrite(os.path.join(directory, 'train_ids.npy'), ids, np.int32)
      _update_checksum(directory, 'train_ids')
      with self.assertLogs(level='WARNING') as logs:
        again = data.load_dataset(config)
    self.assertIn('field(s) [20]', '\n'.join(logs.output))
    for x, y in zip(_arrays(again), reference, strict=True):
      np.testing.assert_array_equal(x, y)


class FreshDataTest(IntegrityTestCase):
  """Encoded rows that break the contract are never published."""

  @parameterized.named_parameters(
    (
      'id_equal_to_field_dim',
      lambda ids, labels: ids.__setitem__((4, 0), 7),
      'ids outside',
    ),
    (
      'negative_id',
      lambda ids, labels: ids.__setitem__((0, 1), -3),
      'ids outside',
    ),
    (
      'label_half',
      lambda ids, labels: labels.__setitem__(2, 0.5),
      'labels other than 0 and 1',
    ),
    (
      'label_nan',
      lambda ids, labels: labels.__setitem__(2, np.nan),
      'labels other than 0 and 1',
    ),
  )
  def test_a_source_breaking_the_contract_is_an_error(self, break_, message):
    self.assert_refused(break_, message)

  def test_side_arrays_of_a_source_without_such_fields_are_an_error(self):
    # Written as they were, they would be dropped without a word.
    multi = np.zeros((100, 1, 2), np.int32)
    self.assert_refused(
      lambda ids, labels: None,
      'multi-hot or numeric arrays but not such fields',
      extra=(multi, None),
    )

  def assert_refused(self, break_, message, extra=()):
    """A source whose chunk is `(ids, labels, *extra)`, `break_` applied,
    fails with `message` and leaves nothing in the cache."""

    def build(config, options, paths):
      del config, options, paths
      rng = np.random.default_rng(0)
      ids = rng.integers(0, 7, (100, 2)).astype(np.int32)
      labels = np.tile(np.float32([0, 1]), 50)
      break_(ids, labels)
      return core.Encoded(
        field_names=('a', 'b'),
        field_dims=(7, 7),
        vocabulary=(np.arange(6), np.arange(6)),
        rows={'all': 100},
        chunks=lambda: iter([('all', ids, labels, *extra)]),
        in_memory=True,
      )

    with mock.patch.object(movielens, 'build', build):
      with self.assertRaisesRegex(RuntimeError, message):
        data.load_dataset(self.config('ml-20m', self.path))
    self.assertEqual(self.encoded(), [])  # Nothing published, nothing left.


class SourceChangeTest(IntegrityTestCase):
  def test_same_size_edit_in_the_middle_with_mtime_kept_is_noticed(self):
    # Over 2 MiB, so that the edit lies outside the first and last MiB.
    path = write_text(
      os.path.join(self.tmp, 'big', 'ratings.csv'), _ratings(300_000)
    )
    self.assertGreater(os.path.getsize(path), 3 << 20)
    config = self.config('ml-20m', path)
    before = data.load_dataset(config)
    with open(path, 'rb') as f:
      text = f.read()
    line = b'\n150000,4,1,0\n'  # A negative, mid-file.
    where = text.index(line) + len(line) - 4
    self.assertTrue(1 << 20 < where < len(text) - (1 << 20))
    old = os.stat(path)
    with open(path, 'r+b') as f:
      f.seek(where)
      f.write(b'5')  # Now a positive.
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    self.assertEqual(os.path.getsize(path), old.st_size)
    self.assertEqual(os.stat(path).st_mtime_ns, old.st_mtime_ns)
    after = data.load_dataset(config)

    def positives(dataset):
      splits = (dataset.train, dataset.valid, dataset.test)
      return sum(int(np.sum(s.labels)) for s in splits)

    self.assertEqual(positives(after), positives(before) + 1)
    self.assertLen(self.encoded(), 2)

  def test_a_touch_or_a_copy_reuses_the_cache(self):
    config = self.config('ml-20m', self.path)
    first = data.load_dataset(config)
    os.utime(self.path, ns=(1, 1))
    copy = write_text(os.path.join(self.tmp, 'copy', 'ratings.csv'), _ratings())
    with mock.patch.object(
      movielens, 'read_movielens', side_effect=AssertionError
    ):
      self.assert_same(first, data.load_dataset(config))
      self.assert_same(first, data.load_dataset(self.config('ml-20m', copy)))
    self.assertLen(self.encoded(), 1)

  def assert_edit_refused(self, module, name):
    """An edit of the source right after `module.name` returns is refused,
    and nothing is cached."""
    real = getattr(module, name)

    def editing(*args, **kwargs):
      out = real(*args, **kwargs)
      with open(self.path, 'a') as f:
        f.write('999,1,5,0\n')
      return out

    with mock.patch.object(module, name, editing):
      with self.assertRaisesRegex(
        data.DataError, 'changed during preprocessing'
      ):
        data.load_dataset(self.config('ml-20m', self.path))
    self.assertEqual(self.encoded(), [])

  def test_a_source_changed_during_preprocessing_is_an_error(self):
    self.assert_edit_refused(movielens, 'read_movielens')

  def test_a_source_changed_after_its_hashing_is_an_error(self):
    # Between the digest that names the cache and the first read of pass 1:
    # its rows must not be cached under the old content's key.
    self.assert_edit_refused(data, 'cache_spec')

  @parameterized.parameters('append', 'cut', 'delete')
  def test_a_text_source_changed_during_pass_2_is_named(self, edit):
    # Pass 2 then reads other lines than pass 1 counted: a row too many, a
    # line cut short (a malformed line, were it not for the change), or no
    # file. The error is the change, with what to do, not its symptom.
    path = os.path.join(self.tmp, 'train.txt')
    write_lines(path, criteo_rows(600), '\t')
    size = os.path.getsize(path)
    real, calls = streaming.chunks, []

    def editing(*args, **kwargs):
      calls.append(args)
      for i, chunk in enumerate(real(*args, **kwargs)):
        yield chunk
        if len(calls) == 2 and i == 0:  # Pass 2's first chunk is read.
          if edit == 'delete':
            os.remove(path)
            continue
          with open(path, 'r+' if edit == 'cut' else 'a') as f:
            if edit == 'cut':
              f.truncate(size // 2 + 7)
            else:
              f.writelines('\t'.join(r) + '\n' for r in criteo_rows(5, 1))

    config = self.config('criteo', path, parse_workers=0)
    with mock.patch.object(streaming, 'chunks', editing):
      with self.assertRaises(data.DataError) as cm:
        data.load_dataset(config)
    self.assertEqual(
      str(cm.exception), f'{path} changed during preprocessing; run again.'
    )
    self.assertEqual(self.encoded(), [])


class ReadErrorTest(IntegrityTestCase):
  """Files that cannot be read: one DataError naming the file, a remedy."""

  def assert_names(self, config, path, message):
    with self.assertRaises(data.DataError) as cm:
      data.load_dataset(config)
    text = str(cm.exception)
    self.assertIn(path, text)
    self.assertRegex(text, message)
    self.assertNotIn('\n', text)
    return cm.exception

  def criteo_gz(self):
    text = ''.join('\t'.join(r) + '\n' for r in criteo_rows(300))
    path = os.path.join(self.tmp, 'train.txt.gz')
    with gzip.open(path, 'wt') as f:
      f.write(text)
    return path

  def test_truncated_gz(self):
    path = self.criteo_gz()
    _truncate(path)
    self.assert_names(self.config('criteo', path), path, 'truncated or corrupt')
    ratings = os.path.join(self.tmp, 'ml', 'ratings.csv.gz')
    os.makedirs(os.path.dirname(ratings))
    with gzip.open(ratings, 'wt') as f:
      f.write(_ratings(2000))
    _truncate(ratings)
    self.assert_names(self.config('ml-20m', ratings), ratings, 'truncated')

  def test_corrupt_gz(self):
    path = self.criteo_gz()
    with open(path, 'r+b') as f:  # A bit of the CRC-32 in the trailer.
      f.seek(-8, os.SEEK_END)
      crc = f.read(1)
      f.seek(-8, os.SEEK_END)
      f.write(bytes([crc[0] ^ 1]))
    self.assert_names(self.config('criteo', path), path, 'truncated or corrupt')

  def test_plain_file_named_gz(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt.gz'), criteo_rows(50), '\t'
    )
    error = self.assert_names(
      self.config('criteo', path), path, 'not gzip data.*rename it without .gz'
    )
    self.assertIsInstance(error.__cause__, gzip.BadGzipFile)
    ratings = write_text(
      os.path.join(self.tmp, 'ml', 'ratings.csv.gz'), _ratings()
    )
    self.assert_names(self.config('ml-20m', ratings), ratings, 'not gzip')

  def test_directory_where_a_file_is_expected(self):
    ratings = os.path.join(self.tmp, 'ml', 'ratings.csv')
    os.makedirs(ratings)
    self.assert_names(
      self.config('ml-20m', os.path.dirname(ratings)), ratings, 'is a directory'
    )

  def test_unreadable_file(self):
    real = builtins.open

    def denying(file, *args, **kwargs):
      if file == self.path:
        raise PermissionError(errno.EACCES, 'Permission denied', file)
      return real(file, *args, **kwargs)

    with mock.patch.object(builtins, 'open', denying):
      self.assert_names(
        self.config('ml-20m', self.path), self.path, 'permission denied.*chmod'
      )
    # Denied later, when the encoding opens it (a criteo file).
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(50), '\t'
    )
    real_open = utils.open_binary

    def denying_binary(file):
      if file == path:
        raise PermissionError(errno.EACCES, 'Permission denied', file)
      return real_open(file)

    with mock.patch.object(utils, 'open_binary', denying_binary):
      self.assert_names(self.config('criteo', path), path, 'permission denied')

  def test_missing_paths(self):
    missing = os.path.join(self.tmp, 'nowhere', 'train.txt')
    self.assert_names(self.config('criteo', missing), missing, 'does not exist')
    self.assert_names(self.config('ml-20m', missing), missing, 'does not exist')
    config = self.config(
      'criteo', self.path, valid_path=missing, test_path=self.path
    )
    self.assert_names(config, missing, 'valid_path')
    pipe = os.path.join(self.tmp, 'pipe')  # As `<(zcat train.txt.gz)`.
    os.mkfifo(pipe)
    self.assert_names(self.config('criteo', pipe), pipe, 'not a regular file')

  def test_cache_dir_that_cannot_be_written(self):
    config = self.config('ml-20m', self.path)
    config.cache_dir = write_text(os.path.join(self.tmp, 'a_file'), '')
    self.assert_names(
      config, config.cache_dir, 'Could not write the dataset cache.*cache_dir'
    )

  def test_cache_dir_that_cannot_be_written_fails_before_pass_1(self):
    # Found by the write after pass 1, it cost the minutes of pass 1 over a
    # big file first (a 3M-line Criteo file: 27 s, then the error).
    path = os.path.join(self.tmp, 'train.txt')
    write_lines(path, criteo_rows(300), '\t')
    config = self.config('criteo', path)
    blocked = write_text(os.path.join(self.tmp, 'a_file'), '')
    config.cache_dir = os.path.join(blocked, 'cache')
    with mock.patch.object(
      encode, 'encode', side_effect=AssertionError('pass 1 ran')
    ):
      self.assert_names(
        config,
        config.cache_dir,
        r'^Could not write the dataset cache [^ ]*: Not a directory'
        r' \(ENOTDIR, .*\)\. Free some space or set config\.dataset\.cache_dir'
        r' to a writable directory\.$',
      )


class FailedWriteTest(IntegrityTestCase):
  """A failure while writing a cache leaves every other cache as it was."""

  @parameterized.named_parameters(
    ('exception', RuntimeError('injected'), RuntimeError, 'injected'),
    (
      'disk_full',
      OSError(errno.ENOSPC, 'No space left on device'),
      data.DataError,
      'No space left',
    ),
  )
  def test_failure_mid_write_keeps_the_previous_cache(
    self, error, raised, message
  ):
    config = self.config('ml-20m', self.path)
    old = data.load_dataset(config)
    expected = _arrays(old)
    del old
    root = os.path.join(self.tmp, 'cache')
    files = _tree(root)
    real = cache.NpyWriter.write
    calls = []

    def failing(writer, rows):
      calls.append(1)
      if len(calls) == 3:  # After the training rows, mid-way.
        raise error
      return real(writer, rows)

    config.seed = 1  # Another cache, beside the old one.
    with mock.patch.object(cache.NpyWriter, 'write', failing):
      with self.assertRaisesRegex(raised, message):
        data.load_dataset(config)
    self.assertLen(calls, 3)
    self.assertEqual(_tree(root), files)  # Byte for byte; no temporaries.
    config.seed = 0
    with mock.patch.object(
      movielens, 'read_movielens', side_effect=AssertionError
    ):
      with self.assertNoLogs(level='WARNING'):
        for x, y in zip(
          _arrays(data.load_dataset(config)), expected, strict=True
        ):
          np.testing.assert_array_equal(x, y)

  def test_failed_rebuild_of_a_damaged_cache_is_retried(self):
    config = self.config('ml-20m', self.path)
    expected = _arrays(data.load_dataset(config))
    _truncate(self.cache_path('train_ids.npy'))
    with mock.patch.object(
      cache.NpyWriter, 'close', side_effect=RuntimeError('x')
    ):
      with self.assertLogs(level='WARNING'), self.assertRaises(RuntimeError):
        data.load_dataset(config)
    with self.assertLogs(level='WARNING'):
      again = data.load_dataset(config)
    for x, y in zip(_arrays(again), expected, strict=True):
      np.testing.assert_array_equal(x, y)
    self.assertLen(self.encoded(), 1)  # The damaged one went.

  def test_a_failed_rename_is_an_error_unless_another_run_published(self):
    config = self.config('ml-20m', self.path)
    other = os.path.join(self.tmp, 'other')  # Its own cache: the reference.
    expected = _arrays(
      data.load_dataset(self.config('ml-20m', self.path, cache_dir=other))
    )
    rename = os.rename

    def failing(src, dst, error):
      if not os.path.basename(src).startswith('.tmp-'):
        return rename(src, dst)
      if error.errno == errno.ENOTEMPTY:  # Another run published it first.
        shutil.copytree(src, dst)
      raise error

    error = OSError(errno.EIO, 'Input/output error')
    with mock.patch.object(os, 'rename', lambda a, b: failing(a, b, error)):
      with self.assertRaisesRegex(
        data.DataError, 'Could not write the dataset cache .* Input/output'
      ):
        data.load_dataset(config)
    self.assertEqual(self.encoded(), [])  # Nothing published, nothing left.
    error = OSError(errno.ENOTEMPTY, 'Directory not empty')
    with mock.patch.object(os, 'rename', lambda a, b: failing(a, b, error)):
      data.load_dataset(config)
    self.assertLen(self.encoded(), 1)
    with mock.patch.object(
      movielens, 'read_movielens', side_effect=AssertionError
    ):  # Its cache is served from then on.
      served = _arrays(data.load_dataset(config))
    for x, y in zip(served, expected, strict=True):
      np.testing.assert_array_equal(x, y)

  def test_a_file_size_limit_is_named_not_the_free_space(self):
    # `ulimit -f`, or FAT32's 4 GiB: a write fails with EFBIG, which no
    # space freed cures. A process limited to 64 KiB files writes a cache of
    # a 250 KiB train_ids.npy (Python ignores SIGXFSZ: writes fail).
    path = os.path.join(self.tmp, 'train.txt')
    write_lines(path, criteo_rows(2000), '\t')
    config = self.config('criteo', path)
    child = (
      'import resource, sys, data\n'
      'from configs import default\n'
      'config = default.get_config().dataset\n'
      'config.name, config.path, config.cache_dir = sys.argv[1:]\n'
      'resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n'
      'try:\n'
      '  data.load_dataset(config)\n'
      'except data.DataError as e:\n'
      '  print(e)\n'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    said = subprocess.run(
      [sys.executable, '-c', child, 'criteo', path, config.cache_dir],
      cwd=root,
      env=dict(os.environ, PYTHONPATH=root),
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
    ).stdout
    self.assertRegex(
      said,
      rf'^Could not write the dataset cache {config.cache_dir}/encoded/'
      r'criteo-[0-9a-f]+: File too large \(EFBIG\); a file outgrew the size'
      r' limit of one file'
      r' \(`ulimit -f`, [^\n]* set config\.dataset\.cache_dir to a'
      r' writable directory\.\n$',
    )
    self.assertEqual(self.encoded(), [])  # No temporary left.
    dataset = data.load_dataset(config)  # Without the limit.
    self.assertEqual(len(dataset.train) + len(dataset.valid), 1800)

  def test_a_run_killed_as_it_publishes_leaves_what_the_next_removes(self):
    # Killed (no clean-up) at the rename that publishes its cache: the
    # temporary directory must still name its owner, or no later run
    # removes it (as big as the cache).
    path = os.path.join(self.tmp, 'train.txt')
    write_lines(path, criteo_rows(300), '\t')
    config = self.config('criteo', path)
    child = (
      'import os, sys, data\n'
      'from configs import default\n'
      'config = default.get_config().dataset\n'
      'config.name, config.path, config.cache_dir = sys.argv[1:]\n'
      'rename = os.rename\n'
      'def killed(src, dst):\n'
      "  if os.path.basename(src).startswith('.tmp-'):\n"
      '    os._exit(9)\n'
      '  rename(src, dst)\n'
      'os.rename = killed\n'
      'data.load_dataset(config)\n'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = subprocess.run(
      [sys.executable, '-c', child, 'criteo', path, config.cache_dir],
      cwd=root,
      env=dict(os.environ, PYTHONPATH=root),
      capture_output=True,
      timeout=300,
      check=False,
    ).returncode
    self.assertEqual(code, 9)
    [left] = self.encoded()
    self.assertTrue(left.startswith('.tmp-criteo-'), left)
    data.load_dataset(config)
    [built] = self.encoded()
    self.assertTrue(built.startswith('criteo-'), built)
    self.assertNotIn('owner.json', os.listdir(self.cache_path()))


class DurabilityTest(IntegrityTestCase):
  def test_every_file_is_synced_before_the_cache_is_renamed_into_place(self):
    # Else a crash after the rename could leave a published cache of empty
    # or partial files (found by the checksums, but rebuilt at length).
    synced, unsynced = set(), []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd):
      synced.add(os.fstat(fd).st_ino)
      return fsync(fd)

    def recording_rename(src, dst):
      if os.path.basename(src).startswith('.tmp-'):
        names = sorted(set(os.listdir(src)) - {'owner.json'})  # No data:
        paths = [os.path.join(src, n) for n in names]  # gone once published.
        missing = [p for p in paths if os.stat(p).st_ino not in synced]
        unsynced.append([os.path.basename(p) for p in missing])
      return rename(src, dst)

    with (
      mock.patch.object(os, 'fsync', recording_fsync),
      mock.patch.object(os, 'rename', recording_rename),
    ):
      data.load_dataset(self.config('ml-20m', self.path))
    self.assertEqual(unsynced, [[]])  # One cache published, all of it synced.


class PermissionsTest(IntegrityTestCase):
  """Cache directories follow the umask: a shared cache_dir serves all."""

  @parameterized.parameters((0o022, 0o755, 0o644), (0o027, 0o750, 0o640))
  def test_modes_follow_the_umask(self, umask, dir_mode, file_mode):
    old = os.umask(umask)
    self.addCleanup(os.umask, old)
    data.load_dataset(self.config('ml-20m', self.path))
    root = os.path.join(self.tmp, 'cache')
    checked = 0
    for directory, _, files in os.walk(root):
      self.assertEqual(
        stat.S_IMODE(os.stat(directory).st_mode), dir_mode, directory
      )
      for name in files:
        path = os.path.join(directory, name)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), file_mode, path)
        checked += 1
    self.assertEqual(checked, 8)  # 6 arrays, vocab.npy and meta.json.
    made = core.make_temp_dir(self.tmp, '.x-')
    self.assertEqual(stat.S_IMODE(os.stat(made).st_mode), dir_mode)


class NoOneHotFieldTest(IntegrityTestCase):
  """A dataset needs a one-hot field; zero-width rows still checksum."""

  def test_only_float_and_multi_hot_columns_are_refused_before_pass_2(self):
    # field_dims=() used to write the cache, then fail reading it with a
    # ZeroDivisionError (cache._pieces), and every model at init.
    rows = [
      [str(i % 2), str(i / 7), 'a|b' if i % 3 else 'c'] for i in range(60)
    ]
    path = write_lines(
      os.path.join(self.tmp, 'x.csv'), rows, ',', ['y', 'price', 'tags']
    )
    csv = dict(label_column='y', float_columns=('price',))
    csv.update(multi_hot_columns=('tags',))
    with self.assertRaisesRegex(
      data.DataError,
      r'^config\.dataset \(csv\): at least one categorical \(one-hot\)'
      r' field is needed .* config\.dataset\.csv\.categorical_columns',
    ):
      data.load_dataset(self.config('csv', path, csv=csv))
    self.assertEqual(self.encoded(), [])  # Nothing written.

  def test_pieces_of_zero_width_rows(self):
    path = os.path.join(self.tmp, 'ids.npy')
    writer = cache.NpyWriter(path, np.int32, (5, 0))
    writer.write(np.zeros((5, 0), np.int32))
    record = writer.close()
    size = os.path.getsize(path)  # The header alone.
    self.assertEqual(cache._pieces(size, size, 0), [(0, size)])
    digest, _ = cache._scan(path, cache._pieces(size, size, 0))
    self.assertEqual(record, {'bytes': size, 'sha256': digest})


class CacheFilesTest(absltest.TestCase):
  """The cache's writer, publisher and sweeper, called directly."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def test_a_writer_given_fewer_or_more_rows_than_counted_refuses(self):
    # A source that yields fewer rows in pass 2 than in pass 1 would leave
    # a header promising rows that are not there.
    writer = cache.NpyWriter(os.path.join(self.tmp, 'a.npy'), np.int32, (5, 2))
    writer.write(np.zeros((3, 2), np.int32))
    with self.assertRaisesRegex(
      core.DataError, r'a\.npy: 3 rows written, 5 counted in pass 1'
    ):
      writer.close()
    writer = cache.NpyWriter(os.path.join(self.tmp, 'b.npy'), np.int32, (2,))
    with self.assertRaisesRegex(
      core.DataError, r'b\.npy: more rows than counted in pass 1'
    ):
      writer.write(np.zeros(3, np.int32))

  def test_stale_sweep_removes_dead_and_damaged_leaves_the_rest(self):
    def make(name, owner=None):
      os.makedirs(os.path.join(self.tmp, name, 'x'))
      if owner is not None:
        with open(os.path.join(self.tmp, name, 'owner.json'), 'w') as f:
          f.write(owner)

    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    host = socket.gethostname()
    make('.damaged-ml-20m-abc')  # Left by a run killed while replacing.
    make('.tmp-a-dead', json.dumps({'host': host, 'pid': dead.pid}))
    make('.tmp-a-alive', json.dumps({'host': host, 'pid': os.getpid()}))
    make('.tmp-a-writing', '{"host": ')  # Its owner mid-way through writing.
    make('.tmp-a-foreign', json.dumps({'host': host + 'x', 'pid': dead.pid}))
    make('ml-20m-0123')  # A published cache.
    housekeeping.remove_stale(self.tmp)
    self.assertEqual(
      sorted(os.listdir(self.tmp)),
      ['.tmp-a-alive', '.tmp-a-foreign', '.tmp-a-writing', 'ml-20m-0123'],
    )

  def test_replacing_a_cache_another_run_moved_away_publishes(self):
    # Two runs each found the cache damaged; the other moved it aside first.
    tmp = core.make_temp_dir(self.tmp, '.tmp-a-')
    write_text(os.path.join(tmp, 'meta.json'), '{}')
    directory = os.path.join(self.tmp, 'a-0123')
    cache._publish(tmp, directory, replace=True)
    self.assertEqual(os.listdir(self.tmp), ['a-0123'])
    self.assertEqual(os.listdir(directory), ['meta.json'])

  def test_a_damaged_cache_is_replaced_though_a_sweep_takes_its_aside(self):
    # Another run's remove_stale may delete the empty `.damaged-` directory
    # between its creation and the rename into it: the damaged cache stayed
    # in place, and the fresh one was dropped as if another run had won.
    directory = os.path.join(self.tmp, 'a-0123')
    write_text(os.path.join(directory, 'meta.json'), 'damaged')
    tmp = core.make_temp_dir(self.tmp, '.tmp-a-')
    write_text(os.path.join(tmp, 'meta.json'), 'fresh')
    rename, swept = os.rename, []

    def sweeping(src, dst):
      if not swept and '.damaged-' in dst:
        swept.append(dst)
        housekeeping.remove_stale(self.tmp)
      return rename(src, dst)

    with mock.patch.object(os, 'rename', sweeping):
      cache._publish(tmp, directory, replace=True)
    self.assertLen(swept, 1)
    self.assertEqual(os.listdir(self.tmp), ['a-0123'])
    with open(os.path.join(directory, 'meta.json')) as f:
      self.assertEqual(f.read(), 'fresh')


if __name__ == '__main__':
  absltest.main()
