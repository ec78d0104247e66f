"""Model-specific tests for NFM, NCF, FNFM and DeepFM.

Each interaction is checked against a brute-force numpy loop over field
pairs, each model's eval-mode output against a numpy forward pass written
from its equation, and BatchNorm statistics under a 2-device pmap against
those of the global batch on one device.
"""

import importlib
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from configs import deepfm as deepfm_config
from configs import fnfm as fnfm_config
from configs import ncf as ncf_config
from configs import nfm as nfm_config

FIELD_DIMS = (7, 11, 5, 4)
OFFSETS = np.cumsum((0,) + FIELD_DIMS[:-1])
EPS = 1e-5
FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _module(name):
  return importlib.import_module(f'models.{name}')


def _ids(batch, seed=0, field_dims=FIELD_DIMS):
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.integers(0, d, size=batch) for d in field_dims], axis=1
  ).astype(np.int32)


def _random_variables(model, ids, seed=1, **kwargs):
  """Init, then random parameters and BatchNorm statistics everywhere."""
  variables = model.init(jax.random.key(0), ids, **kwargs)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, size=x.shape).astype(np.float32)
    return (0.5 * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)


def _np_batchnorm(x, params, stats):
  """Eval-mode BatchNorm with running statistics."""
  x = (x - stats['mean']) / np.sqrt(stats['var'] + EPS)
  return x * params['scale'] + params['bias']


def _np_mlp(x, params, stats, num_hidden, output_layer=True):
  """Eval-mode MultiLayerPerceptron: dropout is the identity."""
  for i in range(num_hidden):
    dense = params[f'Dense_{i}']
    x = x @ dense['kernel'] + dense['bias']
    x = _np_batchnorm(x, params[f'BatchNorm_{i}'], stats[f'BatchNorm_{i}'])
    x = np.maximum(x, 0.0)
  if output_layer:
    dense = params[f'Dense_{num_hidden}']
    x = (x @ dense['kernel'] + dense['bias'])[:, 0]
  return x


def _np_linear(params, ids):
  w = np.asarray(params['weight'])[:, 0]
  return w[ids + OFFSETS].sum(axis=1) + params['bias'][0]


def _lookup(tree, path):
  for key in path:
    tree = tree[key.key]
  return np.asarray(tree)


def _brute_bi_interaction(v):
  """`sum_{f<g} v_f * v_g` by a loop over field pairs: `[batch, dim]`."""
  out = np.zeros((v.shape[0], v.shape[2]))
  for f in range(v.shape[1]):
    for g in range(f + 1, v.shape[1]):
      out += v[:, f] * v[:, g]
  return out


def _brute_field_aware_pairs(table, ids):
  """`[v_{x_f, g} * v_{x_g, f}]` for f < g from the table `[ids, F, D]`."""
  rows = ids + OFFSETS
  pairs = []
  for f in range(ids.shape[1]):
    for g in range(f + 1, ids.shape[1]):
      pairs.append(table[rows[:, f], g] * table[rows[:, g], f])
  return np.concatenate(pairs, axis=1)  # [B, P * D]


class InteractionTest(absltest.TestCase):
  def test_nfm_bi_interaction_matches_brute_force(self):
    nfm = _module('nfm')
    v = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    out = nfm.FactorizationMachine(reduce_sum=False).apply({}, v)
    self.assertEqual(out.shape, (5, 3))
    np.testing.assert_allclose(
      out, _brute_bi_interaction(v), rtol=1e-5, atol=1e-5
    )

  def test_fnfm_pairs_match_brute_force(self):
    fnfm = _module('fnfm')
    ids = _ids(6)
    embedding = fnfm.FieldAwareEmbedding(FIELD_DIMS, 3)
    variables = _random_variables(embedding, ids)
    v = embedding.apply(variables, ids)  # [B, F, F, D]
    out = fnfm.FieldAwareBiInteraction().apply({}, v)
    table = np.asarray(variables['params']['embedding'])
    brute = _brute_field_aware_pairs(table, ids)
    self.assertEqual(out.shape, (6, 6 * 3))
    np.testing.assert_allclose(out, brute, rtol=1e-6, atol=1e-6)


class ForwardTest(absltest.TestCase):
  """Eval-mode outputs against numpy forward passes of each equation."""

  def test_nfm(self):
    model = _module('nfm').Model(FIELD_DIMS, embed_dim=3, mlp_dims=(5, 4))
    ids = _ids(8)
    variables = _random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    v = np.asarray(p['FeaturesEmbedding_0']['embedding'])[ids + OFFSETS]
    bi = _np_batchnorm(
      _brute_bi_interaction(v), p['BatchNorm_0'], s['BatchNorm_0']
    )
    expected = _np_linear(p['FeaturesLinear_0'], ids) + _np_mlp(
      bi, p['MultiLayerPerceptron_0'], s['MultiLayerPerceptron_0'], 2
    )
    out = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_fnfm(self):
    model = _module('fnfm').Model(FIELD_DIMS, embed_dim=3, mlp_dims=(5,))
    ids = _ids(8)
    variables = _random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    table = np.asarray(p['FieldAwareEmbedding_0']['embedding'])
    z = _brute_field_aware_pairs(table, ids)
    z = _np_batchnorm(z, p['BatchNorm_0'], s['BatchNorm_0'])
    expected = _np_linear(p['FeaturesLinear_0'], ids) + _np_mlp(
      z, p['MultiLayerPerceptron_0'], s['MultiLayerPerceptron_0'], 1
    )
    out = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_deepfm(self):
    model = _module('deepfm').Model(FIELD_DIMS, embed_dim=3, mlp_dims=(5, 4))
    ids = _ids(8)
    variables = _random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    v = np.asarray(p['FeaturesEmbedding_0']['embedding'])[ids + OFFSETS]
    pairwise = _brute_bi_interaction(v).sum(axis=1)
    deep = _np_mlp(
      v.reshape(8, -1),
      p['MultiLayerPerceptron_0'],
      s['MultiLayerPerceptron_0'],
      2,
    )
    expected = _np_linear(p['FeaturesLinear_0'], ids) + pairwise + deep
    out = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_ncf(self):
    model = _module('ncf').Model(
      FIELD_DIMS,
      user_field_idx=2,
      item_field_idx=0,
      embed_dim=3,
      mlp_dims=(5, 4),
    )
    ids = _ids(8)
    variables = _random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    e = np.asarray(p['embedding']['embedding'])[ids + OFFSETS]  # [B, F, D]
    # The GMF table holds the user field's rows, then the item field's.
    gmf_table = np.asarray(p['gmf_embedding']['embedding'])
    user_rows = ids[:, 2]
    item_rows = FIELD_DIMS[2] + ids[:, 0]
    gmf = gmf_table[user_rows] * gmf_table[item_rows]
    mlp = _np_mlp(
      e.reshape(8, -1),
      p['MultiLayerPerceptron_0'],
      s['MultiLayerPerceptron_0'],
      2,
      output_layer=False,
    )
    fused = np.concatenate([gmf, mlp], axis=1)
    expected = (fused @ p['prediction']['kernel'] + p['prediction']['bias'])[
      :, 0
    ]
    out = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


class NcfTest(parameterized.TestCase):
  @parameterized.parameters(
    dict(field_dims=(5,), user=0, item=1),  # no item field
    dict(field_dims=(5, 6), user=None, item=None),  # not set
    dict(field_dims=(5, 6), user=1, item=1),  # the same field twice
    dict(field_dims=(5, 6), user=0, item=-1),  # negative
    dict(field_dims=(5, 6), user=True, item=0),  # not an int
  )
  def test_missing_or_bad_fields_name_the_config_keys(
    self, field_dims, user, item
  ):
    ncf = _module('ncf')
    with self.assertRaises(ValueError) as cm:
      ncf.Model(field_dims, user_field_idx=user, item_field_idx=item)
    message = str(cm.exception)
    self.assertIn('config.model.user_field_idx', message)
    self.assertIn('config.model.item_field_idx', message)
    self.assertIn(f'{len(field_dims)} fields', message)

  def test_paper_variant_has_separate_tables_and_matches_torchfm_when_tied(
    self,
  ):
    # pytorch-fm feeds GMF and MLP from one table; the paper (and our
    # default) gives GMF its own. Loaded with pytorch-fm's table in both
    # places, the default model reproduces pytorch-fm's outputs; with its own
    # GMF table it does not.
    data = np.load(os.path.join(FIXTURES, 'torchfm_ncf.npz'))
    w = {k[2:]: data[k] for k in data.files if k.startswith('w/')}
    ids = data['ids']
    field_dims = tuple(int(d) for d in data['field_dims'])
    ncf = _module('ncf')
    kwargs = dict(
      user_field_idx=0, item_field_idx=1, embed_dim=4, mlp_dims=(8, 6)
    )
    shared = ncf.Model(field_dims, shared_embedding=True, **kwargs)
    paper = ncf.Model(field_dims, **kwargs)
    shared_vars = shared.init(jax.random.key(0), ids)
    paper_vars = paper.init(jax.random.key(0), ids)
    self.assertNotIn('gmf_embedding', shared_vars['params'])
    self.assertEqual(
      paper_vars['params']['gmf_embedding']['embedding'].shape,
      (field_dims[0] + field_dims[1], 4),
    )

    table = w['embedding.embedding.weight']
    mlp = {'Dense_0': {}, 'Dense_1': {}, 'BatchNorm_0': {}, 'BatchNorm_1': {}}
    stats = {'BatchNorm_0': {}, 'BatchNorm_1': {}}
    for i, (lin, bn) in enumerate(((0, 1), (4, 5))):
      mlp[f'Dense_{i}'] = {
        'kernel': w[f'mlp.mlp.{lin}.weight'].T,
        'bias': w[f'mlp.mlp.{lin}.bias'],
      }
      mlp[f'BatchNorm_{i}'] = {
        'scale': w[f'mlp.mlp.{bn}.weight'],
        'bias': w[f'mlp.mlp.{bn}.bias'],
      }
      stats[f'BatchNorm_{i}'] = {
        'mean': w[f'mlp.mlp.{bn}.running_mean'],
        'var': w[f'mlp.mlp.{bn}.running_var'],
      }
    params = {
      'embedding': {'embedding': table},
      'MultiLayerPerceptron_0': mlp,
      'prediction': {'kernel': w['fc.weight'].T, 'bias': w['fc.bias']},
    }
    batch_stats = {'MultiLayerPerceptron_0': stats}
    # User and item rows are the first two fields' rows of the shared table.
    tied = table[: field_dims[0] + field_dims[1]]
    tied_params = {**params, 'gmf_embedding': {'embedding': tied}}
    out = paper.apply({'params': tied_params, 'batch_stats': batch_stats}, ids)
    probs = 1.0 / (1.0 + np.exp(-np.asarray(out, np.float64)))
    np.testing.assert_allclose(probs, data['probs'], rtol=1e-5, atol=1e-5)
    shared_out = shared.apply(
      {'params': params, 'batch_stats': batch_stats}, ids
    )
    np.testing.assert_allclose(out, shared_out, rtol=1e-6, atol=1e-6)

    untied = {**params, 'gmf_embedding': {'embedding': tied + 0.5}}
    out2 = paper.apply({'params': untied, 'batch_stats': batch_stats}, ids)
    self.assertFalse(np.allclose(out2, out, atol=1e-3))


class FnfmTest(absltest.TestCase):
  def test_one_field_is_an_error(self):
    model = _module('fnfm').Model((5,))
    with self.assertRaisesRegex(ValueError, 'at least two fields'):
      model.init(jax.random.key(0), np.zeros((2, 1), np.int32))


# Models with BatchNorm, constructed without dropout so that the only
# difference between the pmap and the single-device run is the statistics.
BATCHNORM_MODELS = {
  'nfm': dict(embed_dim=3, mlp_dims=(5, 4), dropouts=(0.0, 0.0)),
  'ncf': dict(
    user_field_idx=0,
    item_field_idx=1,
    embed_dim=3,
    mlp_dims=(5, 4),
    dropout=0.0,
  ),
  'fnfm': dict(embed_dim=3, mlp_dims=(5, 4), dropouts=(0.0, 0.0)),
  'deepfm': dict(embed_dim=3, mlp_dims=(5, 4), dropout=0.0),
}


class PmapBatchNormTest(parameterized.TestCase):
  @parameterized.named_parameters((n, n) for n in sorted(BATCHNORM_MODELS))
  def test_two_device_statistics_equal_global_batch(self, name):
    num_devices = 2
    self.assertGreaterEqual(jax.local_device_count(), num_devices)
    module = _module(name)
    kwargs = BATCHNORM_MODELS[name]
    single = module.Model(FIELD_DIMS, **kwargs)
    sharded = module.Model(FIELD_DIMS, axis_name='batch', **kwargs)
    ids = _ids(32, seed=3)
    variables = _random_variables(single, ids)

    _, global_state = single.apply(
      variables, ids, train=True, mutable=['batch_stats']
    )

    def step(v, x):
      _, state = sharded.apply(v, x, train=True, mutable=['batch_stats'])
      return state['batch_stats']

    per_device = jax.pmap(
      step,
      axis_name='batch',
      in_axes=(None, 0),
      devices=jax.local_devices()[:num_devices],
    )(variables, ids.reshape(num_devices, -1, ids.shape[1]))
    leaves = jax.tree_util.tree_leaves_with_path(global_state['batch_stats'])
    self.assertGreaterEqual(len(leaves), 4)
    for path, expected in leaves:
      got = _lookup(per_device, path)  # [devices, ...]
      for d in range(num_devices):
        with self.subTest(f'{jax.tree_util.keystr(path)} device {d}'):
          np.testing.assert_allclose(got[d], expected, rtol=1e-5, atol=1e-5)
      # The statistics moved away from their initial values.
      self.assertFalse(
        np.allclose(expected, _lookup(variables['batch_stats'], path))
      )


class WarmStartTest(parameterized.TestCase):
  """The trainer's `init_from` copies parameters whose path and shape match.

  NFM and DeepFM can start from an FM, FNFM from an FFM (the paper's
  pre-training for NFM; a warm start for the others): the shared submodules
  must have the same names and shapes.
  """

  @parameterized.parameters(
    ('nfm', 'fm', dict(mlp_dims=(5,)), ('FeaturesEmbedding_0',)),
    ('deepfm', 'fm', dict(mlp_dims=(5,)), ('FeaturesEmbedding_0',)),
    ('fnfm', 'ffm', dict(mlp_dims=(5,)), ('FieldAwareEmbedding_0',)),
  )
  def test_submodules_match_the_shallow_model(self, name, base, extra, blocks):
    ids = _ids(4)
    shapes = {}
    for model_name, kwargs in ((name, extra), (base, {})):
      model = _module(model_name).Model(FIELD_DIMS, embed_dim=4, **kwargs)
      variables = model.init(jax.random.key(0), ids, train=False)
      shapes[model_name] = jax.tree.map(np.shape, variables['params'])
    for block in blocks + ('FeaturesLinear_0',):
      self.assertEqual(shapes[name][block], shapes[base][block], block)


class ConfigTest(parameterized.TestCase):
  @parameterized.parameters(
    ('nfm', nfm_config, dict(embed_dim=64, mlp_dims=(64,))),
    ('ncf', ncf_config, dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2)),
    ('fnfm', fnfm_config, dict(embed_dim=4, mlp_dims=(64,))),
    ('deepfm', deepfm_config, dict(embed_dim=16, mlp_dims=(16, 16))),
  )
  def test_config_builds_its_model_on_movielens_fields(
    self, name, config_module, expected
  ):
    config = config_module.get_config()
    self.assertEqual(config.model_name, name)
    for key, value in expected.items():
      self.assertEqual(config.model[key], value, key)
    model = _module(name).Model(field_dims=(6, 9), **config.model)
    ids = _ids(4, field_dims=(6, 9))
    variables = model.init(jax.random.key(0), ids, train=False)
    out = model.apply(variables, ids, train=False)
    self.assertEqual(out.shape, (4,))
    self.assertEqual(out.dtype, jnp.float32)


if __name__ == '__main__':
  absltest.main()
