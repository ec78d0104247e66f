"""xDeepFM (models/xdeepfm.py): parity with torchfm, the CIN, training mode.

tests/fixtures/torchfm_xdeepfm.npz was written by
tools/make_torchfm_fixtures.py from torchfm 0.7.0's
`ExtremeDeepFactorizationMachineModel` with random weights: its eval-mode
output and one train-mode step (loss, gradients, BatchNorm statistics) with
`split_half=True`, and (keys `nosplit/...`) the eval-mode output of a second
model with `split_half=False`. Torch is not needed to run these tests.
"""

import importlib
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_tables import random_ids
from model_tables import randomize
import numpy as np

from configs import xdeepfm as xdeepfm_config

xdeepfm = importlib.import_module('models.xdeepfm')

FIXTURE = os.path.join(
  os.path.dirname(__file__), 'fixtures', 'torchfm_xdeepfm.npz'
)
FIELD_DIMS = (7, 11, 5, 4)
OFFSETS = np.cumsum((0,) + FIELD_DIMS[:-1])
EPS = 1e-5
KWARGS = dict(embed_dim=3, mlp_dims=(6, 4), cross_layer_sizes=(4, 6, 3))


def _np_mlp(x, params, stats, num_hidden):
  """MultiLayerPerceptron without dropout; `stats=None`: batch statistics."""
  for i in range(num_hidden):
    x = x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias']
    if stats is None:
      mean, var = x.mean(axis=0), x.var(axis=0)
    else:
      mean, var = (stats[f'BatchNorm_{i}'][k] for k in ('mean', 'var'))
    bn = params[f'BatchNorm_{i}']
    x = (x - mean) / np.sqrt(var + EPS) * bn['scale'] + bn['bias']
    x = np.maximum(x, 0.0)
  out = params[f'Dense_{num_hidden}']
  return (x @ out['kernel'] + out['bias'])[:, 0]


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
  rows = ids + OFFSETS
  v = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)[rows]
  linear = p['FeaturesLinear_0']
  out = linear['bias'][0] + np.asarray(linear['weight'])[rows, 0].sum(1)
  cin = p['CompressedInteractionNetwork_0']
  out = out + _np_cin(v, cin, KWARGS['cross_layer_sizes'], split_half)
  mlp = p['MultiLayerPerceptron_0']
  if drop_mlp:  # every hidden unit dropped: the output layer's bias remains
    return out + mlp['Dense_2']['bias'][0]
  return out + _np_mlp(v.reshape(len(ids), -1), mlp, s, 2)


def _from_torch(w, sizes, num_hidden):
  """torchfm ExtremeDeepFactorizationMachineModel state dict -> variables."""
  mlp, stats = {}, {}
  for i in range(num_hidden):
    lin, bn = f'mlp.mlp.{4 * i}', f'mlp.mlp.{4 * i + 1}'
    mlp[f'Dense_{i}'] = {
      'kernel': w[f'{lin}.weight'].T,
      'bias': w[f'{lin}.bias'],
    }
    mlp[f'BatchNorm_{i}'] = {
      'scale': w[f'{bn}.weight'],
      'bias': w[f'{bn}.bias'],
    }
    stats[f'BatchNorm_{i}'] = {
      'mean': w[f'{bn}.running_mean'],
      'var': w[f'{bn}.running_var'],
    }
  out = f'mlp.mlp.{4 * num_hidden}'
  mlp[f'Dense_{num_hidden}'] = {
    'kernel': w[f'{out}.weight'].T,
    'bias': w[f'{out}.bias'],
  }
  # Conv1d weights [out, in, 1] with kernel size 1 are Dense kernels [in, out].
  cin = {
    f'conv_{k}': {
      'kernel': w[f'cin.conv_layers.{k}.weight'][:, :, 0].T,
      'bias': w[f'cin.conv_layers.{k}.bias'],
    }
    for k in range(len(sizes))
  }
  cin['fc'] = {'kernel': w['cin.fc.weight'].T, 'bias': w['cin.fc.bias']}
  params = {
    'FeaturesLinear_0': {
      'weight': w['linear.fc.weight'],
      'bias': w['linear.bias'],
    },
    'FeaturesEmbedding_0': {'embedding': w['embedding.embedding.weight']},
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


class TorchfmParityTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.data = np.load(FIXTURE)
    self.field_dims = tuple(int(d) for d in self.data['field_dims'])

  def _weights(self, prefix):
    key = f'{prefix}w/'
    return {
      k[len(key) :]: self.data[k] for k in self.data.files if k.startswith(key)
    }

  @parameterized.named_parameters(('split_half', ''), ('no_split', 'nosplit/'))
  def test_eval_outputs_match_torchfm(self, prefix):
    kwargs = FIXTURE_MODELS[prefix]
    model = xdeepfm.Model(self.field_dims, dropout=0.2, **kwargs)
    sizes, num_hidden = kwargs['cross_layer_sizes'], len(kwargs['mlp_dims'])
    variables = _from_torch(self._weights(prefix), sizes, num_hidden)
    ids = self.data['ids']
    init = model.init(jax.random.key(0), ids)
    self.assertEqual(
      jax.tree.map(np.shape, init), jax.tree.map(np.shape, variables)
    )
    logits = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data[f'{prefix}probs'], rtol=1e-5, atol=1e-5
    )

  def test_train_step_matches_torchfm(self):
    # torchfm's step ran in train mode with dropout 0: batch statistics in
    # BatchNorm, BCE of the probabilities, then its running statistics.
    kwargs = FIXTURE_MODELS['']
    model = xdeepfm.Model(self.field_dims, dropout=0.0, **kwargs)
    w = self._weights('')
    variables = _from_torch(w, kwargs['cross_layer_sizes'], 2)
    ids, labels = self.data['ids'], self.data['train/labels']

    def loss_fn(params):
      logits, state = model.apply(
        {**variables, 'params': params},
        ids,
        train=True,
        mutable=['batch_stats'],
      )
      loss = jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)
      return loss, (logits, state)

    (loss, (logits, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables['params']
    )
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data['train/probs'], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(loss, self.data['train/loss'], rtol=1e-5)
    grad_w = {k[5:]: self.data[k] for k in self.data.files if k[:5] == 'grad/'}
    expected = _from_torch({**w, **grad_w}, kwargs['cross_layer_sizes'], 2)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      want = expected['params']
      for key in path:
        want = want[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
    # Running statistics: torch updates the variance with the unbiased batch
    # variance, Flax with the biased one; same momentum (0.1 / 0.9).
    n = len(ids)
    for i, bn in ((0, 'mlp.mlp.1'), (1, 'mlp.mlp.5')):
      got = state['batch_stats']['MultiLayerPerceptron_0'][f'BatchNorm_{i}']
      old_var = w[f'{bn}.running_var']
      np.testing.assert_allclose(
        got['mean'], self.data[f'after/{bn}.running_mean'], rtol=1e-5, atol=1e-6
      )
      unbiased = (self.data[f'after/{bn}.running_var'] - 0.9 * old_var) / 0.1
      np.testing.assert_allclose(
        got['var'],
        0.9 * old_var + 0.1 * unbiased * (n - 1) / n,
        rtol=1e-4,
        atol=1e-5,
      )
      self.assertFalse(np.allclose(got['mean'], w[f'{bn}.running_mean']))


class CompressedInteractionNetworkTest(parameterized.TestCase):
  @parameterized.parameters(True, False)
  def test_eval_model_matches_the_paper_equations(self, split_half):
    model = xdeepfm.Model(FIELD_DIMS, split_half=split_half, **KWARGS)
    ids = random_ids(7, field_dims=FIELD_DIMS)
    variables = randomize(model.init(jax.random.key(0), ids))
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
      params = model.init(
        jax.random.key(0), random_ids(2, field_dims=FIELD_DIMS)
      )['params']
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
    self.ids = random_ids(16, field_dims=FIELD_DIMS, seed=2)
    base = xdeepfm.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    self.variables = randomize(base.init(jax.random.key(0), self.ids))

  def _train(self, model, seed=0):
    return model.apply(
      self.variables,
      self.ids,
      train=True,
      rngs={'dropout': jax.random.key(seed)},
      mutable=['batch_stats'],
    )

  def test_batch_statistics_in_training(self):
    model = xdeepfm.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    out, state = self._train(model)
    np.testing.assert_allclose(
      out,
      _np_xdeepfm(self.variables, self.ids, True, batch_stats=False),
      rtol=1e-4,
      atol=1e-4,
    )
    old = self.variables['batch_stats']['MultiLayerPerceptron_0']
    new = state['batch_stats']['MultiLayerPerceptron_0']
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
      half.apply(self.variables, self.ids),
      half.apply(self.variables, self.ids, rngs={'dropout': jax.random.key(5)}),
    )


class SideInputTest(absltest.TestCase):
  def test_multi_hot_and_numeric_fields_are_rows_of_x0(self):
    kwargs = dict(KWARGS, cross_layer_sizes=(4, 3))
    model = xdeepfm.Model(
      FIELD_DIMS, multi_field_dims=(5,), num_dense=1, **kwargs
    )
    ids = random_ids(4, field_dims=FIELD_DIMS)
    multi_ids = np.array([[[0, 3]], [[2, -1]], [[-1, -1]], [[4, 4]]], np.int32)
    dense = np.array([[0.5], [-1.0], [2.0], [0.0]], np.float32)
    variables = model.init(jax.random.key(0), ids, multi_ids, dense)
    p = variables['params']
    cin = p['CompressedInteractionNetwork_0']
    self.assertEqual(cin['conv_0']['kernel'].shape, (6 * 6, 4))
    emb = jax.tree.map(np.asarray, p['FeaturesEmbedding_0'])
    multi = np.stack(
      [
        emb['multi_embedding'][[i for i in row[0] if i >= 0]].mean(0)
        if np.any(row >= 0)
        else np.zeros(3)
        for row in multi_ids
      ]
    )
    x0 = np.concatenate(
      [
        emb['embedding'][ids + OFFSETS],
        multi[:, None],
        dense[:, :, None] * emb['dense_embedding'][None],
      ],
      axis=1,
    )  # [B, 6, D]
    lin = jax.tree.map(np.asarray, p['FeaturesLinear_0'])
    multi_w = np.array(
      [
        lin['multi_weight'][[i for i in row[0] if i >= 0], 0].mean()
        if np.any(row >= 0)
        else 0.0
        for row in multi_ids
      ]
    )
    linear = (
      lin['bias'][0]
      + lin['weight'][ids + OFFSETS, 0].sum(1)
      + multi_w
      + dense[:, 0] * lin['dense_weight'][0, 0]
    )
    expected = (
      linear
      + _np_cin(x0, cin, (4, 3), split_half=True)
      + _np_mlp(
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
      dict(config.model),
      dict(
        embed_dim=16,
        cross_layer_sizes=(16, 16),
        split_half=False,
        mlp_dims=(16, 16),
        dropout=0.2,
      ),
    )
    model = xdeepfm.Model(field_dims=(6, 9), **config.model)
    ids = random_ids(4, field_dims=(6, 9))
    out = model.apply(model.init(jax.random.key(0), ids), ids)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)


if __name__ == '__main__':
  absltest.main()
