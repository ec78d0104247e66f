"""DCN (models/dcn.py): parity with torchfm, the cross layer, training mode.

tests/fixtures/torchfm_dcn.npz was written by tools/make_torchfm_fixtures.py
from torchfm 0.7.0's `DeepCrossNetworkModel` with random weights: its
eval-mode output, and one train-mode step (loss, gradients, BatchNorm
statistics). Torch is not needed to run these tests.
"""

import importlib
import os

from absl.testing import absltest
import jax
import jax.numpy as jnp
from model_tables import random_ids
from model_tables import randomize
import numpy as np

from configs import dcn as dcn_config

dcn = importlib.import_module('models.dcn')

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'torchfm_dcn.npz')
FIELD_DIMS = (7, 11, 5, 4)
OFFSETS = np.cumsum((0,) + FIELD_DIMS[:-1])
EPS = 1e-5
KWARGS = dict(embed_dim=3, num_layers=2, mlp_dims=(6, 4))


def _np_mlp(x, params, stats, num_hidden, output_layer=True):
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
  if output_layer:
    out = params[f'Dense_{num_hidden}']
    x = (x @ out['kernel'] + out['bias'])[:, 0]
  return x


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
  x0 = table[ids + OFFSETS].reshape(len(ids), -1)
  cross = _np_cross(x0, p['VectorCrossNetwork_0'], KWARGS['num_layers'])
  deep = _np_mlp(x0, p['MultiLayerPerceptron_0'], s, 2, output_layer=False)
  if drop_deep:
    deep = np.zeros_like(deep)
  stacked = np.concatenate([cross, deep], axis=1)
  return (stacked @ p['output']['kernel'] + p['output']['bias'])[:, 0]


def _torch_mlp(w, prefix, num_hidden):
  """torch MultiLayerPerceptron (no output layer) -> (params, batch_stats)."""
  params, stats = {}, {}
  for i in range(num_hidden):
    lin, bn = f'{prefix}.{4 * i}', f'{prefix}.{4 * i + 1}'
    params[f'Dense_{i}'] = {
      'kernel': w[f'{lin}.weight'].T,
      'bias': w[f'{lin}.bias'],
    }
    params[f'BatchNorm_{i}'] = {
      'scale': w[f'{bn}.weight'],
      'bias': w[f'{bn}.bias'],
    }
    stats[f'BatchNorm_{i}'] = {
      'mean': w[f'{bn}.running_mean'],
      'var': w[f'{bn}.running_var'],
    }
  return params, stats


def _from_torch(w, num_layers=2, num_hidden=2):
  """torchfm DeepCrossNetworkModel state dict -> our variables."""
  mlp, stats = _torch_mlp(w, 'mlp.mlp', num_hidden)
  cross = {}
  for i in range(num_layers):
    cross[f'w_{i}'] = {'kernel': w[f'cn.w.{i}.weight'].T}
    cross[f'b_{i}'] = w[f'cn.b.{i}']
  params = {
    'FeaturesEmbedding_0': {'embedding': w['embedding.embedding.weight']},
    'VectorCrossNetwork_0': cross,
    'MultiLayerPerceptron_0': mlp,
    'output': {'kernel': w['linear.weight'].T, 'bias': w['linear.bias']},
  }
  return {'params': params, 'batch_stats': {'MultiLayerPerceptron_0': stats}}


class TorchfmParityTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.data = np.load(FIXTURE)
    self.w = {k[2:]: self.data[k] for k in self.data.files if k[:2] == 'w/'}
    self.variables = _from_torch(self.w)
    self.field_dims = tuple(int(d) for d in self.data['field_dims'])
    self.kwargs = dict(embed_dim=4, num_layers=2, mlp_dims=(8, 6))

  def test_converted_tree_has_the_structure_of_init(self):
    model = dcn.Model(self.field_dims, dropout=0.2, **self.kwargs)
    init = model.init(jax.random.key(0), self.data['ids'])
    self.assertEqual(
      jax.tree.map(np.shape, init), jax.tree.map(np.shape, self.variables)
    )

  def test_eval_outputs_match_torchfm(self):
    model = dcn.Model(self.field_dims, dropout=0.2, **self.kwargs)
    logits = model.apply(self.variables, self.data['ids'], train=False)
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data['probs'], rtol=1e-5, atol=1e-5
    )

  def test_train_step_matches_torchfm(self):
    # torchfm's step ran in train mode with dropout 0: batch statistics in
    # BatchNorm, BCE of the probabilities, then its running statistics.
    model = dcn.Model(self.field_dims, dropout=0.0, **self.kwargs)
    ids, labels = self.data['ids'], self.data['train/labels']

    def loss_fn(params):
      logits, state = model.apply(
        {**self.variables, 'params': params},
        ids,
        train=True,
        mutable=['batch_stats'],
      )
      loss = jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)
      return loss, (logits, state)

    (loss, (logits, state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      self.variables['params']
    )
    np.testing.assert_allclose(
      jax.nn.sigmoid(logits), self.data['train/probs'], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(loss, self.data['train/loss'], rtol=1e-5)
    grad_w = {k[5:]: self.data[k] for k in self.data.files if k[:5] == 'grad/'}
    expected = _from_torch({**self.w, **grad_w})['params']
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      want = expected
      for key in path:
        want = want[key.key]
      with self.subTest(jax.tree_util.keystr(path)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
    # Running statistics: torch updates the variance with the unbiased batch
    # variance, Flax with the biased one; same momentum (0.1 / 0.9).
    n = len(ids)
    for i, bn in ((0, 'mlp.mlp.1'), (1, 'mlp.mlp.5')):
      got = state['batch_stats']['MultiLayerPerceptron_0'][f'BatchNorm_{i}']
      old_var = self.w[f'{bn}.running_var']
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
      self.assertFalse(np.allclose(got['mean'], self.w[f'{bn}.running_mean']))


class CrossNetworkTest(absltest.TestCase):
  def test_eval_model_matches_the_paper_equations(self):
    model = dcn.Model(FIELD_DIMS, **KWARGS)
    ids = random_ids(9, field_dims=FIELD_DIMS)
    variables = randomize(model.init(jax.random.key(0), ids))
    np.testing.assert_allclose(
      model.apply(variables, ids), _np_dcn(variables, ids), rtol=1e-4, atol=1e-4
    )


class TrainingModeTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.ids = random_ids(16, field_dims=FIELD_DIMS, seed=2)
    base = dcn.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    self.variables = randomize(base.init(jax.random.key(0), self.ids))

  def _train(self, model, seed=0):
    return model.apply(
      self.variables,
      self.ids,
      train=True,
      rngs={'dropout': jax.random.key(seed)},
      mutable=['batch_stats'],
    )

  def test_batch_statistics_in_training_and_running_ones_in_eval(self):
    model = dcn.Model(FIELD_DIMS, dropout=0.0, **KWARGS)
    out, state = self._train(model)
    np.testing.assert_allclose(
      out,
      _np_dcn(self.variables, self.ids, batch_stats=False),
      rtol=1e-4,
      atol=1e-4,
    )
    # The running statistics move towards the batch's (momentum 0.9).
    p = self.variables['params']
    table = np.asarray(p['FeaturesEmbedding_0']['embedding'], np.float64)
    h = table[self.ids + OFFSETS].reshape(len(self.ids), -1)
    dense = p['MultiLayerPerceptron_0']['Dense_0']
    h = h @ dense['kernel'] + dense['bias']
    old = self.variables['batch_stats']['MultiLayerPerceptron_0']['BatchNorm_0']
    new = state['batch_stats']['MultiLayerPerceptron_0']['BatchNorm_0']
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
    np.testing.assert_array_equal(
      half.apply(self.variables, self.ids),
      half.apply(self.variables, self.ids, rngs={'dropout': jax.random.key(5)}),
    )
    np.testing.assert_allclose(
      half.apply(self.variables, self.ids),
      _np_dcn(self.variables, self.ids),
      rtol=1e-4,
      atol=1e-4,
    )


class SideInputTest(absltest.TestCase):
  def test_multi_hot_and_numeric_fields_widen_x0(self):
    model = dcn.Model(FIELD_DIMS, multi_field_dims=(5,), num_dense=2, **KWARGS)
    ids = random_ids(6, field_dims=FIELD_DIMS)
    # Two ids, one id, no id (pools to zeros), ...
    lists = [[0, 3], [2], [], [4, 1], [3], [0, 1]]
    multi_ids = np.full((6, 1, 2), -1, np.int32)
    for i, row in enumerate(lists):
      multi_ids[i, 0, : len(row)] = row
    dense = np.linspace(-1, 1, 12, dtype=np.float32).reshape(6, 2)
    variables = model.init(jax.random.key(0), ids, multi_ids, dense)
    params = variables['params']
    width = (len(FIELD_DIMS) + 1 + 2) * KWARGS['embed_dim']
    self.assertEqual(params['VectorCrossNetwork_0']['b_0'].shape, (width,))
    emb = params['FeaturesEmbedding_0']
    table = np.asarray(emb['embedding'])
    x0 = np.concatenate(
      [
        table[ids + OFFSETS].reshape(6, -1),
        np.stack(
          [
            np.asarray(emb['multi_embedding'])[row].mean(0)
            if row
            else np.zeros(3)
            for row in lists
          ]
        ),
        dense[:, :1] * emb['dense_embedding'][0],
        dense[:, 1:] * emb['dense_embedding'][1],
      ],
      axis=1,
    )
    out = model.apply(variables, ids, multi_ids, dense)
    deep = _np_mlp(
      x0,
      params['MultiLayerPerceptron_0'],
      variables['batch_stats']['MultiLayerPerceptron_0'],
      2,
      output_layer=False,
    )
    cross = _np_cross(x0.astype(np.float64), params['VectorCrossNetwork_0'], 2)
    stacked = np.concatenate([cross, deep], axis=1)
    expected = stacked @ params['output']['kernel'] + params['output']['bias']
    np.testing.assert_allclose(out, expected[:, 0], rtol=1e-4, atol=1e-5)


class ConfigTest(absltest.TestCase):
  def test_config_is_pytorch_fm_examples_main(self):
    config = dcn_config.get_config()
    self.assertEqual(config.model_name, 'dcn')
    self.assertEqual(
      dict(config.model),
      dict(embed_dim=16, num_layers=3, mlp_dims=(16, 16), dropout=0.2),
    )
    model = dcn.Model(field_dims=(6, 9), **config.model)
    ids = random_ids(4, field_dims=(6, 9))
    out = model.apply(model.init(jax.random.key(0), ids), ids)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)


if __name__ == '__main__':
  absltest.main()
