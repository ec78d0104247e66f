"""Refusals in one line: a tuple flag given twice, a resume's changed
key, and a multi-hot list value holding the separator."""

import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from dataset_testing import DatasetTestCase
import pandas as pd

from configs import fm
import data
from datasets import csv
import utils
import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RepeatedOverrideTest(absltest.TestCase):
  def test_a_tuple_key_given_twice_is_refused_naming_it(self):
    # ml_collections appends a tuple key's values: the split given twice
    # became (0.8, 0.1, 0.1, 0.8, 0.1, 0.1), and a run went on from there.
    with tempfile.TemporaryDirectory() as tmp:
      workdir = os.path.join(tmp, 'w')
      result = subprocess.run(
        [
          sys.executable,
          'main.py',
          '--config=configs/fm.py:smoke',
          f'--workdir={workdir}',
          '--config.dataset.split=0.8,0.1,0.1',
          '--config.batch_size=64',
          '--config.dataset.split',
          '0.7,0.2,0.1',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
      )
      self.assertFalse(os.path.exists(workdir))
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(
      result.stderr.strip().splitlines()[-1],
      "main.py: error: --config.dataset.split is given twice ('0.8,0.1,0.1',"
      " then '0.7,0.2,0.1'), and ml_collections would join them into one"
      ' tuple of all their values. Give it once.',
    )


class ResumeRefusalTest(absltest.TestCase):
  def _refusal(self) -> str:
    config = fm.get_config('smoke')
    with tempfile.TemporaryDirectory() as path:
      workdir.check_resume(path, config, resuming=False)
      config.learning_rate = 0.5
      with self.assertRaises(utils.UserError) as refused:
        workdir.check_resume(path, config, resuming=True)
    return str(refused.exception)

  def test_the_refusal_names_the_keys_of_read_by_from_the_table(self):
    # The line named table_learning_rate and rowwise_adagrad itself: a key
    # or an optimizer added to READ_BY would have been left out.
    self.assertEndsWith(
      self._refusal(),
      ' may change on a resume (and table_learning_rate where the optimizer'
      ' is not rowwise_adagrad).',
    )
    table = {
      'table_learning_rate': ('rowwise_adagrad', 'row_sgd'),
      'table_momentum': ('row_sgd',),
    }
    with mock.patch.object(workdir, 'READ_BY', table):
      self.assertEndsWith(
        self._refusal(),
        ' may change on a resume (and table_learning_rate where the'
        ' optimizer is not rowwise_adagrad or row_sgd, table_momentum where'
        ' the optimizer is not row_sgd).',
      )


class SeparatorInListTest(DatasetTestCase):
  def _frame(self):
    tags = [['t1'], ['t2', 't3'], [], ['t1'], ['t3'], ['t1|t2', 't3']]
    return pd.DataFrame(
      {'click': [1, 0, 1, 0, 1, 0], 'shop': list('abcabc'), 'tags': tags}
    )

  def test_a_parquet_list_value_with_the_separator_is_refused(self):
    # ['t1|t2'] was joined as 't1|t2|t3' and read as three values, t1 and
    # t2 among them, where the list held two.
    parquet = os.path.join(self.tmp, 'tags.parquet')
    self._frame().to_parquet(parquet)
    config = self.config(
      'csv',
      parquet,
      min_count=1,
      chunk_rows=4,  # The row is in the second batch.
      csv=dict(
        label_column='click', float_columns=(), multi_hot_columns=('tags',)
      ),
    )
    with self.assertRaises(data.DataError) as refused:
      data.load_dataset(config)
    self.assertEqual(
      str(refused.exception),
      f"{parquet}: row 6: column tags holds a list with the value 't1|t2',"
      " which holds the multi-hot separator '|' and would be read as 2"
      " values. Remove '|' from the value, or train with a"
      ' config.dataset.csv.multi_hot_sep that no value holds.',
    )

  def test_a_data_frame_list_value_with_the_separator_is_refused(self):
    # predict's DataFrame rows (encoder_frames.py) are joined here too.
    frame = self._frame()
    joined = csv.joined_lists(frame.iloc[:5], ['tags'], '|')
    self.assertEqual(joined.tags.tolist(), ['t1', 't2|t3', '', 't1', 't3'])
    with self.assertRaisesRegex(
      data.DataError,
      r"^DataFrame row 5: column tags holds a list with the value 't1\|t2',",
    ):
      csv.joined_lists(frame, ['tags'], '|')
    # Another separator reads it as one value.
    joined = csv.joined_lists(frame, ['tags'], ';')
    self.assertEqual(joined.tags.tolist()[5], 't1|t2;t3')


if __name__ == '__main__':
  absltest.main()
