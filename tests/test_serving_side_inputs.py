"""Predict and export with multi-hot and numeric inputs, from raw rows.

Two tiny runs, each trained once for its test class: FM on a CSV with float
and multi-hot columns, and FM on MovieLens ratings with
`side_features=genres,year`. Raw rows of their test splits go through the
saved encoder, predict.py and the exports (jax.export, ONNX); the inputs
must be the cache's exactly, and the probabilities `model.apply`'s on the
cache's inputs.
"""

import atexit
import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
import warnings

from absl.testing import absltest
import jax
import ml_collections
import numpy as np
import onnxruntime
import pandas as pd
from predict_testing import split_lines
from predict_testing import train_run
from predict_testing import unseen_line
from test_datasets_csv_features import HEADER
from test_datasets_csv_features import MIN_COUNT
from test_datasets_csv_features import csv_options
from test_datasets_csv_features import feature_rows
from test_encoder import V1_KEYS

import batching
import best_reader
from configs import fm
import data
from datasets import movielens
import encoder
import export
import metrics
import predict
import predict_output
import train

TOLERANCE = 1e-5
INPUTS = ('ids', 'multi_ids', 'dense')


def _config(cache_dir: str) -> ml_collections.ConfigDict:
  config = fm.get_config('smoke')
  config.model = ml_collections.ConfigDict({'embed_dim': 4})
  config.dataset.cache_dir = cache_dir
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 1
  config.log_every_steps = 5
  config.progress_bar = False
  return config


def _reference(config, workdir, dataset):
  """`inputs -> sigmoid(model.apply(best variables, **inputs))`."""
  model = train.create_model(
    config, dataset.field_dims, **batching.model_fields(dataset)
  )
  state, _ = best_reader.load_best(workdir)

  @jax.jit
  def probabilities(inputs):
    logits = model.apply({'params': state['params']}, **inputs, train=False)
    return jax.nn.sigmoid(logits)

  return lambda inputs: np.asarray(probabilities(inputs))


def _inputs(split) -> dict:
  return {k: np.asarray(getattr(split, k)) for k in INPUTS}


@functools.cache
def csv_run():
  """A run on a CSV with float (price, count) and multi-hot (tags, colors)
  columns: its workdir, config, dataset, test lines and reference."""
  tmp = tempfile.mkdtemp(prefix='serving_side_csv_')
  atexit.register(shutil.rmtree, tmp, ignore_errors=True)
  rows = feature_rows(1500, seed=12)
  path = os.path.join(tmp, 'train.csv')
  with open(path, 'w') as f:
    f.writelines(','.join(r) + '\n' for r in [HEADER, *rows])
  config = _config(os.path.join(tmp, 'cache'))
  config.dataset.name = 'csv'
  config.dataset.path = path
  config.dataset.min_count = MIN_COUNT
  config.dataset.csv.update(csv_options())
  workdir = os.path.join(tmp, 'run')
  metrics = train_run(config, workdir)
  dataset = data.load_dataset(config.dataset)
  lines = split_lines([','.join(r) for r in rows], config)['test']
  reference = _reference(config, workdir, dataset)
  return workdir, dataset, lines, metrics, reference


@functools.cache
def movielens_run():
  """A run on 4,000 embedded ratings with genres and year of each movie."""
  tmp = tempfile.mkdtemp(prefix='serving_side_ml_')
  atexit.register(shutil.rmtree, tmp, ignore_errors=True)
  ratings = pd.read_csv(movielens.EMBEDDED).head(4000)
  ratings.to_csv(os.path.join(tmp, 'ratings.csv'), index=False)
  assets = os.path.dirname(movielens.EMBEDDED)
  shutil.copy(os.path.join(assets, 'movies.csv.gz'), tmp)
  config = _config(os.path.join(tmp, 'cache'))
  config.dataset.path = os.path.join(tmp, 'ratings.csv')
  config.dataset.side_features = ('genres,year',)
  workdir = os.path.join(tmp, 'run')
  train_run(config, workdir)
  dataset = data.load_dataset(config.dataset)
  return workdir, dataset, _reference(config, workdir, dataset)


class CsvTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir, cls.dataset, cls.lines, cls.metrics, cls.reference = csv_run()
    cls.predictor = predict.load(cls.workdir, batch_size=64)
    cls.test = cls.dataset.test
    cls.expected = cls.reference(_inputs(cls.test))

  def setUp(self):
    super().setUp()
    self.tmp = self.enter_context(tempfile.TemporaryDirectory())

  def _file(self, lines, header=HEADER):
    path = os.path.join(self.tmp, 'test.csv')
    with open(path, 'w') as f:
      f.writelines(line + '\n' for line in [','.join(header), *lines])
    return path

  def test_raw_rows_give_the_cached_inputs_and_the_test_auc(self):
    self.assertEqual(self.dataset.multi_field_names, ('tags', 'colors'))
    self.assertEqual(self.dataset.dense_names, ('price', 'count'))
    source = self._file(self.lines)
    rows = self.predictor.encoder.encode(source)
    for name in INPUTS:
      np.testing.assert_array_equal(
        getattr(rows, name), getattr(self.test, name)
      )
    output = os.path.join(self.tmp, 'out.csv')
    count = predict_output.write_predictions(self.predictor, source, output, 50)
    out = pd.read_csv(output)
    self.assertEqual(count, len(self.test))
    np.testing.assert_array_equal(out['label'], self.test.labels)
    np.testing.assert_allclose(
      out['probability'], self.expected, rtol=0, atol=1e-6
    )
    self.assertAlmostEqual(
      metrics.roc_auc(out['label'], out['probability'].to_numpy(np.float32)),
      self.metrics['auc'],
      delta=1e-6,
    )
    count = predict_output.write_predictions(
      self.predictor, self._file([]), output
    )
    with open(output) as f:
      self.assertEqual((count, f.read()), (0, 'probability,label\n'))

  def test_a_layout_1_encoder_says_to_resave_it(self):
    # Layout 1 kept no side inputs: predict.py and export.py said that
    # encoder/ and the checkpoints 'come from different runs'.
    workdir = os.path.join(self.tmp, 'old')
    shutil.copytree(self.workdir, workdir)
    path = os.path.join(workdir, 'encoder', 'encoder.json')
    with open(path) as f:
      meta = json.load(f)
    with open(path, 'w') as f:
      json.dump({key: meta[key] for key in V1_KEYS} | {'version': 1}, f)
    with self.assertRaisesRegex(
      predict.utils.UserError,
      rf'^{workdir}/encoder/ was saved by an older version \(layout 1\),'
      r'.* run main.py again',
    ):
      predict.load(workdir)

  def test_unseen_list_values_are_counted(self):
    lines = [line.split(',') for line in self.lines[:30]]
    lines[3][4] = 'never|seen'  # tags.
    lines[7][5] = 'c0|nocolor'  # colors: one kept value, one not.
    lines[7][1] = 'zzz'  # shop, a one-hot field, in the same row.
    source = self._file([','.join(line) for line in lines])
    with self.assertLogs('absl', 'INFO') as logs:
      predict_output.write_predictions(
        self.predictor, source, os.path.join(self.tmp, 'o.csv'), 10
      )
    rows = self.predictor.encoder.encode(source)
    lists = self.predictor.unseen_lists(rows.multi_ids)
    oov = np.array(self.dataset.multi_field_dims) - 1
    np.testing.assert_array_equal(
      lists, (rows.multi_ids == oov[:, None]).any(2)
    )
    self.assertTrue(lists[3, 0] and lists[7, 1])
    mask = np.hstack([self.predictor.unseen(rows.ids), lists])
    self.assertTrue(mask[7, 0])  # shop.
    names = ('shop', 'tags', 'colors')
    self.assertIn(unseen_line(names, mask), '\n'.join(logs.output))

  def test_a_dataframe_without_label_and_encoded_inputs(self):
    frame = pd.read_csv(
      self._file(self.lines), dtype=str, keep_default_na=False
    ).drop(columns='click')
    frame['price'] = frame['price'].replace('', 'nan').astype(float)
    frame['tags'] = [cell.split('|') for cell in frame['tags']]
    got = self.predictor(frame)
    np.testing.assert_allclose(got, self.expected, rtol=0, atol=1e-6)
    got = self.predictor(frame.iloc[:0])  # No rows: no probabilities.
    self.assertEqual((got.shape, got.dtype), ((0,), np.float32))
    got = self.predictor.predict_ids(**_inputs(self.test))
    np.testing.assert_allclose(got, self.expected, rtol=0, atol=1e-6)
    with self.assertRaisesRegex(ValueError, 'takes ids, multi_ids, dense'):
      self.predictor.predict_ids(self.test.ids)

  def test_encoded_inputs_out_of_range_are_refused(self):
    # The model's gathers would clamp them: probabilities of other ids.
    inputs = {k: v[:3] for k, v in _inputs(self.test).items()}
    oob = np.array(self.dataset.field_dims, np.int64)
    multi_oob = np.array(self.dataset.multi_field_dims).reshape(1, -1, 1)
    for name, value, message in (
      ('ids', inputs['ids'] + oob, r'ids outside \[0, field_dims\)'),
      ('ids', inputs['ids'] - 1 - oob, r'ids outside \[0, field_dims\)'),
      (
        'ids',
        inputs['ids'].astype(np.int64) + 2**32,
        r'ids outside \[0, field_dims\)',
      ),
      ('ids', inputs['ids'] + 0.5, 'ids must be integers, got float64'),
      ('multi_ids', inputs['multi_ids'] + multi_oob, 'outside'),
      ('multi_ids', inputs['multi_ids'] * 0 - 2, 'outside'),
      ('dense', inputs['dense'] * np.nan, 'not finite'),
    ):
      with self.subTest(name=name, message=message):
        with self.assertRaisesRegex(ValueError, f'^{name}: .*{message}'):
          self.predictor.predict_ids(**{**inputs, name: value})
    got = self.predictor.predict_ids(**inputs)
    np.testing.assert_allclose(got, self.expected[:3], rtol=0, atol=1e-6)

  def test_inputs_beyond_their_dtype_raise_one_error_and_no_warning(self):
    # numpy printed 'overflow encountered in cast' (and 'invalid value')
    # RuntimeWarnings before the error: the float32 and int32 casts came
    # first.
    inputs = {k: v[:3] for k, v in _inputs(self.test).items()}
    dense = (
      r'^dense: numeric values that are not finite in field\(s\) \[1\] as'
      r' float32 \(inf, nan, or beyond \+-3.403e\+38\)\.$'
    )
    ids = '^ids: ids must be integers, got float64'
    for name, value, message in (
      ('dense', 1e300, dense),
      ('dense', -1e39, dense),
      ('dense', np.inf, dense),
      ('dense', np.nan, dense),
      ('ids', 1e300, ids),
      ('ids', np.nan, ids),
    ):
      given = np.array(inputs[name], np.float64)
      given[2, -1] = value  # dense: field 1, the last.
      with self.subTest(name=name, value=value):
        with (
          warnings.catch_warnings(record=True) as caught,
          np.errstate(all='warn'),
        ):
          warnings.simplefilter('always')
          with self.assertRaisesRegex(ValueError, message):
            self.predictor.predict_ids(**{**inputs, name: given})
        self.assertEqual([str(w.message) for w in caught], [])

  def test_inputs_of_another_row_count_than_the_ids_are_refused(self):
    # Longer lists or numbers than ids were cut to the ids' rows, silently.
    longer = {k: v[:4] for k, v in _inputs(self.test).items()}
    inputs = {k: v[:3] for k, v in longer.items()}
    for name, shape in (('multi_ids', '[n, 2, 4]'), ('dense', '[n, 2]')):
      with self.subTest(name):
        with self.assertRaisesRegex(
          ValueError, rf'^{name} must be {re.escape(shape)}, got \(4,'
        ):
          self.predictor.predict_ids(**{**inputs, name: longer[name]})

  def test_numbers_beyond_float32_name_the_row_and_field(self):
    lines = list(self.lines[:6])
    cells = lines[4].split(',')
    lines[4] = ','.join(cells[:2] + ['1e300'] + cells[3:])  # price.
    source = self._file(lines[:2] + [''] + lines[2:])
    output = os.path.join(self.tmp, 'out.csv')
    beyond = ' is beyond float32 range (+-3.403e+38)'
    with self.assertRaisesRegex(
      data.DataError,
      rf'^{re.escape(source)}:7: float column price 1e\+300'
      rf'{re.escape(beyond)}$',
    ):
      predict_output.write_predictions(self.predictor, source, output, 2)
    self.assertFalse(os.path.exists(output))
    frame = pd.DataFrame({'shop': ['a', 'b'], 'price': [1.0, -1e39]})
    frame = frame.assign(count=1.0, tags='', colors='')
    with self.assertRaisesRegex(
      data.DataError,
      rf'^DataFrame row 1: float column price -1e\+39{re.escape(beyond)}$',
    ):
      self.predictor(frame)

  def test_numbers_beyond_float32_once_standardised_name_their_row(self):
    # With a tiny training std, 1e9 parses but standardises beyond float32.
    p, side = self.predictor, self.predictor.encoder.side
    width = len(side.dense_names)
    side = dataclasses.replace(
      side, dense_mean=(0.0,) * width, dense_std=(1e-30,) * width
    )
    enc = dataclasses.replace(p.encoder, side=side)
    tiny = predict.Predictor(enc, p.model, p.variables, 64)
    beyond = re.escape(
      'numeric field price: 1e+09 standardises to 1e+39 (mean 0, std'
      ' 1e-30), which is beyond float32 range (+-3.403e+38); remove or'
      ' rescale the value.'
    )
    lines = list(self.lines[:6])
    cells = lines[4].split(',')
    lines[4] = ','.join(cells[:2] + ['1e9'] + cells[3:])  # price, row 5.
    source = self._file(lines[:2] + [''] + lines[2:])  # Chunks of 2 lines.
    output = os.path.join(self.tmp, 'out.csv')
    with self.assertRaisesRegex(
      data.DataError,
      rf'^{re.escape(source)}:7: {beyond}$',  # Header, blank: line 7.
    ):
      predict_output.write_predictions(tiny, source, output, 2)
    self.assertFalse(os.path.exists(output))
    frame = pd.DataFrame({'shop': ['a', 'b', 'c'], 'price': [1.0, 2.0, 1e9]})
    frame = frame.assign(count=1.0, tags='', colors='')
    with self.assertRaisesRegex(data.DataError, f'^DataFrame row 2: {beyond}$'):
      tiny(frame)

  def test_exports_take_the_three_inputs(self):
    out = os.path.join(self.tmp, 'export')
    signature = export.export(self.predictor, out)
    self.assertIsNone(signature['onnx_error'])
    max_len = self.test.multi_ids.shape[2]
    self.assertEqual(
      signature['inputs'],
      [
        {'name': 'ids', 'dtype': 'int32', 'shape': ['batch', 1]},
        {'name': 'multi_ids', 'dtype': 'int32', 'shape': ['batch', 2, max_len]},
        {'name': 'dense', 'dtype': 'float32', 'shape': ['batch', 2]},
      ],
    )
    self.assertEqual(signature['multi_field_names'], ['tags', 'colors'])
    self.assertEqual(
      signature['multi_field_dims'], list(self.dataset.multi_field_dims)
    )
    self.assertEqual(signature['max_len'], max_len)
    self.assertEqual(signature['dense_names'], ['price', 'count'])
    # A serving process encodes raw rows with the exported encoder alone.
    rows = encoder.load(out).encode(self._file(self.lines)).inputs()
    self.assertEqual(list(rows), list(INPUTS))
    with open(os.path.join(out, 'model.jax'), 'rb') as f:
      model = jax.export.deserialize(bytearray(f.read()))
    for n in (1, len(self.expected)):
      args = [rows[k][:n] for k in INPUTS]
      got = np.asarray(model.call(*args))
      np.testing.assert_allclose(got, self.expected[:n], rtol=0, atol=TOLERANCE)
      session = onnxruntime.InferenceSession(os.path.join(out, 'model.onnx'))
      [got] = session.run([export.OUTPUT], {k: rows[k][:n] for k in INPUTS})
      np.testing.assert_allclose(got, self.expected[:n], rtol=0, atol=TOLERANCE)

  def test_exported_rows_with_ids_outside_their_fields_are_nan(self):
    # The gathers clipped them: probabilities of other fields' rows, as
    # plausible as any (predict_ids refuses them; an export cannot raise).
    out = os.path.join(self.tmp, 'export')
    export.export(self.predictor, out)
    inputs = {k: v[:7].copy() for k, v in _inputs(self.test).items()}
    dims = np.array(self.dataset.multi_field_dims, np.int32)
    inputs['ids'][1] = self.dataset.field_dims  # The first id outside each.
    inputs['ids'][2] = -1
    inputs['multi_ids'][3, 0, 0] = -2
    inputs['multi_ids'][4, 1, -1] = dims[1]
    inputs['ids'][5] = np.iinfo(np.int32).max
    with open(os.path.join(out, 'model.jax'), 'rb') as f:
      model = jax.export.deserialize(bytearray(f.read()))
    session = onnxruntime.InferenceSession(os.path.join(out, 'model.onnx'))
    for got in (
      np.asarray(model.call(*(inputs[k] for k in INPUTS))),
      session.run([export.OUTPUT], inputs)[0],
    ):
      np.testing.assert_array_equal(np.isnan(got), [0, 1, 1, 1, 1, 1, 0])
      np.testing.assert_allclose(
        got[[0, 6]], self.expected[[0, 6]], rtol=0, atol=TOLERANCE
      )


class MovieLensTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir, cls.dataset, reference = movielens_run()
    cls.reference = staticmethod(reference)
    cls.predictor = predict.load(cls.workdir, batch_size=64)

  def test_raw_user_and_movie_ids_give_the_cached_inputs(self):
    test = self.dataset.test
    self.assertEqual(self.dataset.multi_field_names, ('genres',))
    self.assertEqual(self.dataset.dense_names, ('year',))
    users, items = self.dataset.vocabulary[:2]
    frame = pd.DataFrame(
      {'user': users[test.ids[:, 0]], 'item': items[test.ids[:, 1]]}
    )
    rows = self.predictor.encoder.encode(frame)
    for name in INPUTS:
      np.testing.assert_array_equal(getattr(rows, name), getattr(test, name))
    self.assertTrue(np.any(test.dense != 0))
    expected = self.reference(_inputs(test))
    np.testing.assert_allclose(
      self.predictor(frame), expected, rtol=0, atol=1e-6
    )
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    source, output = os.path.join(tmp, 'pairs.csv'), os.path.join(tmp, 'o')
    frame.rename(columns={'user': 'userId', 'item': 'movieId'}).to_csv(
      source, index=False
    )
    predict_output.write_predictions(
      self.predictor, source, output, chunk_rows=7
    )
    np.testing.assert_allclose(
      pd.read_csv(output)['probability'], expected, rtol=0, atol=1e-6
    )

  def test_grouplens_column_names_score_as_ours_and_as_their_file(self):
    # pd.read_csv of GroupLens's ratings.csv: userId,movieId,rating,timestamp.
    test = self.dataset.test
    users, items = self.dataset.vocabulary[:2]
    ours = pd.DataFrame(
      {
        'user': users[test.ids[:, 0]],
        'item': items[test.ids[:, 1]],
        'rating': np.where(test.labels > 0, 4.5, 2.0),  # rating > 3: 1.
      }
    )
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    path = os.path.join(tmp, 'ratings.csv')
    names = {'user': 'userId', 'item': 'movieId'}
    ours.rename(columns=names).assign(timestamp=964982703).to_csv(
      path, index=False
    )
    theirs = pd.read_csv(path)
    self.assertEqual(
      list(theirs.columns), ['userId', 'movieId', 'rating', 'timestamp']
    )
    expected = self.predictor(ours)
    np.testing.assert_allclose(
      expected, self.reference(_inputs(test)), rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(self.predictor(theirs), expected)
    np.testing.assert_array_equal(
      self.predictor.encoder.encode(theirs).labels, test.labels
    )
    chunks = list(self.predictor.predict_file(path))
    np.testing.assert_array_equal(
      np.concatenate([p for p, _ in chunks]), expected
    )
    np.testing.assert_array_equal(
      np.concatenate([labels for _, labels in chunks]), test.labels
    )

  def test_an_unseen_movie_has_no_genres_and_the_mean_year(self):
    users, items = self.dataset.vocabulary[:2]
    frame = pd.DataFrame({'user': [users[0]], 'item': [10**9]})
    oov = self.dataset.field_dims[1] - 1
    max_len = self.dataset.test.multi_ids.shape[2]
    inputs = {
      'ids': np.array([[0, oov]], np.int32),
      'multi_ids': np.full((1, 1, max_len), -1, np.int32),
      'dense': np.zeros((1, 1), np.float32),
    }
    rows = self.predictor.encoder.encode(frame).inputs()
    for name in INPUTS:
      np.testing.assert_array_equal(rows[name], inputs[name])
    np.testing.assert_allclose(
      self.predictor(frame), self.reference(inputs), rtol=0, atol=1e-6
    )


if __name__ == '__main__':
  absltest.main()
