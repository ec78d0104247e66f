"""Tests of train.py: metrics, the pmap step on 2 devices, padded evaluation."""

import functools
import itertools
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from flax import jax_utils
import jax
import ml_collections
import numpy as np

from configs import default
import data
import train


def _brute_force_auc(labels, scores):
  pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
  neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
  wins = sum(
    1.0 if p > n else 0.5 if p == n else 0.0
    for p, n in itertools.product(pos, neg)
  )
  return wins / (len(pos) * len(neg))


def _config(**overrides):
  config = default.get_config('smoke')
  config.model = ml_collections.ConfigDict(dict(embed_dim=4))
  config.update(overrides)
  return config


def _dataset(n=1000, seed=0, field_dims=(13, 17)):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.integers(0, d, n) for d in field_dims], 1)
  logits = np.sin(ids[:, 0]) + np.cos(ids[:, 1] * 0.7)
  labels = (rng.random(n) < 1 / (1 + np.exp(-2 * logits))).astype(np.float32)
  return data.Split(ids.astype(np.int32), labels)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for record in records:
    record.pop('wall_time')
  return records


class MetricsTest(parameterized.TestCase):
  @parameterized.parameters(0, 1, 2, 3)
  def test_auc_matches_all_pairs_count_with_ties(self, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    # Few distinct scores: many ties inside and across classes.
    scores = rng.integers(0, 7, 200).astype(np.float32)
    self.assertAlmostEqual(
      train.roc_auc(labels, scores), _brute_force_auc(labels, scores), 12
    )

  def test_auc_extremes_and_one_class(self):
    self.assertEqual(train.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]), 1.0)
    self.assertEqual(train.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]), 0.0)
    self.assertEqual(train.roc_auc([0, 1], [0.5, 0.5]), 0.5)
    self.assertTrue(np.isnan(train.roc_auc([1, 1], [0.1, 0.2])))

  def test_logloss_matches_numpy(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300) * 5
    labels = rng.integers(0, 2, 300)
    p = 1 / (1 + np.exp(-logits))
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    self.assertAlmostEqual(train.binary_logloss(labels, logits), expected, 10)


class PmapStepTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.assertEqual(jax.local_device_count(), 2, 'conftest sets 2 devices')
    self.config = _config()
    self.model = train.create_model(self.config, (13, 17), axis_name=train.AXIS)
    self.state = train.create_train_state(
      jax.random.key(0), self.config, self.model, 2
    )
    split = _dataset(64)
    self.batch = {'ids': split.ids, 'label': split.labels}

  def _step(self, devices):
    p_step = jax.pmap(
      functools.partial(train.train_step, model=self.model, seed=0),
      axis_name=train.AXIS,
      devices=devices,
    )
    state = jax_utils.replicate(self.state, devices=devices)
    state, loss = p_step(state, data.shard(self.batch, len(devices)))
    return state, loss

  def test_replicas_identical_after_a_step(self):
    state, loss = self._step(jax.local_devices())
    self.assertEqual(float(loss[0]), float(loss[1]))
    for leaf in jax.tree.leaves(state.params):
      np.testing.assert_array_equal(leaf[0], leaf[1])
    # And the step moved the parameters.
    moved = jax.tree.map(
      lambda a, b: np.abs(np.asarray(a[0]) - np.asarray(b)).max(),
      state.params,
      self.state.params,
    )
    self.assertGreater(max(jax.tree.leaves(moved)), 0)

  def test_two_devices_equal_one_device_on_the_same_global_batch(self):
    two, loss2 = self._step(jax.local_devices())
    one, loss1 = self._step(jax.local_devices()[:1])
    np.testing.assert_allclose(loss2[0], loss1[0], rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7),
      two.params,
      one.params,
    )


class EvaluateTest(parameterized.TestCase):
  @parameterized.parameters(101, 16, 15, 17, 1)
  def test_padded_evaluation_equals_unpadded_numpy(self, n):
    config = _config()
    model = train.create_model(config, (13, 17), axis_name=train.AXIS)
    state = train.create_train_state(jax.random.key(1), config, model, 2)
    # Non-trivial parameters, so that scores differ between rows.
    state = state.replace(
      params=jax.tree.map(
        lambda x: (
          np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
        ),
        state.params,
      )
    )
    split = _dataset(n, seed=3)
    p_eval = jax.pmap(
      functools.partial(train.eval_step, model=model), axis_name=train.AXIS
    )
    metrics = train.evaluate(p_eval, train.replicate(state), split, 16)
    logits = np.asarray(
      train.create_model(config, (13, 17)).apply(
        {'params': state.params}, split.ids, train=False
      )
    )
    self.assertEqual(metrics['num_examples'], n)
    self.assertAlmostEqual(
      metrics['logloss'], train.binary_logloss(split.labels, logits), 5
    )
    if 0 < split.labels.sum() < n:
      self.assertAlmostEqual(
        metrics['auc'], _brute_force_auc(split.labels, logits), 6
      )


class TrainAndEvaluateTest(absltest.TestCase):
  def test_fm_learns_and_resumes_without_retraining(self):
    config = _config(num_epochs=2)
    with tempfile.TemporaryDirectory() as workdir:
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      test = train.train_and_evaluate(config, workdir)
      self.assertGreater(test['auc'], 0.75)
      lines = _metrics(workdir)
      # A finished run started again trains nothing and ends the same (only
      # the wall time of the re-evaluated test line differs).
      again = train.train_and_evaluate(config, workdir)
      self.assertEqual(_metrics(workdir), lines)
      self.assertEqual(again, test)


if __name__ == '__main__':
  absltest.main()
