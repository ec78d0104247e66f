"""Caches that changed sources leave behind are named, with their size."""

import json
import logging
import os
import shlex

from absl.testing import absltest
from dataset_testing import DatasetTestCase
from dataset_testing import write_text

import data
from datasets import cache

HEADER = 'userId,movieId,rating,timestamp\n'


def _ratings(start, stop):
  return ''.join(f'{u},{u % 7},{u % 5 + 1},0\n' for u in range(start, stop))


def _bytes(directory):
  """Brute force: the sizes of the files in `directory`, added up."""
  return sum(
    os.path.getsize(os.path.join(directory, name))
    for name in os.listdir(directory)
  )


class _Warnings(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


class SupersededCacheTest(DatasetTestCase):
  def setUp(self):
    super().setUp()
    self.path = write_text(
      os.path.join(self.tmp, 'src', 'ratings.csv'), HEADER + _ratings(0, 200)
    )
    self.root = os.path.join(self.tmp, 'cache', 'encoded')

  def load(self, **overrides):
    """Loads ml-20m from `self.path`; the warnings naming older caches."""
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    try:
      data.load_dataset(self.config('ml-20m', self.path, **overrides))
    finally:
      logging.getLogger().removeHandler(handler)
    return [line for line in handler.lines if 'Older caches' in line]

  def append(self, start, stop):
    with open(self.path, 'a') as f:
      f.write(_ratings(start, stop))

  def expected(self, *names):
    """The cache directories `names`, their sizes, and the rm command."""
    paths = [os.path.join(self.root, n) for n in names]
    sizes = [_bytes(p) for p in paths]
    total = sum(sizes)
    listed = ', '.join(
      f'{p} ({n / 1e3:.1f} kB)' for p, n in zip(paths, sizes, strict=True)
    )
    return listed, f'to free {total / 1e3:.1f} kB: rm -r {shlex.join(paths)}'

  def test_a_changed_source_names_the_caches_it_left_behind(self):
    self.assertEqual(self.load(), [])  # The first cache: nothing older.
    [first] = self.encoded()
    # Not superseded: the same file with other options, another file.
    self.assertEqual(self.load(min_count=2), [])
    other = write_text(
      os.path.join(self.tmp, 'src', 'other.csv'), HEADER + _ratings(0, 90)
    )
    data.load_dataset(self.config('ml-20m', other))
    self.assertEqual(self.load(), [])  # Served from its cache: no build.
    unrelated = set(self.encoded()) - {first}
    self.assertLen(unrelated, 2)

    self.append(200, 260)  # As a log file grows.
    [line] = self.load()
    [second] = set(self.encoded()) - unrelated - {first}
    listed, command = self.expected(first)
    self.assertIn(
      f'same files ({os.path.realpath(self.path)}) and options', line
    )
    self.assertIn(f'no longer hold: {listed}. Only a config', line)
    self.assertTrue(line.endswith(command), line)
    self.assertNotIn('\n', line)
    for name in unrelated | {second}:
      self.assertNotIn(name, line)

    self.append(260, 300)  # Changed again: both older caches are named.
    [line] = self.load()
    listed, command = self.expected(*sorted([first, second]))
    self.assertIn(f'no longer hold: {listed}. Only a config', line)
    self.assertTrue(line.endswith(command), line)
    # Nothing was deleted: the file put back is served from its cache.
    with open(self.path, 'w') as f:
      f.write(HEADER + _ratings(0, 260))
    count = len(self.encoded())
    self.assertEqual(self.load(), [])
    self.assertLen(self.encoded(), count)

  def test_caches_without_recorded_paths_or_readable_meta_are_skipped(self):
    self.load()
    [first] = self.encoded()
    meta_path = os.path.join(self.root, first, 'meta.json')
    with open(meta_path) as f:
      meta = json.load(f)
    del meta['source_paths']  # As a cache written before they were.
    meta['meta_sha256'] = cache.meta_digest(meta)
    with open(meta_path, 'w') as f:
      json.dump(meta, f)
    os.makedirs(os.path.join(self.root, 'ml-20m-0123'))  # No meta.json.
    self.append(200, 230)
    self.assertEqual(self.load(), [])


if __name__ == '__main__':
  absltest.main()
