"""DCN (models/dcn.py): parity with torchfm, the cross layer, training mode.

tests/fixtures/torchfm_dcn.npz was written by tools/make_torchfm_fixtures.py
from torchfm 0.7.0's `DeepCrossNetworkModel` with random weights: its
eval-mode output, and one train-mode step (loss, gradients, BatchNorm
statistics). Torch is not needed to run these tests.
"""

import importlib

from absl.testing import absltest
from model_testing import apply_eval
from model_testing import apply_train
from model_testing import check_config_model
from model_testing import check_torchfm_eval
from model_testing import check_torchfm_step
from model_testing import init
from model_testing import load_fixture
from model_testing import np_fields
from model_testing import np_mlp
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
from model_testing import torch_dense
from model_testing import torch_features_embedding
from model_testing import torch_mlp
import numpy as np

from configs import dcn as dcn_config

dcn = importlib.import_module('models.dcn')

FIELD_DIMS = (7, 11, 5, 4)
KWARGS = dict(embed_dim=3, num_layers=2, mlp_dims=(6, 4))


def _np_cross(x0, params, num_layers):
  """Eq. (3) as written: `x_{l+1} = x_0 x_l^T w_l + b_l + x_l`."""
  x = x0
  for i in range(num_layers):
    w = np.asarray(params[f'w_{i}']['kernel'], np.float64)  # [d, 1]
    outer = x0[:, :, None] * x[:, None, :]  # x_0 x_l^T: [B, d, d]
    x = (outer @ w)[..., 0] + params[f'b_{i}'] + x
  return x


def _np_dcn(variables, ids, batch_stats=True, drop_deep=False):
  """The model's logits by numpy (BatchNorm: running or batch statistics)."""
  p = variables['params']
  s = None
  if batch_stats:
    s = variables['batch_stats']['MultiLayerPerceptron_0']
  table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
  x0 = table[ids + offsets(FIELD_DIMS)].reshape(len(ids), -1)
  cross = _np_cross(x0, p['VectorCrossNetwork_0'], KWARGS['num_layers'])
  deep = np_mlp(x0, p['MultiLayerPerceptron_0'], s, 2, output_layer=False)
  if drop_deep:
    deep = np.zeros_like(deep)
  stacked = np.concatenate([cross, deep], axis=1)
  return (stacked @ p['output']['kernel'] + p['output']['bias'])[:, 0]


def _from_torch(w, num_layers=2, num_hidden=2):
  """torchfm DeepCrossNetworkModel state dict -> our variables."""
  mlp, stats = torch_mlp(w, 'mlp.mlp', num_hidden, output_layer=False)
  cross = {}
  for i in range(num_layers):
    cross[f'w_{i}'] = {'kernel': w[f'cn.w.{i}.weight'].T}
    cross[f'b_{i}'] = w[f'cn.b.{i}']
  params = {
    'FeaturesEmbedding_0': torch_features_embedding(w),
    'VectorCrossNetwork_0': cross,
    'MultiLayerPerceptron_0': mlp,
    'output': torch_dense(w, 'linear'),
  }
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


class TorchfmParityTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.data, self.field_dims = load_fixture('dcn')
    self.kwargs = dict(embed_dim=4, num_layers=2, mlp_dims=(8, 6))

  def test_eval_outputs_match_torchfm(self):
    model = dcn.Model(self.field_dims, dropout=0.2, **self.kwargs)
    check_torchfm_eval(model, self.data, _from_torch)

  def test_train_step_matches_torchfm(self):
    model = dcn.Model(self.field_dims, dropout=0.0, **self.kwargs)
    check_torchfm_step(model, self.data, _from_torch)


class CrossNetworkTest(absltest.TestCase):
  def test_eval_model_matches_the_paper_equations(self):
    model = dcn.Model(FIELD_DIMS, **KWARGS)
    ids = random_ids(9, FIELD_DIMS)
    variables = random_variables(model, ids)
    np.testing.assert_allclose(
      model.apply(variables, ids), _np_dcn(variables, ids), rtol=1e-4, atol=1e-4
    )


class TrainingModeTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.ids = random_ids(16, FIELD_DIMS, seed=2)
    base = dcn.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    self.variables = random_variables(base, self.ids)

  def _train(self, model, seed=0):
    return apply_train(model, self.variables, self.ids, seed=seed)

  def test_batch_statistics_in_training_and_running_ones_in_eval(self):
    model = dcn.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    out, stats = self._train(model)
    np.testing.assert_allclose(
      out,
      _np_dcn(self.variables, self.ids, batch_stats=False),
      rtol=1e-4,
      atol=1e-4,
    )
    # The running statistics move towards the batch's (momentum 0.9).
    p = self.variables['params']
    table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
    h = table[self.ids + offsets(FIELD_DIMS)].reshape(len(self.ids), -1)
    dense = p['MultiLayerPerceptron_0']['Dense_0']
    h = h @ dense['kernel']  # No bias before BatchNorm.
    old = self.variables['batch_stats']['MultiLayerPerceptron_0']['BatchNorm_0']
    new = stats['MultiLayerPerceptron_0']['BatchNorm_0']
    np.testing.assert_allclose(
      new['mean'], 0.9 * old['mean'] + 0.1 * h.mean(0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      new['var'], 0.9 * old['var'] + 0.1 * h.var(0), rtol=1e-4, atol=1e-5
    )

  def test_mlp_dropout_site(self):
    # Rate 1 drops every deep unit: the logit is the cross network's alone.
    dropped = dcn.Model(FIELD_DIMS, dropout=1.0, **KWARGS)
    out, _ = self._train(dropped)
    np.testing.assert_allclose(
      out,
      _np_dcn(self.variables, self.ids, batch_stats=False, drop_deep=True),
      rtol=1e-4,
      atol=1e-4,
    )
    # A rate of 0.5 changes training outputs, by key, and not eval ones.
    half = dcn.Model(FIELD_DIMS, dropout=0.5, **KWARGS)
    a, _ = self._train(half, 0)
    b, _ = self._train(half, 1)
    self.assertGreater(np.mean(~np.isclose(a, b)), 0.5)
    out = apply_eval(half, self.variables, self.ids)
    np.testing.assert_array_equal(
      out, apply_eval(half, self.variables, self.ids, seed=5)
    )
    np.testing.assert_allclose(
      out, _np_dcn(self.variables, self.ids), rtol=1e-4, atol=1e-4
    )


class SideInputTest(absltest.TestCase):
  def test_multi_hot_and_numeric_fields_widen_x0(self):
    model = dcn.Model(FIELD_DIMS, multi_field_dims=(5,), num_dense=2, **KWARGS)
    ids = random_ids(6, FIELD_DIMS)
    # Two ids, one id, no id (pools to zeros), ...
    lists = [[0, 3], [2], [], [4, 1], [3], [0, 1]]
    multi_ids = np.full((6, 1, 2), -1, np.int32)
    for i, row in enumerate(lists):
      multi_ids[i, 0, : len(row)] = row
    dense = np.linspace(-1, 1, 12, dtype=np.float32).reshape(6, 2)
    variables = init(model, ids, multi_ids, dense)
    params = variables['params']
    width = (len(FIELD_DIMS) + 1 + 2) * KWARGS['embed_dim']
    self.assertEqual(params['VectorCrossNetwork_0']['b_0'].shape, (width,))
    emb = params['FeaturesEmbedding_0']
    x0 = np_fields(
      emb, 'embedding', ids, FIELD_DIMS, multi_ids, (5,), dense
    ).reshape(6, -1)
    out = model.apply(variables, ids, multi_ids, dense)
    deep = np_mlp(
      x0,
      params['MultiLayerPerceptron_0'],
      variables['batch_stats']['MultiLayerPerceptron_0'],
      2,
      output_layer=False,
    )
    cross = _np_cross(x0, params['VectorCrossNetwork_0'], 2)
    stacked = np.concatenate([cross, deep], axis=1)
    expected = stacked @ params['output']['kernel'] + params['output']['bias']
    np.testing.assert_allclose(out, expected[:, 0], rtol=1e-4, atol=1e-5)


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = dcn_config.get_config()
    self.assertEqual(config.model_name, 'dcn')
    self.assertEqual(
      recipe(dcn_config),
      dict(
        embed_dim=16,
        num_layers=3,
        mlp_dims=(16, 16),
        dropout=0.2,
        linear_init='torch',
      ),
    )
    check_config_model(dcn, config)


if __name__ == '__main__':
  absltest.main()
