"""Each model's equation, checked against brute force.

Interactions against numpy loops over field pairs, eval-mode outputs against
numpy forward passes written from each paper's equation, the Wide & Deep
cross products and their hash, and the argument checks and warm-start names
of each model.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from model_tables import module
from model_testing import np_batchnorm
from model_testing import np_linear
from model_testing import np_mlp
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import randomize
import numpy as np

FIELD_DIMS = (7, 11, 5, 4)
OFFSETS = offsets(FIELD_DIMS)


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


class FactorizationMachineTest(absltest.TestCase):
  def test_pairwise_term_matches_brute_force(self):
    fm = module('fm')
    x = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    brute = np.zeros(5)
    for f in range(4):
      for g in range(f + 1, 4):
        brute += np.sum(x[:, f] * x[:, g], axis=-1)
    out = fm.FactorizationMachine(reduce_sum=True).apply({}, x)
    np.testing.assert_allclose(out, brute, rtol=1e-5, atol=1e-5)
    per_dim = fm.FactorizationMachine(reduce_sum=False).apply({}, x)
    np.testing.assert_allclose(per_dim.sum(-1), brute, rtol=1e-5, atol=1e-5)

  def test_model_equals_linear_plus_pairwise_by_hand(self):
    fm = module('fm')
    field_dims = (7, 11, 5)
    model = fm.Model(field_dims=field_dims, embed_dim=3)
    ids = random_ids(batch=6, field_dims=field_dims)
    params = model.init(jax.random.key(0), ids)['params']
    rng = np.random.default_rng(1)
    params = jax.tree.map(
      lambda x: rng.normal(size=x.shape).astype(np.float32), params
    )
    out = model.apply({'params': params}, ids)
    w = np.asarray(params['FeaturesLinear_0']['weight'])[:, 0]
    b = float(params['FeaturesLinear_0']['bias'][0])
    v = np.asarray(params['FeaturesEmbedding_0']['embedding'])
    for i, rows in enumerate(ids + offsets(field_dims)):
      expected = b + w[rows].sum()
      for f in range(len(rows)):
        for g in range(f + 1, len(rows)):
          expected += v[rows[f]] @ v[rows[g]]
      self.assertAlmostEqual(float(out[i]), expected, places=4)


class FieldAwareFactorizationMachineTest(absltest.TestCase):
  def test_pairwise_term_matches_brute_force(self):
    ffm = module('ffm')
    v = np.random.default_rng(0).normal(size=(5, 4, 4, 3)).astype(np.float32)
    brute = np.zeros(5)
    for f in range(4):
      for g in range(f + 1, 4):
        # v_{x_f, g} . v_{x_g, f}
        brute += np.sum(v[:, f, g] * v[:, g, f], axis=-1)
    out = ffm.FieldAwareFactorizationMachine().apply({}, v)
    np.testing.assert_allclose(out, brute, rtol=1e-5, atol=1e-5)

  def test_model_equals_linear_plus_field_aware_pairs_by_hand(self):
    ffm = module('ffm')
    model = ffm.Model(field_dims=FIELD_DIMS, embed_dim=3)
    ids = random_ids(6, FIELD_DIMS)
    params = randomize(model.init(jax.random.key(0), ids)['params'], 1)
    out = model.apply({'params': params}, ids)
    w = np.asarray(params['FeaturesLinear_0']['weight'])[:, 0]
    b = float(params['FeaturesLinear_0']['bias'][0])
    table = np.asarray(params['FieldAwareEmbedding_0']['embedding'])
    for i, rows in enumerate(ids + OFFSETS):
      expected = b + w[rows].sum()
      for f in range(len(rows)):
        for g in range(f + 1, len(rows)):
          expected += table[rows[f], g] @ table[rows[g], f]
      self.assertAlmostEqual(float(out[i]), expected, places=4)

  def test_each_field_slice_is_xavier_uniform(self):
    # Each [ids, dim] slice has pytorch-fm's per-table bound sqrt(6 / (n + d)).
    ffm = module('ffm')
    field_dims, dim = (300, 500), 4
    model = ffm.Model(field_dims=field_dims, embed_dim=dim)
    table = model.init(jax.random.key(0), random_ids(2, field_dims))['params'][
      'FieldAwareEmbedding_0'
    ]['embedding']
    bound = np.sqrt(6.0 / (sum(field_dims) + dim))
    self.assertEqual(table.shape, (800, 2, dim))
    self.assertLessEqual(float(jnp.max(jnp.abs(table))), bound)
    self.assertGreater(float(jnp.max(jnp.abs(table))), 0.95 * bound)


class FactorizationSupportedNeuralNetworkTest(absltest.TestCase):
  def test_mlp_input_is_linear_weight_and_factor_per_field(self):
    fnn = module('fnn')
    model = fnn.Model(field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(5,))
    ids = random_ids(8, FIELD_DIMS)
    variables = model.init(jax.random.key(0), ids)
    params = randomize(variables['params'], 1)
    stats = variables['batch_stats']
    out = model.apply({'params': params, 'batch_stats': stats}, ids)
    rows = ids + OFFSETS
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
    fm, fnn = module('fm'), module('fnn')
    ids = random_ids(4, FIELD_DIMS)
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
    fnn = module('fnn')
    model = fnn.Model(
      field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(5,), fm_linear_inputs=False
    )
    params = model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))['params']
    self.assertNotIn('FeaturesLinear_0', params)
    kernel = params['MultiLayerPerceptron_0']['Dense_0']['kernel']
    self.assertEqual(kernel.shape, (len(FIELD_DIMS) * 3, 5))


def _murmur3_32(data: bytes, seed: int = 0) -> int:
  """MurmurHash3_x86_32 of `data`, written from Austin Appleby's reference."""
  mask = 0xFFFFFFFF

  def rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & mask

  def scramble(k):
    return rotl(k * 0xCC9E2D51 & mask, 15) * 0x1B873593 & mask

  h = seed
  body = len(data) // 4 * 4
  for i in range(0, body, 4):
    h ^= scramble(int.from_bytes(data[i : i + 4], 'little'))
    h = (rotl(h, 13) * 5 + 0xE6546B64) & mask
  if len(data) > body:
    h ^= scramble(int.from_bytes(data[body:], 'little'))
  h ^= len(data)
  h = (h ^ (h >> 16)) * 0x85EBCA6B & mask
  h = (h ^ (h >> 13)) * 0xC2B2AE35 & mask
  return h ^ (h >> 16)


def _pair_bucket(a, b, buckets):
  """The hashed bucket of the id pair `(a, b)`, as models/wd.py documents."""
  key = int(a).to_bytes(4, 'little') + int(b).to_bytes(4, 'little')
  return _murmur3_32(key) % buckets


class WideAndDeepTest(parameterized.TestCase):
  def _wide_cross(self, field_dims, cross_fields, buckets, ids):
    wd = module('wd')
    layer = wd.CrossProductLinear(field_dims, cross_fields, buckets)
    params = randomize(layer.init(jax.random.key(0), ids)['params'], 2)
    return layer.apply({'params': params}, ids), params['weight'][:, 0]

  def _buckets(self, field_dims, buckets, ids):
    """The bucket of each row's pair (fields 0 x 1): `[batch]` int."""
    wd = module('wd')
    layer = wd.CrossProductLinear(field_dims, ((0, 1),), buckets)
    size = min(field_dims[0] * field_dims[1], buckets)
    # Weight i = i, so the output names the bucket (exact in float32).
    params = {'weight': np.arange(size, dtype=np.float32)[:, None]}
    return np.asarray(layer.apply({'params': params}, ids)).astype(np.int64)

  def test_buckets_out_of_range_name_the_model_argument(self):
    # Copied alone, the inner layer's check named num_buckets at the first
    # call, not the cross_buckets the user set.
    wd = module('wd')
    for buckets in (0, -1, 2**31):
      with self.assertRaisesRegex(
        ValueError,
        r'^config\.model\.cross_buckets must be in \[1, 2\*\*31\); got'
        f' {buckets}\\.$',
      ):
        wd.WideAndDeep(
          FIELD_DIMS, cross_fields=((0, 1),), cross_buckets=buckets
        )

  def test_cross_fields_out_of_range_name_the_config_key(self):
    # With multi-hot and numeric fields, (0, 4) may look like a cross with
    # the first of them: it failed at the first call, naming the inner
    # layer's argument, and not why 4 is out of range.
    wd = module('wd')
    for pair in ((0, 4), (2, 2), (-1, 0)):
      with self.assertRaisesRegex(
        ValueError,
        r'^config\.model\.cross_fields entry \(-?\d, \d\) must name two'
        r' different one-hot fields, columns of ids in \[0, 4\): multi-hot'
        r' and numeric fields are not crossed\.$',
      ):
        wd.WideAndDeep(
          FIELD_DIMS, multi_field_dims=(3,), num_dense=1, cross_fields=(pair,)
        )
    wd.WideAndDeep(FIELD_DIMS, cross_fields=((3, 0),))  # In range.

  def test_cross_product_is_exact_when_the_pairs_fit(self):
    ids = random_ids(9, FIELD_DIMS)
    cross_fields = ((0, 1), (3, 2))
    out, w = self._wide_cross(FIELD_DIMS, cross_fields, 1000, ids)
    self.assertLen(w, 7 * 11 + 4 * 5)
    expected = w[ids[:, 0] * 11 + ids[:, 1]] + w[77 + ids[:, 3] * 5 + ids[:, 2]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)

  def test_each_pair_of_ids_has_its_own_weight_when_exact(self):
    ids = np.array([[a, b] for a in range(3) for b in range(4)], np.int32)
    np.testing.assert_array_equal(
      self._buckets((3, 4), 1000, ids), np.arange(12)
    )
    # The product exactly filling the buckets is still exact.
    np.testing.assert_array_equal(self._buckets((3, 4), 12, ids), np.arange(12))

  def test_reference_hash_reproduces_published_murmur3_values(self):
    for data, seed, expected in (
      (b'', 0, 0),
      (b'', 1, 0x514E28B7),
      (b'\0\0\0\0', 0, 0x2362F9DE),
      (b'aaaa', 0x9747B28C, 0x5A97808A),
      (b'Hello, world!', 0x9747B28C, 0x24884CBA),
      (b'\x21\x43\x65\x87', 0, 0xF55B516B),
    ):
      self.assertEqual(_murmur3_32(data, seed), expected, data)

  def test_cross_product_is_hashed_into_the_buckets(self):
    ids = random_ids(9, FIELD_DIMS)
    out, w = self._wide_cross(FIELD_DIMS, ((1, 0),), 10, ids)
    self.assertLen(w, 10)
    expected = [_pair_bucket(a, b, 10) for a, b in ids[:, [1, 0]]]
    np.testing.assert_allclose(out, w[expected], rtol=1e-6)

  def test_huge_fields_hash_without_overflow(self):
    field_dims = (200_000, 300_000)
    ids = np.array(
      [[199_999, 299_999], [12_345, 67_890], [0, 0], [199_999, 0]], np.int32
    )
    expected = [_pair_bucket(a, b, 1 << 20) for a, b in ids]
    np.testing.assert_array_equal(
      self._buckets(field_dims, 1 << 20, ids), expected
    )

  def test_hash_uses_both_ids_when_a_field_size_is_a_multiple_of_buckets(
    self,
  ):
    # `(x_f * d_g + x_g) mod buckets` ignores x_f when d_g is a multiple of
    # the buckets: every x_f would share x_g's weight. A hash of the pair
    # separates two pairs that share one id as often as random buckets do,
    # 1 - 1 / buckets of the time.
    field_dims, buckets = (50, 40), 20
    grid = np.array([[a, b] for a in range(50) for b in range(40)], np.int32)
    table = self._buckets(field_dims, buckets, grid).reshape(50, 40)
    for axis, shared_id in ((1, 'x_g'), (0, 'x_f')):
      # Pairs with the same id in one field and different ids in the other.
      lines = np.moveaxis(table, axis, 0)  # [shared id, other id]
      same = lines[:, :, None] == lines[:, None, :]
      n = lines.shape[1]
      pairs = lines.shape[0] * n * (n - 1)
      rate = (same.sum() - lines.size) / pairs
      with self.subTest(shared_id):
        self.assertLess(rate, 1.0 / buckets + 0.02)

  def test_collisions_match_the_birthday_expectation(self):
    # k = 64 x 64 structured pairs (small consecutive ids, as encoded data
    # has) into m buckets with d_g a multiple of m: the number of distinct
    # buckets must be that of k uniform random draws, within 6 standard
    # deviations. The old modulo gave 64.
    m = 1 << 14
    grid = np.array([[a, b] for a in range(64) for b in range(64)], np.int32)
    distinct = len(np.unique(self._buckets((1000, 1 << 16), m, grid)))
    k = len(grid)
    empty = m * (1 - 1 / m) ** k
    var_empty = (
      m * (m - 1) * (1 - 2 / m) ** k
      + m * (1 - 1 / m) ** k
      - m**2 * (1 - 1 / m) ** (2 * k)
    )
    self.assertLess(abs(distinct - (m - empty)), 6 * np.sqrt(var_empty))

  @parameterized.parameters(((0, 0),), ((0, 4),), ((-1, 1),))
  def test_invalid_cross_fields_raise(self, cross):
    wd = module('wd')
    with self.assertRaisesRegex(ValueError, 'cross_fields'):  # Built: raised.
      model = wd.Model(field_dims=FIELD_DIMS, cross_fields=(cross,))
      model.init(jax.random.key(0), random_ids(2, FIELD_DIMS))
    # The inner layer, copied alone, checks its own.
    layer = wd.CrossProductLinear(FIELD_DIMS, (cross,), 10)
    with self.assertRaisesRegex(ValueError, '^cross_fields entry'):
      layer.init(jax.random.key(0), random_ids(2, FIELD_DIMS))

  def test_crosses_from_a_config_list_add_to_the_wide_part(self):
    # ConfigDict may hand over lists; the cross term adds to the logit.
    wd = module('wd')
    ids = random_ids(6, FIELD_DIMS)
    plain = wd.Model(field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(4,))
    crossed = wd.Model(
      field_dims=FIELD_DIMS, embed_dim=3, mlp_dims=(4,), cross_fields=[[0, 2]]
    )
    variables = crossed.init(jax.random.key(0), ids)
    params = randomize(variables['params'], 3)
    stats = variables['batch_stats']
    out = crossed.apply({'params': params, 'batch_stats': stats}, ids)
    cross = params.pop('CrossProductLinear_0')['weight'][:, 0]
    base = plain.apply({'params': params, 'batch_stats': stats}, ids)
    np.testing.assert_allclose(
      out, base + cross[ids[:, 0] * 5 + ids[:, 2]], rtol=1e-5, atol=1e-6
    )


class AttentionalFactorizationMachineTest(absltest.TestCase):
  def test_attention_pooling_matches_brute_force(self):
    afm = module('afm')
    layer = afm.AttentionalFactorizationMachine(attn_size=3)
    v = np.random.default_rng(0).normal(size=(5, 4, 6)).astype(np.float32)
    params = randomize(
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

  def test_score_and_output_projections_have_no_bias(self):
    # A score bias is cancelled by the softmax; an output bias duplicates w_0.
    afm = module('afm')
    params = afm.Model(field_dims=FIELD_DIMS).init(
      jax.random.key(0), random_ids(2, FIELD_DIMS)
    )
    layer = params['params']['AttentionalFactorizationMachine_0']
    self.assertEqual(set(layer['projection']), {'kernel'})
    self.assertEqual(set(layer['fc']), {'kernel'})


class InteractionTest(absltest.TestCase):
  def test_nfm_bi_interaction_matches_brute_force(self):
    nfm = module('nfm')
    v = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    out = nfm.FactorizationMachine(reduce_sum=False).apply({}, v)
    self.assertEqual(out.shape, (5, 3))
    np.testing.assert_allclose(
      out, _brute_bi_interaction(v), rtol=1e-5, atol=1e-5
    )

  def test_fnfm_pairs_match_brute_force(self):
    fnfm = module('fnfm')
    ids = random_ids(6, FIELD_DIMS)
    embedding = fnfm.FieldAwareEmbedding(FIELD_DIMS, 3)
    variables = random_variables(embedding, ids)
    v = embedding.apply(variables, ids)  # [B, F, F, D]
    out = fnfm.FieldAwareBiInteraction().apply({}, v)
    table = np.asarray(variables['params']['embedding'])
    brute = _brute_field_aware_pairs(table, ids)
    self.assertEqual(out.shape, (6, 6 * 3))
    np.testing.assert_allclose(out, brute, rtol=1e-6, atol=1e-6)

  def test_upper_triangle_and_its_gradient_by_hand(self):
    # fnfm.upper_triangle has its own gradient (a gather): the cotangent of
    # pair p lands on entry (f, g) of the p-th pair f < g, zero elsewhere.
    fnfm = module('fnfm')
    rng = np.random.default_rng(0)
    for n in (2, 3, 6):
      m = rng.normal(size=(4, n, n, 3)).astype(np.float32)
      pairs = [(f, g) for f in range(n) for g in range(f + 1, n)]
      cotangent = rng.normal(size=(4, len(pairs), 3)).astype(np.float32)
      out, vjp = jax.vjp(fnfm.upper_triangle, jnp.asarray(m))
      (grad,) = vjp(jnp.asarray(cotangent))
      expected = np.zeros_like(m)
      for p, (f, g) in enumerate(pairs):
        expected[:, f, g] = cotangent[:, p]
      np.testing.assert_array_equal(
        out, np.stack([m[:, f, g] for f, g in pairs], 1)
      )
      np.testing.assert_array_equal(grad, expected)


class ForwardTest(absltest.TestCase):
  """Eval-mode outputs against numpy forward passes of each equation."""

  def test_nfm(self):
    model = module('nfm').Model(FIELD_DIMS, embed_dim=3, mlp_dims=(5, 4))
    ids = random_ids(8, FIELD_DIMS)
    variables = random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    v = np.asarray(p['FeaturesEmbedding_0']['embedding'])[ids + OFFSETS]
    bi = np_batchnorm(
      _brute_bi_interaction(v), p['BatchNorm_0'], s['BatchNorm_0']
    )
    expected = np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS) + np_mlp(
      bi, p['MultiLayerPerceptron_0'], s['MultiLayerPerceptron_0'], 2
    )
    out = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_fnfm(self):
    model = module('fnfm').Model(FIELD_DIMS, embed_dim=3, mlp_dims=(5,))
    ids = random_ids(8, FIELD_DIMS)
    variables = random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    table = np.asarray(p['FieldAwareEmbedding_0']['embedding'])
    z = _brute_field_aware_pairs(table, ids)
    z = np_batchnorm(z, p['BatchNorm_0'], s['BatchNorm_0'])
    expected = np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS) + np_mlp(
      z, p['MultiLayerPerceptron_0'], s['MultiLayerPerceptron_0'], 1
    )
    out = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_deepfm(self):
    model = module('deepfm').Model(FIELD_DIMS, embed_dim=3, mlp_dims=(5, 4))
    ids = random_ids(8, FIELD_DIMS)
    variables = random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    v = np.asarray(p['FeaturesEmbedding_0']['embedding'])[ids + OFFSETS]
    pairwise = _brute_bi_interaction(v).sum(axis=1)
    deep = np_mlp(
      v.reshape(8, -1),
      p['MultiLayerPerceptron_0'],
      s['MultiLayerPerceptron_0'],
      2,
    )
    expected = (
      np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS) + pairwise + deep
    )
    out = model.apply(variables, ids, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  def test_ncf(self):
    model = module('ncf').Model(
      FIELD_DIMS,
      user_field_idx=2,
      item_field_idx=0,
      embed_dim=3,
      mlp_dims=(5, 4),
    )
    ids = random_ids(8, FIELD_DIMS)
    variables = random_variables(model, ids)
    p, s = variables['params'], variables['batch_stats']
    e = np.asarray(p['embedding']['embedding'])[ids + OFFSETS]  # [B, F, D]
    # The GMF table holds the user field's rows, then the item field's.
    gmf_table = np.asarray(p['gmf_embedding']['embedding'])
    user_rows = ids[:, 2]
    item_rows = FIELD_DIMS[2] + ids[:, 0]
    gmf = gmf_table[user_rows] * gmf_table[item_rows]
    mlp = np_mlp(
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
    ncf = module('ncf')
    with self.assertRaises(ValueError) as cm:
      ncf.Model(field_dims, user_field_idx=user, item_field_idx=item)
    message = str(cm.exception)
    self.assertIn('config.model.user_field_idx', message)
    self.assertIn('config.model.item_field_idx', message)
    self.assertIn(f'{len(field_dims)} fields', message)


class FnfmTest(absltest.TestCase):
  def test_one_field_is_an_error(self):
    model = module('fnfm').Model((5,))
    with self.assertRaisesRegex(ValueError, 'at least two fields'):
      model.init(jax.random.key(0), np.zeros((2, 1), np.int32))


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
    ids = random_ids(4, FIELD_DIMS)
    shapes = {}
    for model_name, kwargs in ((name, extra), (base, {})):
      model = module(model_name).Model(FIELD_DIMS, embed_dim=4, **kwargs)
      variables = model.init(jax.random.key(0), ids, train=False)
      shapes[model_name] = jax.tree.map(np.shape, variables['params'])
    for block in blocks + ('FeaturesLinear_0',):
      self.assertEqual(shapes[name][block], shapes[base][block], block)


if __name__ == '__main__':
  absltest.main()
