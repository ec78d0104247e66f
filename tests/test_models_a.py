"""Model-specific tests of FFM, FNN, Wide & Deep and AFM.

Closed forms against brute force, the ways these files differ from pytorch-fm,
and BatchNorm statistics under a 2-device pmap.
"""

import importlib
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
FIELD_DIMS = (7, 11, 5, 4)


def _model(name):
  return importlib.import_module(f'models.{name}')


def _ids(batch, field_dims=FIELD_DIMS, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.integers(0, d, size=batch) for d in field_dims], axis=1
  ).astype(np.int32)


def _randomize(tree, seed):
  """Replaces every leaf, zero-initialised ones too, by N(0, 0.5^2) numbers."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (0.5 * rng.normal(size=np.shape(x))).astype(np.float32), tree
  )


def _rows(ids, field_dims):
  return ids + np.cumsum((0,) + tuple(field_dims[:-1]))


class FieldAwareFactorizationMachineTest(absltest.TestCase):
  def test_pairwise_term_matches_brute_force(self):
    ffm = _model('ffm')
    v = np.random.default_rng(0).normal(size=(5, 4, 4, 3)).astype(np.float32)
    brute = np.zeros(5)
    for f in range(4):
      for g in range(f + 1, 4):
        # v_{x_f, g} . v_{x_g, f}
        brute += np.sum(v[:, f, g] * v[:, g, f], axis=-1)
    out = ffm.FieldAwareFactorizationMachine().apply({}, v)
    np.testing.assert_allclose(out, brute, rtol=1e-5, atol=1e-5)

  def test_model_equals_linear_plus_field_aware_pairs_by_hand(self):
    ffm = _model('ffm')
    model = ffm.Model(field_dims=FIELD_DIMS, embed_dim=3)
    ids = _ids(6)
    params = _randomize(model.init(jax.random.key(0), ids)['params'], 1)
    out = model.apply({'params': params}, ids)
    w = np.asarray(params['FeaturesLinear_0']['weight'])[:, 0]
    b = float(params['FeaturesLinear_0']['bias'][0])
    table = np.asarray(params['FieldAwareEmbedding_0']['embedding'])
    for i, rows in enumerate(_rows(ids, FIELD_DIMS)):
      expected = b + w[rows].sum()
      for f in range(len(rows)):
        for g in range(f + 1, len(rows)):
          expected += table[rows[f], g] @ table[rows[g], f]
      self.assertAlmostEqual(float(out[i]), expected, places=4)

  def test_each_field_slice_is_xavier_uniform(self):
    # Each [ids, dim] slice has pytorch-fm's per-table bound sqrt(6 / (n + d)).
    ffm = _model('ffm')
    field_dims, dim = (300, 500), 4
    model = ffm.Model(field_dims=field_dims, embed_dim=dim)
    table = model.init(jax.random.key(0), _ids(2, field_dims))['params'][
      'FieldAwareEmbedding_0'
    ]['embedding']
    bound = np.sqrt(6.0 / (sum(field_dims) + dim))
    self.assertEqual(table.shape, (800, 2, dim))
    self.assertLessEqual(float(jnp.max(jnp.abs(table))), bound)
    self.assertGreater(float(jnp.max(jnp.abs(table))), 0.95 * bound)


class FactorizationSupportedNeuralNetworkTest(absltest.TestCase):
  def test_mlp_input_is_linear_weight_and_factor_per_field(self):
    fnn = _model('fnn')
    model = fnn.Model(field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(5,))
    ids = _ids(8)
    variables = model.init(jax.random.key(0), ids)
    params = _randomize(variables['params'], 1)
    stats = variables['batch_stats']
    out = model.apply({'params': params, 'batch_stats': stats}, ids)
    rows = _rows(ids, FIELD_DIMS)
    w = np.asarray(params['FeaturesLinear_0']['weight'])[rows]  # [B, F, 1]
    v = np.asarray(params['FeaturesEmbedding_0']['embedding'])[rows]
    z = np.concatenate([w, v], axis=-1).reshape(len(ids), -1)  # [B, F*4]
    mlp = fnn.MultiLayerPerceptron((5,))
    expected = mlp.apply(
      {
        'params': params['MultiLayerPerceptron_0'],
        'batch_stats': stats['MultiLayerPerceptron_0'],
      },
      z,
      train=False,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

  def test_fm_checkpoint_fills_embedding_and_linear_weights(self):
    # The trainer's warm start copies leaves whose path and shape match.
    fm, fnn = _model('fm'), _model('fnn')
    ids = _ids(4)
    fm_params = fm.Model(field_dims=FIELD_DIMS, embed_dim=16).init(
      jax.random.key(0), ids
    )['params']
    fnn_params = fnn.Model(field_dims=FIELD_DIMS, embed_dim=16).init(
      jax.random.key(1), ids
    )['params']
    fm_leaves = {
      jax.tree_util.keystr(p): x.shape
      for p, x in jax.tree_util.tree_leaves_with_path(fm_params)
    }
    fnn_leaves = {
      jax.tree_util.keystr(p): x.shape
      for p, x in jax.tree_util.tree_leaves_with_path(fnn_params)
    }
    shared = {k for k in fm_leaves if fnn_leaves.get(k) == fm_leaves[k]}
    self.assertEqual(
      shared,
      {
        "['FeaturesEmbedding_0']['embedding']",
        "['FeaturesLinear_0']['weight']",
      },
    )

  def test_without_fm_linear_inputs_only_factors_feed_the_mlp(self):
    fnn = _model('fnn')
    model = fnn.Model(
      field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(5,), fm_linear_inputs=False
    )
    params = model.init(jax.random.key(0), _ids(2))['params']
    self.assertNotIn('FeaturesLinear_0', params)
    kernel = params['MultiLayerPerceptron_0']['Dense_0']['kernel']
    self.assertEqual(kernel.shape, (len(FIELD_DIMS) * 3, 5))


class WideAndDeepTest(parameterized.TestCase):
  def _wide_cross(self, field_dims, cross_fields, buckets, ids):
    wd = _model('wd')
    layer = wd.CrossProductLinear(field_dims, cross_fields, buckets)
    params = _randomize(layer.init(jax.random.key(0), ids)['params'], 2)
    return layer.apply({'params': params}, ids), params['weight'][:, 0]

  def test_cross_product_is_exact_when_the_pairs_fit(self):
    ids = _ids(9)
    cross_fields = ((0, 1), (3, 2))
    out, w = self._wide_cross(FIELD_DIMS, cross_fields, 1000, ids)
    self.assertLen(w, 7 * 11 + 4 * 5)
    expected = w[ids[:, 0] * 11 + ids[:, 1]] + w[77 + ids[:, 3] * 5 + ids[:, 2]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)

  def test_each_pair_of_ids_has_its_own_weight_when_exact(self):
    field_dims = (3, 4)
    ids = np.array([[a, b] for a in range(3) for b in range(4)], np.int32)
    wd = _model('wd')
    layer = wd.CrossProductLinear(field_dims, ((0, 1),), 1000)
    params = {'weight': np.arange(12, dtype=np.float32)[:, None]}
    out = layer.apply({'params': params}, ids)
    np.testing.assert_array_equal(np.sort(out), np.arange(12))

  def test_cross_product_is_hashed_into_the_buckets(self):
    ids = _ids(9)
    out, w = self._wide_cross(FIELD_DIMS, ((1, 0),), 10, ids)
    self.assertLen(w, 10)
    np.testing.assert_allclose(
      out, w[(ids[:, 1] * 7 + ids[:, 0]) % 10], rtol=1e-6
    )

  def test_huge_fields_wrap_in_uint32_instead_of_overflowing(self):
    field_dims = (200_000, 300_000)
    ids = np.array([[199_999, 299_999], [12_345, 67_890]], np.int32)
    out, w = self._wide_cross(field_dims, ((0, 1),), 1 << 20, ids)
    pair = ids[:, 0].astype(np.uint64) * 300_000 + ids[:, 1].astype(np.uint64)
    bucket = (pair % (1 << 32)) % (1 << 20)
    np.testing.assert_allclose(out, w[bucket], rtol=1e-6)

  @parameterized.parameters(((0, 0),), ((0, 4),), ((-1, 1),))
  def test_invalid_cross_fields_raise(self, cross):
    wd = _model('wd')
    model = wd.Model(field_dims=FIELD_DIMS, cross_fields=(cross,))
    with self.assertRaisesRegex(ValueError, 'cross_fields'):
      model.init(jax.random.key(0), _ids(2))

  def test_crosses_from_a_config_list_add_to_the_wide_part(self):
    # ConfigDict may hand over lists; the cross term adds to the logit.
    wd = _model('wd')
    ids = _ids(6)
    plain = wd.Model(field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(4,))
    crossed = wd.Model(
      field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(4,), cross_fields=[[0, 2]]
    )
    variables = crossed.init(jax.random.key(0), ids)
    params = _randomize(variables['params'], 3)
    stats = variables['batch_stats']
    out = crossed.apply({'params': params, 'batch_stats': stats}, ids)
    cross = params.pop('CrossProductLinear_0')['weight'][:, 0]
    base = plain.apply({'params': params, 'batch_stats': stats}, ids)
    np.testing.assert_allclose(
      out, base + cross[ids[:, 0] * 5 + ids[:, 2]], rtol=1e-5, atol=1e-6
    )


class AttentionalFactorizationMachineTest(absltest.TestCase):
  def test_attention_pooling_matches_brute_force(self):
    afm = _model('afm')
    layer = afm.AttentionalFactorizationMachine(attn_size=3)
    v = np.random.default_rng(0).normal(size=(5, 4, 6)).astype(np.float32)
    params = _randomize(
      layer.init(jax.random.key(0), v, train=False)['params'], 4
    )
    out = layer.apply({'params': params}, v, train=False)
    W = params['attention']['kernel']  # [D, A]
    b = params['attention']['bias']  # [A]
    h = params['projection']['kernel'][:, 0]  # [A]
    p = params['fc']['kernel'][:, 0]  # [D]
    for i in range(5):
      products, scores = [], []
      for f in range(4):
        for g in range(f + 1, 4):
          prod = v[i, f] * v[i, g]
          products.append(prod)
          scores.append(h @ np.maximum(prod @ W + b, 0.0))
      a = np.exp(np.array(scores) - max(scores))
      a /= a.sum()
      pooled = sum(a_fg * prod for a_fg, prod in zip(a, products, strict=True))
      self.assertAlmostEqual(float(out[i]), float(p @ pooled), places=4)

  def test_eval_has_no_dropout_unlike_pytorch_fm(self):
    # The fixture's torch AFM with dropouts (0.2, 0.2) gives two different
    # outputs in eval mode; ours with the same rates is deterministic and
    # equals torch's dropout-free output.
    data = np.load(os.path.join(FIXTURES, 'torchfm_afm.npz'))
    torch_runs = data['eval_dropout_probs']
    self.assertGreater(np.max(np.abs(torch_runs[0] - torch_runs[1])), 1e-3)
    self.assertGreater(np.max(np.abs(torch_runs[0] - data['probs'])), 1e-3)
    afm = _model('afm')
    model = afm.Model(
      field_dims=tuple(int(d) for d in data['field_dims']),
      embed_dim=4,
      attn_size=3,
      dropouts=(0.2, 0.2),
    )
    w = {k[2:]: data[k] for k in data.files if k.startswith('w/')}
    variables = {
      'params': {
        'FeaturesLinear_0': {
          'weight': w['linear.fc.weight'],
          'bias': w['linear.bias'] + w['afm.fc.bias'],
        },
        'FeaturesEmbedding_0': {'embedding': w['embedding.embedding.weight']},
        'AttentionalFactorizationMachine_0': {
          'attention': {
            'kernel': w['afm.attention.weight'].T,
            'bias': w['afm.attention.bias'],
          },
          'projection': {'kernel': w['afm.projection.weight'].T},
          'fc': {'kernel': w['afm.fc.weight'].T},
        },
      }
    }
    first = model.apply(variables, data['ids'], train=False)
    second = model.apply(variables, data['ids'], train=False)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(
      jax.nn.sigmoid(first), data['probs'], rtol=1e-5, atol=1e-5
    )

  def test_attention_l2_is_sown_only_in_training(self):
    afm = _model('afm')
    ids = _ids(4)
    model = afm.Model(field_dims=FIELD_DIMS, embed_dim=4, attn_l2=0.3)
    variables = model.init(jax.random.key(0), ids)
    kernel = variables['params']['AttentionalFactorizationMachine_0'][
      'attention'
    ]['kernel']
    _, state = model.apply(
      variables,
      ids,
      train=True,
      rngs={'dropout': jax.random.key(1)},
      mutable=['losses'],
    )
    (value,) = jax.tree.leaves(state['losses'])
    self.assertAlmostEqual(
      float(value), 0.3 * float(jnp.sum(kernel**2)), places=5
    )
    _, state = model.apply(variables, ids, train=False, mutable=['losses'])
    self.assertEmpty(jax.tree.leaves(state))
    off = afm.Model(field_dims=FIELD_DIMS, embed_dim=4)
    _, state = off.apply(
      variables,
      ids,
      train=True,
      rngs={'dropout': jax.random.key(1)},
      mutable=['losses'],
    )
    self.assertEmpty(jax.tree.leaves(state))

  def test_score_and_output_projections_have_no_bias(self):
    # A score bias is cancelled by the softmax; an output bias duplicates w_0.
    afm = _model('afm')
    params = afm.Model(field_dims=FIELD_DIMS).init(jax.random.key(0), _ids(2))
    layer = params['params']['AttentionalFactorizationMachine_0']
    self.assertEqual(set(layer['projection']), {'kernel'})
    self.assertEqual(set(layer['fc']), {'kernel'})


class BatchNormAcrossDevicesTest(parameterized.TestCase):
  @parameterized.parameters('fnn', 'wd')
  def test_pmap_statistics_equal_the_global_batch(self, name):
    self.assertEqual(jax.local_device_count(), 2)
    module = _model(name)
    kwargs = dict(embed_dim=3, mlp_dims=(5, 4), dropout=0.0)
    ids = _ids(16, seed=5)
    # Devices see different ids, so per-device statistics differ.
    ids[8:] = _ids(8, seed=6) % 2
    single = module.Model(field_dims=FIELD_DIMS, **kwargs)
    variables = single.init(jax.random.key(0), ids)
    variables = {
      'params': _randomize(variables['params'], 7),
      'batch_stats': variables['batch_stats'],
    }

    def update(model, ids):
      _, state = model.apply(
        variables,
        ids,
        train=True,
        rngs={'dropout': jax.random.key(1)},
        mutable=['batch_stats'],
      )
      return state['batch_stats']

    expected = update(single, ids)
    shards = ids.reshape(2, 8, -1)
    synced = module.Model(field_dims=FIELD_DIMS, axis_name='batch', **kwargs)
    got = jax.pmap(lambda x: update(synced, x), axis_name='batch')(shards)
    local = jax.pmap(lambda x: update(single, x), axis_name='batch')(shards)
    flat_expected = jax.tree.leaves(expected)
    for replicas, want in zip(jax.tree.leaves(got), flat_expected, strict=True):
      np.testing.assert_allclose(replicas[0], want, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(replicas[1], want, rtol=1e-5, atol=1e-6)
    # Without the axis name each device keeps its own, different statistics.
    self.assertFalse(
      all(
        np.allclose(replicas[0], want, rtol=1e-5, atol=1e-6)
        for replicas, want in zip(
          jax.tree.leaves(local), flat_expected, strict=True
        )
      )
    )


if __name__ == '__main__':
  absltest.main()
