"""Tests of `config.dataset`: shared keys, one section of keys per format."""

import os
import re

from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import DatasetTestCase
from dataset_testing import avazu_rows
from dataset_testing import criteo_rows
from dataset_testing import write_lines
import ml_collections
import numpy as np

import config_check
from configs import default
import data

# A non-default value of every format key.
CHANGED = {
  'csv': dict(
    label_column='click',
    numeric_columns=('C1',),
    categorical_columns=('C14',),
    sep=';',
    log_bucket=False,
    float_columns=('C15',),
    multi_hot_columns=('C16',),
    multi_hot_sep=';',
    multi_hot_max_len=4,
  ),
  'criteo': dict(log_bucket=False, numeric='dense'),
  'avazu': dict(hour_features=False, drop_id=False),
  'libfm': dict(field_dims=(3, 4)),
}


def _validate(dataset):
  """`config_check.validate_config` of the default config with `dataset`."""
  config = default.get_config()
  config.dataset = dataset
  config_check.validate_config(config)


class DatasetConfigTest(DatasetTestCase):
  def test_default_config_has_one_section_per_format_with_its_defaults(self):
    config = default.get_config().dataset
    for fmt, source in data.SOURCES.items():
      if source.DEFAULTS:
        self.assertEqual(config[fmt].to_dict(), source.DEFAULTS)
      self.assertEqual(set(CHANGED.get(fmt, {})), set(source.DEFAULTS))
    shared = {k for k in config.keys() if k not in data.SOURCES}
    self.assertEqual(shared, set(data.SHARED_KEYS))
    self.assertEqual(
      set(data.FORMAT_OF),
      {'ml-latest-small', 'ml-100k', 'ml-1m', 'ml-20m', 'ml-25m'}
      | {'criteo', 'avazu', 'libfm', 'csv'},
    )

  @parameterized.parameters(
    (fmt, key, value, other)
    for fmt, keys in CHANGED.items()
    for key, value in keys.items()
    for other in ('criteo', 'csv', 'ml-latest-small')
    if other != fmt
  )
  def test_a_key_of_another_format_is_an_error_naming_it(
    self, fmt, key, value, other
  ):
    config = self.config(other, '', **{fmt: {key: value}})
    with self.assertRaisesRegex(
      data.DataError,
      rf'^config\.dataset\.{fmt}\.{key} is set but config\.dataset\.name is'
      rf" '{other}': remove it, or set config\.dataset\.name to"
      rf' {" or ".join(data.SOURCES[fmt].NAMES)}\.$',
    ):
      data.load_dataset(config)
    self.assertEqual(self.encoded(), [])

  def test_defaults_spelt_out_in_another_format_are_not_an_error(self):
    path = write_lines(
      os.path.join(self.tmp, 'train.txt'), criteo_rows(100), '\t'
    )
    config = self.config(
      'criteo', path, avazu=dict(drop_id=True), csv=dict(sep=',')
    )
    self.assertLen(data.load_dataset(config).field_names, 39)

  def test_unknown_and_old_flat_keys_are_errors_naming_the_new_place(self):
    config = self.config('criteo', '')
    with config.unlocked():
      config.hour_features = False
    with self.assertRaisesRegex(
      data.DataError,
      r'config\.dataset\.hour_features: unknown key \(it is'
      r' config\.dataset\.avazu\.hour_features now\)',
    ):
      data.load_dataset(config)
    config = self.config('criteo', '')
    config.criteo.log_bucket_typo = True
    with self.assertRaisesRegex(
      data.DataError, r'config\.dataset\.criteo\.log_bucket_typo: unknown'
    ):
      data.load_dataset(config)

  def test_the_selected_format_reads_its_own_section(self):
    rows = avazu_rows(200)
    path = write_lines(os.path.join(self.tmp, 'a.csv'), rows, ',')
    config = self.config('avazu', path, split=(1.0, 0, 0))
    names = data.load_dataset(config).field_names
    self.assertEqual(names[:3], ('hour_of_day', 'weekday', 'C1'))
    config.avazu.update(CHANGED['avazu'])
    names = data.load_dataset(config).field_names
    self.assertEqual(names[:3], ('id', 'hour', 'C1'))
    # A hand-made config without the section gets the format's defaults.
    bare = ml_collections.ConfigDict(
      {k: v for k, v in config.to_dict().items() if k not in data.SOURCES}
    )
    bare_dataset = data.load_dataset(bare)
    self.assertEqual(bare_dataset.field_names[:2], ('hour_of_day', 'weekday'))
    np.testing.assert_array_equal(
      bare_dataset.train.ids,
      data.load_dataset(
        self.config('avazu', path, split=(1.0, 0, 0))
      ).train.ids,
    )

  def test_min_count_default_is_the_formats(self):
    for name, min_count in (('criteo', 10), ('avazu', 4), ('csv', 1)):
      _, resolved, _ = data.resolve(self.config(name, ''))
      self.assertEqual(resolved.min_count, min_count)
    # Only -1 means the default: 0 (keep every value) is kept as set.
    for min_count in (2, 0):
      config = self.config('criteo', '', min_count=min_count)
      _, resolved, _ = data.resolve(config)
      self.assertEqual(resolved.min_count, min_count)

  def test_chunk_rows_must_be_positive_without_the_config_check(self):
    # load_dataset is called directly too (benchmarks, tools): its own check
    # is one line, where 0 would fail inside itertools.islice.
    for rows in (0, -5):
      with self.assertRaisesRegex(
        data.DataError, f'chunk_rows must be positive, got {rows}'
      ):
        data.resolve(self.config('criteo', '', chunk_rows=rows))

  def test_a_missing_path_gets_an_example_of_its_own_format(self):
    for name, example in (
      ('criteo', '/data/criteo/train.txt'),
      ('csv', '/data/clicks.csv'),
      ('avazu', '/data/avazu/train'),
    ):
      with self.assertRaisesRegex(
        data.DataError,
        f'^config.dataset.path: set it to the {name} file \\(e.g.'
        f' --config.dataset.path={re.escape(example)}\\)',
      ):
        data.load_dataset(self.config(name, ''))

  def test_movielens_refuses_validation_and_test_files(self):
    # They were ignored: the ratings were split at random all the same, and
    # split (1, 0, 0), allowed with such files, left validation empty.
    config = self.config(
      'ml-latest-small', '', valid_path='/v.csv', test_path='/t.csv'
    )
    config.split = (1.0, 0.0, 0.0)
    _validate(config)  # The config check lets them through.
    with self.assertRaisesRegex(
      data.DataError,
      '^config.dataset.valid_path and test_path: MovieLens is one ratings'
      ' file, split at random',
    ):
      data.load_dataset(config)
    self.assertEqual(self.encoded(), [])

  def test_csv_sep_is_one_character_and_a_typed_backslash_t_is_a_tab(self):
    rows = [[f'u{i % 5}', str(i % 2), f'c{i % 3}'] for i in range(60)]
    path = write_lines(os.path.join(self.tmp, 't.tsv'), rows, '\t', 'uyc')
    tab = self.config('csv', path, csv=dict(label_column='y', sep='\t'))
    typed = self.config('csv', path, csv=dict(label_column='y', sep='\\t'))
    _validate(typed)
    a, b = data.load_dataset(tab), data.load_dataset(typed)
    self.assertEqual(a.field_names, ('u', 'c'))
    np.testing.assert_array_equal(a.train.ids, b.train.ids)
    for sep in (';;', '\\t\\t', '"', '\n'):
      config = self.config('csv', path, csv=dict(label_column='y', sep=sep))
      message = (
        rf'^config\.dataset\.csv\.sep={re.escape(repr(sep))} must be a string'
        r' of one character .*a tab'
      )
      with self.assertRaisesRegex(data.DataError, message):
        data.load_dataset(config)
      with self.assertRaisesRegex(config_check.ConfigError, message[1:]):
        _validate(config)


if __name__ == '__main__':
  absltest.main()
