"""xDeepFM (models/xdeepfm.py): parity with torchfm, the CIN, training mode.

tests/fixtures/torchfm_xdeepfm.npz was written by
tools/make_torchfm_fixtures.py from torchfm 0.7.0's
`ExtremeDeepFactorizationMachineModel` with random weights: its eval-mode
output and one train-mode step (loss, gradients, BatchNorm statistics) with
`split_half=True`, and (keys `nosplit/...`) the eval-mode output of a second
model with `split_half=False`. Torch is not needed to run these tests.
"""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
from model_testing import apply_eval
from model_testing import apply_train
from model_testing import check_config_model
from model_testing import check_torchfm_eval
from model_testing import check_torchfm_step
from model_testing import load_fixture
from model_testing import np_fields
from model_testing import np_linear
from model_testing import np_mlp
from model_testing import random_ids
from model_testing import random_variables
from model_testing import recipe
from model_testing import torch_dense
from model_testing import torch_features_embedding
from model_testing import torch_features_linear
from model_testing import torch_mlp
import numpy as np

from configs import xdeepfm as xdeepfm_config

xdeepfm = importlib.import_module('models.xdeepfm')

FIELD_DIMS = (7, 11, 5, 4)
KWARGS = dict(embed_dim=3, mlp_dims=(6, 4), cross_layer_sizes=(4, 6, 3))


def _np_cin(x0, params, sizes, split_half):
  """Eq. (6), (7) and the output unit, map by map, pair of rows by pair."""
  x0 = np.asarray(x0, np.float64)
  batch, fields, dim = x0.shape
  h = x0  # X^{k-1}
  pooled = []
  for k, size in enumerate(sizes):
    kernel = np.asarray(params[f'conv_{k}']['kernel'], np.float64)
    bias = params[f'conv_{k}']['bias']
    x = np.zeros((batch, size, dim))
    for o in range(size):
      for j in range(fields):
        for i in range(h.shape[1]):
          x[:, o] += kernel[j * h.shape[1] + i, o] * h[:, i] * x0[:, j]
      x[:, o] += bias[o]
    x = np.maximum(x, 0.0)
    if split_half and k != len(sizes) - 1:
      out, h = x[:, : size // 2], x[:, size // 2 :]
    else:
      out = h = x
    pooled.append(out.sum(axis=2))  # p^k
  p = np.concatenate(pooled, axis=1)
  return (p @ params['fc']['kernel'] + params['fc']['bias'])[:, 0]


def _np_xdeepfm(variables, ids, split_half, batch_stats=True, drop_mlp=False):
  """The model's logits by numpy (BatchNorm: running or batch statistics)."""
  p = variables['params']
  s = None
  if batch_stats:
    s = variables['batch_stats']['MultiLayerPerceptron_0']
  v = np_fields(p['FeaturesEmbedding_0'], 'embedding', ids, FIELD_DIMS)
  out = np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS)
  cin = p['CompressedInteractionNetwork_0']
  out = out + _np_cin(v, cin, KWARGS['cross_layer_sizes'], split_half)
  mlp = p['MultiLayerPerceptron_0']
  if drop_mlp:  # every hidden unit dropped: the output layer's bias remains
    return out + mlp['Dense_2']['bias'][0]
  return out + np_mlp(v.reshape(len(ids), -1), mlp, s, 2)


def _from_torch(w, sizes, num_hidden):
  """torchfm ExtremeDeepFactorizationMachineModel state dict -> variables."""
  mlp, stats = torch_mlp(w, 'mlp.mlp', num_hidden)
  # Conv1d weights [out, in, 1] with kernel size 1 are Dense kernels [in, out].
  cin = {
    f'conv_{k}': {
      'kernel': w[f'cin.conv_layers.{k}.weight'][:, :, 0].T,
      'bias': w[f'cin.conv_layers.{k}.bias'],
    }
    for k in range(len(sizes))
  }
  cin['fc'] = torch_dense(w, 'cin.fc')
  params = {
    'FeaturesLinear_0': torch_features_linear(w),
    'FeaturesEmbedding_0': torch_features_embedding(w),
    'CompressedInteractionNetwork_0': cin,
    'MultiLayerPerceptron_0': mlp,
  }
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


# The two torchfm models of the fixture: key prefix -> constructor arguments.
FIXTURE_MODELS = {
  '': dict(
    embed_dim=4, mlp_dims=(8, 6), cross_layer_sizes=(6, 4, 3), split_half=True
  ),
  'nosplit/': dict(
    embed_dim=4, mlp_dims=(8,), cross_layer_sizes=(5, 3), split_half=False
  ),
}


def _convert(kwargs):
  """The converter of a fixture model with these constructor arguments."""
  sizes, num_hidden = kwargs['cross_layer_sizes'], len(kwargs['mlp_dims'])
  return lambda w: _from_torch(w, sizes, num_hidden)


class TorchfmParityTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.data, self.field_dims = load_fixture('xdeepfm')

  @parameterized.named_parameters(('split_half', ''), ('no_split', 'nosplit/'))
  def test_eval_outputs_match_torchfm(self, prefix):
    kwargs = FIXTURE_MODELS[prefix]
    model = xdeepfm.Model(self.field_dims, dropout=0.2, **kwargs)
    check_torchfm_eval(model, self.data, _convert(kwargs), prefix)

  def test_train_step_matches_torchfm(self):
    kwargs = FIXTURE_MODELS['']
    model = xdeepfm.Model(self.field_dims, dropout=0.0, **kwargs)
    check_torchfm_step(model, self.data, _convert(kwargs))


class CompressedInteractionNetworkTest(parameterized.TestCase):
  @parameterized.parameters(True, False)
  def test_eval_model_matches_the_paper_equations(self, split_half):
    model = xdeepfm.Model(FIELD_DIMS, split_half=split_half, **KWARGS)
    ids = random_ids(7, FIELD_DIMS)
    variables = random_variables(model, ids)
    np.testing.assert_allclose(
      model.apply(variables, ids),
      _np_xdeepfm(variables, ids, split_half),
      rtol=1e-4,
      atol=1e-4,
    )

  def test_split_half_halves_the_maps_fed_forward_and_pooled(self):
    sizes = KWARGS['cross_layer_sizes']  # (4, 6, 3), 4 fields
    shapes = {}
    for split_half in (True, False):
      model = xdeepfm.Model(FIELD_DIMS, split_half=split_half, **KWARGS)
      ids = random_ids(2, FIELD_DIMS)
      params = jax.eval_shape(model.init, jax.random.key(0), ids)['params']
      cin = params['CompressedInteractionNetwork_0']
      shapes[split_half] = [cin[f'conv_{k}']['kernel'].shape for k in range(3)]
      shapes[split_half].append(cin['fc']['kernel'].shape)
    self.assertEqual(
      shapes[True], [(4 * 4, 4), (4 * 2, 6), (4 * 3, 3), (2 + 3 + 3, 1)]
    )
    self.assertEqual(
      shapes[False], [(4 * 4, 4), (4 * 4, 6), (4 * 6, 3), (sum(sizes), 1)]
    )

  def test_odd_size_before_the_last_layer_is_an_error_with_split_half(self):
    with self.assertRaisesRegex(ValueError, 'even size'):
      xdeepfm.Model(FIELD_DIMS, cross_layer_sizes=(5, 4), split_half=True)
    # The last layer is never split; without split_half any size works.
    xdeepfm.Model(FIELD_DIMS, cross_layer_sizes=(4, 5), split_half=True)
    xdeepfm.Model(FIELD_DIMS, cross_layer_sizes=(5, 4), split_half=False)
    with self.assertRaisesRegex(ValueError, 'cross_layer_sizes'):
      xdeepfm.Model(FIELD_DIMS, cross_layer_sizes=())


class TrainingModeTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.ids = random_ids(16, FIELD_DIMS, seed=2)
    base = xdeepfm.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    self.variables = random_variables(base, self.ids)

  def _train(self, model, seed=0):
    return apply_train(model, self.variables, self.ids, seed=seed)

  def test_batch_statistics_in_training(self):
    model = xdeepfm.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    out, stats = self._train(model)
    np.testing.assert_allclose(
      out,
      _np_xdeepfm(self.variables, self.ids, True, batch_stats=False),
      rtol=1e-4,
      atol=1e-4,
    )
    old = self.variables['batch_stats']['MultiLayerPerceptron_0']
    new = stats['MultiLayerPerceptron_0']
    for layer in ('BatchNorm_0', 'BatchNorm_1'):
      for stat in ('mean', 'var'):
        with self.subTest(f'{layer} {stat}'):
          self.assertFalse(np.allclose(new[layer][stat], old[layer][stat]))

  def test_mlp_dropout_site(self):
    # Rate 1 drops every hidden unit of the DNN: its output is its bias.
    dropped = xdeepfm.Model(FIELD_DIMS, dropout=1.0, **KWARGS)
    out, _ = self._train(dropped)
    np.testing.assert_allclose(
      out,
      _np_xdeepfm(self.variables, self.ids, True, drop_mlp=True),
      rtol=1e-4,
      atol=1e-4,
    )
    # A rate of 0.5 changes training outputs, by key, and not eval ones.
    half = xdeepfm.Model(FIELD_DIMS, dropout=0.5, **KWARGS)
    a, _ = self._train(half, 0)
    b, _ = self._train(half, 1)
    self.assertGreater(np.mean(~np.isclose(a, b)), 0.5)
    np.testing.assert_array_equal(
      apply_eval(half, self.variables, self.ids),
      apply_eval(half, self.variables, self.ids, seed=5),
    )


class SideInputTest(absltest.TestCase):
  def test_multi_hot_and_numeric_fields_are_rows_of_x0(self):
    kwargs = dict(KWARGS, cross_layer_sizes=(4, 3))
    model = xdeepfm.Model(
      FIELD_DIMS, multi_field_dims=(5,), num_dense=1, **kwargs
    )
    ids = random_ids(4, FIELD_DIMS)
    multi_ids = np.array([[[0, 3]], [[2, -1]], [[-1, -1]], [[4, 4]]], np.int32)
    dense = np.array([[0.5], [-1.0], [2.0], [0.0]], np.float32)
    variables = random_variables(model, ids, multi_ids, dense)
    p = variables['params']
    cin = p['CompressedInteractionNetwork_0']
    self.assertEqual(cin['conv_0']['kernel'].shape, (6 * 6, 4))
    side = (ids, FIELD_DIMS, multi_ids, (5,), dense)
    x0 = np_fields(p['FeaturesEmbedding_0'], 'embedding', *side)  # [B, 6, D]
    expected = (
      np_linear(p['FeaturesLinear_0'], *side)
      + _np_cin(x0, cin, (4, 3), split_half=True)
      + np_mlp(
        x0.reshape(4, -1),
        p['MultiLayerPerceptron_0'],
        variables['batch_stats']['MultiLayerPerceptron_0'],
        2,
      )
    )
    out = model.apply(variables, ids, multi_ids, dense)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = xdeepfm_config.get_config()
    self.assertEqual(config.model_name, 'xdeepfm')
    self.assertEqual(
      recipe(xdeepfm_config),
      dict(
        embed_dim=16,
        cross_layer_sizes=(16, 16),
        split_half=False,
        mlp_dims=(16, 16),
        dropout=0.2,
        linear_init='lecun',
      ),
    )
    check_config_model(xdeepfm, config)


if __name__ == '__main__':
  absltest.main()
