"""step_files.py on a small directory of plain files, without orbax.

The record is checked against hashlib, each kind of damage against its
message, and `copy_step` against the fsyncs it must make: every file and
directory of the copy before the rename, and the parent after it.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest

import step_files

FILES = {'a': b'abc', 'sub/b': b'0123456789', 'sub/deeper/c': b''}


def _write(directory, name, content):
  path = os.path.join(directory, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content)


@contextlib.contextmanager
def _fsyncs():
  """Yields the list of the paths that `os.fsync` flushes within."""
  synced, fsync = [], os.fsync

  def recording(fd):
    synced.append(os.readlink(f'/proc/self/fd/{fd}'))
    fsync(fd)

  with mock.patch.object(os, 'fsync', recording):
    yield synced


class StepFilesTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    self.step = os.path.join(self.tmp, 'latest', '3')
    for name, content in FILES.items():
      _write(self.step, name, content)

  def test_the_record_is_each_files_size_and_sha256(self):
    # A copy of the record left by a killed writer is not recorded.
    _write(self.step, step_files.CHECKSUMS + '.tmp-1', b'{')
    step_files.write_checksums(self.step)
    with open(os.path.join(self.step, step_files.CHECKSUMS)) as f:
      recorded = json.load(f)
    self.assertEqual(
      recorded,
      {
        'files': {
          name: [len(content), hashlib.sha256(content).hexdigest()]
          for name, content in FILES.items()
        }
      },
    )
    self.assertIsNone(step_files.damage(self.step))

  def test_damage_says_what_is_wrong(self):
    record = os.path.join(self.step, step_files.CHECKSUMS)
    self.assertIsNone(step_files.damage(self.step))  # Nothing to check.
    step_files.write_checksums(self.step)
    cases = (
      ('a', None, 'a is missing'),  # The first listed.
      ('a', b'abcd', 'a has 4 bytes, not 3'),
      ('a', b'abd', 'the content of a changed (SHA-256 mismatch)'),
      ('sub/b', None, 'sub/b is missing'),
    )
    for name, content, message in cases:
      with self.subTest(message):
        path = os.path.join(self.step, name)
        os.remove(path)
        if content is not None:
          _write(self.step, name, content)
        self.assertEqual(step_files.damage(self.step), message)
        _write(self.step, name, FILES[name])
        self.assertIsNone(step_files.damage(self.step))
    for text in ('{"file": {}}', '[1]', '{"files"'):  # Key, type, value.
      with self.subTest(text):
        with open(record, 'w') as f:
          f.write(text)
        self.assertStartsWith(
          step_files.damage(self.step), 'checksums.json is unreadable ('
        )
    self.assertEqual(
      step_files.damage(os.path.join(self.tmp, 'latest', '4')),
      'it does not exist',
    )

  def test_copy_step_syncs_the_copy_before_and_its_parent_after_the_rename(
    self,
  ):
    step_files.write_checksums(self.step)
    target = os.path.join(self.tmp, 'best', '3')
    os.makedirs(os.path.dirname(target))
    saving = target + step_files.SAVING
    _write(saving, 'left', b'by a killed copy')  # Replaced, not kept.
    with _fsyncs() as synced:
      step_files.copy_step(self.step, target)
    names = [*FILES, step_files.CHECKSUMS]
    self.assertCountEqual(
      synced,
      [os.path.join(saving, name) for name in names]
      + [saving, f'{saving}/sub', f'{saving}/sub/deeper']
      + [os.path.dirname(target)],
    )
    self.assertEqual(synced[-1], os.path.dirname(target))  # After it.
    self.assertFalse(os.path.exists(saving))
    self.assertEqual(
      step_files.checksums(target), step_files.checksums(self.step)
    )
    self.assertIsNone(step_files.damage(target))

  def test_a_directory_that_cannot_be_listed_stops_the_copy(self):
    # Its OSError, as a refused write's: not a copy found damaged later.
    step_files.write_checksums(self.step)
    target = os.path.join(self.tmp, 'best', '3')
    os.makedirs(os.path.dirname(target))
    refused, scandir = os.path.join(self.step, 'sub'), os.scandir

    def listing(path):
      if path == refused:
        raise PermissionError(13, 'Permission denied', path)
      return scandir(path)

    with mock.patch.object(os, 'scandir', listing):
      with self.assertRaisesRegex(PermissionError, 'denied: .*sub'):
        step_files.copy_step(self.step, target)
    self.assertEqual(os.listdir(os.path.dirname(target)), [])

  def test_write_checksums_syncs_the_record_before_it_is_renamed(self):
    with _fsyncs() as synced:
      step_files.write_checksums(self.step)
    record = os.path.join(self.step, step_files.CHECKSUMS)
    self.assertEqual(synced, [f'{record}.tmp-{os.getpid()}'])
    self.assertTrue(os.path.exists(record))


if __name__ == '__main__':
  absltest.main()
