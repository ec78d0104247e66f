"""AFN (models/afn.py): parity with torchfm, the LNN by brute force, training.

tests/fixtures/torchfm_afn.npz was written by tools/make_torchfm_fixtures.py
from torchfm 0.7.0's `AdaptiveFactorizationNetwork` with random weights: its
eval-mode output, and one train-mode step (loss, gradients, BatchNorm
statistics). Torch is not needed to run these tests.
"""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_testing import EPS
from model_testing import check_config_model
from model_testing import check_dropout_in_training_only
from model_testing import check_torchfm_eval
from model_testing import check_torchfm_step
from model_testing import load_fixture
from model_testing import np_batchnorm
from model_testing import np_linear
from model_testing import np_mlp
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
from model_testing import torch_features_embedding
from model_testing import torch_features_linear
from model_testing import torch_mlp
import numpy as np

from configs import afn as afn_config

afn = importlib.import_module('models.afn')

FIELD_DIMS = (7, 11, 5, 4)
KWARGS = dict(embed_dim=3, lnn_dim=5, mlp_dims=(16, 16))


def _np_lnn(e, weight, form, params=None, stats=None):
  """Eq. (5) neuron by neuron, field by field, as a product of powers."""
  batch, fields, dim = e.shape
  if form == 'torchfm':
    base = 1.0 + np.abs(e) + 1e-7  # log1p(|e| + 1e-7) = log(base)
  else:
    log_e = np.log(np.maximum(np.abs(e), 1e-4))
    base = np.exp(
      np_batchnorm(
        log_e, params['log_batch_norm'], stats['log_batch_norm'], axis=1
      )
    )
  out = np.ones((batch, weight.shape[0], dim))
  for j in range(weight.shape[0]):
    for f in range(fields):
      out[:, j] *= base[:, f] ** weight[j, f]
  if form == 'torchfm':
    return np.maximum(out - 1.0, 0.0)
  return np_batchnorm(
    out, params['exp_batch_norm'], stats['exp_batch_norm'], axis=1
  )


def _from_torch(w, num_hidden=2):
  """torchfm AFN state dict -> our variables."""
  mlp, stats = torch_mlp(w, 'mlp.mlp', num_hidden)
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
    'FeaturesEmbedding_0': torch_features_embedding(w),
    'LogarithmicNeuralNetwork_0': {'weight': w['LNN.weight']},
    'MultiLayerPerceptron_0': mlp,
  }
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


class TorchfmParityTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.data, self.field_dims = load_fixture('afn')
    self.kwargs = dict(embed_dim=4, lnn_dim=6, mlp_dims=(8, 6))

  def test_eval_outputs_match_torchfm(self):
    model = afn.Model(self.field_dims, dropout=0.2, **self.kwargs)
    check_torchfm_eval(model, self.data, _from_torch)

  def test_train_step_matches_torchfm(self):
    model = afn.Model(self.field_dims, dropout=0.0, **self.kwargs)
    check_torchfm_step(model, self.data, _from_torch)


class LogarithmicNeuralNetworkTest(parameterized.TestCase):
  @parameterized.parameters('torchfm', 'paper')
  def test_eval_model_matches_brute_force(self, form):
    model = afn.Model(FIELD_DIMS, lnn=form, **KWARGS)
    ids = random_ids(9, FIELD_DIMS)
    variables = random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    out = model.apply(variables, ids, train=False)
    table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
    e = table[ids + offsets(FIELD_DIMS)]
    lnn_p = p['LogarithmicNeuralNetwork_0']
    y = _np_lnn(
      e,
      np.asarray(lnn_p['weight'], np.float64),
      form,
      lnn_p,
      s.get('LogarithmicNeuralNetwork_0'),
    )  # [B, L, D]
    expected = np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS) + np_mlp(
      y.reshape(len(ids), -1),
      p['MultiLayerPerceptron_0'],
      s['MultiLayerPerceptron_0'],
      num_hidden=2,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_paper_form_normalises_with_batch_statistics_in_training(self):
    # Train mode: each field's logarithms and each neuron's outputs are
    # normalised over batch and embedding dimension, and the running
    # statistics move towards those batch moments.
    lnn = afn.LogarithmicNeuralNetwork(4, lnn='paper')
    e = np.random.default_rng(0).normal(size=(32, 3, 5)).astype(np.float32)
    variables = lnn.init(jax.random.key(0), e, train=False)
    out, state = lnn.apply(variables, e, train=True, mutable=['batch_stats'])
    log_e = np.log(np.maximum(np.abs(e), 1e-4)).astype(np.float64)
    mean, var = log_e.mean(axis=(0, 2)), log_e.var(axis=(0, 2))
    normed = (log_e - mean[:, None]) / np.sqrt(var[:, None] + EPS)
    w = np.asarray(variables['params']['weight'], np.float64)
    z = np.exp(np.einsum('lf,bfd->bld', w, normed))
    z_mean, z_var = z.mean(axis=(0, 2)), z.var(axis=(0, 2))
    expected = (z - z_mean[:, None]) / np.sqrt(z_var[:, None] + EPS)
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)
    stats = state['batch_stats']
    np.testing.assert_allclose(
      stats['log_batch_norm']['mean'], 0.1 * mean, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      stats['exp_batch_norm']['var'], 0.9 + 0.1 * z_var, rtol=1e-4, atol=1e-5
    )

  def test_weights_start_uniform_within_torch_bound(self):
    lnn = afn.LogarithmicNeuralNetwork(400)
    e = np.ones((2, 9, 3), np.float32)
    w = lnn.init(jax.random.key(0), e, train=False)['params']['weight']
    self.assertEqual(w.shape, (400, 9))
    self.assertLessEqual(float(jnp.max(jnp.abs(w))), 1 / 3)
    self.assertGreater(float(jnp.max(w)), 0.95 / 3)
    self.assertLess(float(jnp.min(w)), -0.95 / 3)

  def test_unknown_form_is_an_error(self):
    model = afn.Model(FIELD_DIMS, lnn='log', **KWARGS)
    with self.assertRaisesRegex(ValueError, "'torchfm' or 'paper'"):
      model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))


class TrainingModeTest(parameterized.TestCase):
  @parameterized.parameters('torchfm', 'paper')
  def test_dropout_batchnorm_and_eval(self, form):
    ids = random_ids(16, FIELD_DIMS, seed=2)
    base = afn.Model(FIELD_DIMS, lnn=form, dropout=0.0, **KWARGS)
    # The MLP's dropout.
    dropped = afn.Model(FIELD_DIMS, lnn=form, dropout=0.5, **KWARGS)
    variables = random_variables(base, ids)
    check_dropout_in_training_only(base, dropped, variables, ids)


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = afn_config.get_config()
    self.assertEqual(config.model_name, 'afn')
    self.assertEqual(
      recipe(afn_config),
      dict(
        embed_dim=16,
        lnn_dim=1500,
        mlp_dims=(400, 400, 400),
        dropout=0.0,
        linear_init='lecun',
      ),
    )
    variables = check_config_model(afn, config)
    lnn = variables['params']['LogarithmicNeuralNetwork_0']['weight']
    self.assertEqual(lnn.shape, (1500, 2))


if __name__ == '__main__':
  absltest.main()
