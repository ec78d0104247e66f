"""The memo of source digests (datasets/digests.py): reused only when safe.

The tests lower `digests.MIN_BYTES` to 0 so that small files use the memo,
and move the memo's clock a minute ahead where an entry must not be racy
(a file written by the test is seconds old, which the memo rightly
distrusts).
"""

import json
import os
import socket
import subprocess
import sys
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import DatasetTestCase
import numpy as np

import data
from datasets import cache
from datasets import digests


def _ahead():
  """Patches the memo's clock a minute ahead: files look old enough."""
  return mock.patch.object(digests, '_now', lambda: time.time() + 60)


def _restamp(path, atime_ns, mtime_ns, ctime_ns):
  """Sets the times of `path` back, until its ctime differs from `ctime_ns`.

  `os.utime` itself sets the ctime to now, from a clock of a few
  milliseconds' resolution: repeated until that clock has moved.
  """
  while True:
    os.utime(path, ns=(atime_ns, mtime_ns))
    if os.stat(path).st_ctime_ns != ctime_ns:
      return
    time.sleep(0.005)


class DigestMemoTest(DatasetTestCase):
  def setUp(self):
    super().setUp()
    self.enter_context(mock.patch.object(digests, 'MIN_BYTES', 0))
    self.memo = os.path.join(self.tmp, 'cache', 'digests')
    self.path = os.path.join(self.tmp, 'train.txt')
    with open(self.path, 'wb') as f:
      f.write(b'0\t1\t2\n' * 1000)
    self.scan = self.enter_context(
      mock.patch.object(cache, '_scan', wraps=cache._scan)
    )

  def fingerprint(self):
    return digests.fingerprint(self.path, self.memo)

  def test_an_unchanged_file_is_not_read_again(self):
    with _ahead():
      first = self.fingerprint()
      with self.assertLogs(level='INFO') as logs:
        second = self.fingerprint()
    self.assertEqual(self.scan.call_count, 1)
    self.assertEqual(first, second)
    self.scan.reset_mock()
    self.assertEqual(cache.fingerprint(self.path), first)
    self.assertRegex(
      '\n'.join(logs.output),
      rf'Source {self.path} unchanged since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d'
      r' \(size, times, inode\): hash reused',
    )

  def test_a_same_size_edit_with_the_mtime_restored_is_noticed(self):
    with _ahead():
      first = self.fingerprint()
      before = os.stat(self.path)
      with open(self.path, 'r+b') as f:
        f.seek(2)
        f.write(b'7')
      _restamp(
        self.path, before.st_atime_ns, before.st_mtime_ns, before.st_ctime_ns
      )
      after = os.stat(self.path)
      self.assertEqual(after.st_size, before.st_size)
      self.assertEqual(after.st_mtime_ns, before.st_mtime_ns)
      self.assertEqual(after.st_ino, before.st_ino)
      second = self.fingerprint()
    self.assertEqual(self.scan.call_count, 2)
    self.assertNotEqual(second, first)
    self.assertEqual(second, cache.fingerprint(self.path))

  def test_a_replaced_file_is_noticed(self):
    with _ahead():
      first = self.fingerprint()
      before = os.stat(self.path)
      other = self.path + '.new'
      with open(other, 'wb') as f:
        f.write(b'1\t1\t2\n' * 1000)
      os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
      os.replace(other, self.path)
      self.assertNotEqual(os.stat(self.path).st_ino, before.st_ino)
      second = self.fingerprint()
    self.assertEqual(self.scan.call_count, 2)
    self.assertNotEqual(second, first)
    self.assertEqual(second, cache.fingerprint(self.path))

  @parameterized.parameters(0, 1, 2, 3, 4)  # dev, inode, size, mtime, ctime.
  def test_an_entry_that_differs_in_one_of_the_five_is_not_reused(self, i):
    identity = digests.identity(os.stat(self.path))
    identity[i] += 1
    self.write_entry(identity, time.time() + 30)
    self.assert_entry_not_reused()

  def test_a_file_written_just_before_hashing_is_not_recorded(self):
    first = self.fingerprint()  # The real clock: the file is seconds old.
    self.assertFalse(os.path.exists(self.memo))
    self.assertEqual(self.fingerprint(), first)
    self.assertEqual(self.scan.call_count, 2)

  def assert_entry_not_reused(self):
    """The file is hashed again, to its real digest (not the entry's)."""
    with _ahead():
      self.assertEqual(self.fingerprint(), cache.fingerprint(self.path))
    self.assertEqual(self.scan.call_count, 2)  # Ours and the check's.

  def write_entry(self, identity, hashed_at, **overrides):
    """A memo entry of the file that says its digest is all zeros."""
    real = os.path.realpath(self.path)
    os.makedirs(self.memo, exist_ok=True)
    entry = {
      'path': real,
      'scheme': digests.SCHEME,
      'identity': identity,
      'sha256': '0' * 64,
      'hashed_at': hashed_at,
      **overrides,
    }
    with open(digests.memo_path(self.memo, real), 'w') as f:
      json.dump(entry, f)

  def test_a_racy_entry_is_not_reused(self):
    stat = os.stat(self.path)
    # Hashed within RACY_SECONDS of the file's last change.
    self.write_entry(digests.identity(stat), stat.st_ctime_ns / 1e9 + 1)
    self.assert_entry_not_reused()

  def test_a_recent_ctime_is_racy_even_with_an_old_mtime(self):
    # An edit restamped with an old mtime (`touch -d`) has a ctime of now.
    old = time.time_ns() - 3600 * 10**9
    os.utime(self.path, ns=(old, old))
    stat = os.stat(self.path)
    self.write_entry(digests.identity(stat), stat.st_ctime_ns / 1e9 + 1)
    self.assert_entry_not_reused()

  def test_an_entry_hashed_in_the_future_is_not_reused(self):
    # Its time is from a clock that was ahead: no file would look racy.
    self.write_entry(digests.identity(os.stat(self.path)), time.time() + 3600)
    self.assert_entry_not_reused()

  def test_an_entry_as_written_is_reused(self):  # What the others vary.
    st = os.stat(self.path)
    identity = digests.identity(st)
    self.assertEqual(
      identity,
      [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns],
    )
    self.write_entry(identity, time.time() + 30)
    with _ahead():
      self.assertEqual(self.fingerprint()['sha256'], '0' * 64)
    self.assertEqual(self.scan.call_count, 0)

  @parameterized.parameters(
    dict(path='/elsewhere/train.txt'),  # A memo copied from another file.
    dict(scheme='sha256-of-1024-byte-pieces'),  # Another PIECE_BYTES.
    dict(sha256=0),
  )
  def test_an_entry_of_another_file_scheme_or_type_is_not_reused(self, **kw):
    identity = digests.identity(os.stat(self.path))
    self.write_entry(identity, time.time() + 30, **kw)
    self.assert_entry_not_reused()

  def test_temporaries_of_dead_runs_are_removed_on_save(self):
    os.makedirs(self.memo)
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    host = socket.gethostname()
    names = [f'.tmp-{pid}@{host}.abc' for pid in (dead.pid, os.getpid())]
    for name in names:
      with open(os.path.join(self.memo, name), 'w') as f:
        f.write('{')
    with _ahead():
      self.fingerprint()
    left = sorted(os.listdir(self.memo))
    self.assertLen(left, 2)  # The live run's and the memo.
    self.assertIn(names[1], left)
    self.assertNotIn(names[0], left)

  def test_a_change_while_hashing_is_not_recorded(self):
    fingerprint = cache.fingerprint

    def edited(path):
      result = fingerprint(path)
      with open(path, 'ab') as f:
        f.write(b'1\t1\t1\n')
      return result

    with _ahead(), mock.patch.object(cache, 'fingerprint', edited):
      self.fingerprint()
    self.assertEqual(
      os.listdir(self.memo) if os.path.isdir(self.memo) else [], []
    )

  @parameterized.parameters(
    b'{"path": \xff',
    b'',
    b'[]',
    b'{"path": 1}',
  )
  def test_a_corrupt_memo_is_ignored_and_rewritten(self, text):
    with _ahead():
      first = self.fingerprint()
      [name] = os.listdir(self.memo)
      with open(os.path.join(self.memo, name), 'wb') as f:
        f.write(text)
      self.assertEqual(self.fingerprint(), first)
      self.assertEqual(self.scan.call_count, 2)
      self.assertEqual(os.listdir(self.memo), [name])  # No temporary left.
      self.assertEqual(self.fingerprint(), first)
    self.assertEqual(self.scan.call_count, 2)  # Rewritten, then reused.

  def test_a_memo_that_cannot_be_written_is_no_error(self):
    with open(os.path.join(self.tmp, 'file'), 'w'):
      pass
    self.memo = os.path.join(self.tmp, 'file', 'digests')  # Under a file.
    with _ahead():
      self.assertEqual(self.fingerprint(), cache.fingerprint(self.path))

  def test_a_memo_that_cannot_be_replaced_leaves_no_temporary(self):
    real = os.path.realpath(self.path)
    os.makedirs(digests.memo_path(self.memo, real))  # A directory: refused.
    with _ahead():
      self.assertEqual(self.fingerprint(), cache.fingerprint(self.path))
    self.assertEqual(
      os.listdir(self.memo), [os.path.basename(digests.memo_path('', real))]
    )

  def test_small_files_are_hashed_every_time(self):
    with _ahead(), mock.patch.object(digests, 'MIN_BYTES', 1 << 20):
      first = self.fingerprint()
      self.assertEqual(self.fingerprint(), first)
    self.assertEqual(self.scan.call_count, 2)
    self.assertFalse(os.path.exists(self.memo))


class LoadDatasetMemoTest(DatasetTestCase):
  def test_the_memo_serves_a_second_load_dataset(self):
    from benchmarks import synthetic

    path = synthetic.write('criteo', 300, os.path.join(self.tmp, 'train.txt'))
    config = self.config('criteo', path, split=(0.8, 0.1, 0.1))
    with (
      mock.patch.object(digests, 'MIN_BYTES', 0),
      _ahead(),
      mock.patch.object(cache, '_scan', wraps=cache._scan) as scan,
    ):
      first = data.load_dataset(config)
      reads = [c for c in scan.call_args_list if c.args[0] == path]
      self.assertLen(reads, 1)
      scan.reset_mock()
      with self.assertLogs(level='INFO') as logs:
        second = data.load_dataset(config)
      self.assertEqual(
        [c for c in scan.call_args_list if c.args[0] == path], []
      )
    self.assertIn('hash reused', '\n'.join(logs.output))
    self.assertLen(self.encoded(), 1)  # The same cache, found by the key.
    np.testing.assert_array_equal(first.train.ids, second.train.ids)
    self.assertTrue(os.listdir(os.path.join(self.tmp, 'cache', 'digests')))


if __name__ == '__main__':
  absltest.main()
