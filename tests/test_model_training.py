"""Training-mode behaviour of the models: dropout, BatchNorm, sown losses.

Every dropout site listed in tests/model_tables.py must act in training and
only there, at its rate and in its place; BatchNorm must normalise with the
batch in training, keep pytorch-fm's running averages and share them across
devices; AFM must sow its attention penalty. Training-mode numbers against
pytorch-fm itself are in tests/test_model_parity.py.
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
from model_tables import DROPOUT_SITES
from model_tables import FIELD_DIMS
from model_tables import MODEL_NAMES
from model_tables import TEST_KWARGS
from model_tables import build
from model_tables import dropout_kwargs
from model_tables import module
from model_testing import apply_train
from model_testing import np_batchnorm
from model_testing import np_linear
from model_testing import np_mlp
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import randomize
import numpy as np

SITES = [
  (f'{name}_{site}', name, site)
  for name in MODEL_NAMES
  for site in DROPOUT_SITES.get(name, {})
]


def _train(model, variables, ids, seed=0):
  """Training-mode logits `[batch]` and the updated BatchNorm statistics."""
  logits, state = model.apply(
    variables,
    ids,
    train=True,
    rngs={'dropout': jax.random.key(seed)},
    mutable=['batch_stats'],
  )
  return np.asarray(logits), state.get('batch_stats', {})


def _setup(name, rates=None, batch=16):
  """A model with the given dropout rates, random variables, and ids."""
  model = build(name, **dropout_kwargs(name, rates))
  ids = random_ids(batch, FIELD_DIMS, seed=3)
  return model, random_variables(model, ids, seed=4), ids


class DropoutTest(parameterized.TestCase):
  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_eval_output_ignores_dropout_rates_and_keys(self, name):
    model, variables, ids = _setup(name)
    expected = model.apply(variables, ids, train=False)
    noisy = build(
      name,
      **dropout_kwargs(name, dict.fromkeys(DROPOUT_SITES.get(name, {}), 0.5)),
    )
    for seed in (1, 2):
      got = noisy.apply(
        variables, ids, train=False, rngs={'dropout': jax.random.key(seed)}
      )
      np.testing.assert_array_equal(got, expected)

  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_training_without_dropout_is_deterministic(self, name):
    # With every listed site at 0 the key must not matter: a dropout that
    # DROPOUT_SITES misses (or a rate that ignores its argument) shows here.
    model, variables, ids = _setup(name)
    first, _ = _train(model, variables, ids, seed=1)
    second, _ = _train(model, variables, ids, seed=2)
    np.testing.assert_array_equal(first, second)
    if 'batch_stats' not in variables:
      # Nothing else differs between the modes.
      expected = model.apply(variables, ids, train=False)
      np.testing.assert_allclose(first, expected, rtol=1e-6, atol=1e-6)

  @parameterized.named_parameters(*SITES)
  def test_each_dropout_site_acts_in_training(self, name, site):
    model, variables, ids = _setup(name)
    off, _ = _train(model, variables, ids)
    # Rate 1 drops everything at this site alone.
    dropped, _ = _train(
      build(name, **dropout_kwargs(name, {site: 1.0})), variables, ids
    )
    self.assertGreater(np.max(np.abs(dropped - off)), 1e-3)
    # Rate 0.5 draws a mask from the key.
    half = build(name, **dropout_kwargs(name, {site: 0.5}))
    first, _ = _train(half, variables, ids, seed=1)
    second, _ = _train(half, variables, ids, seed=2)
    self.assertGreater(np.max(np.abs(first - second)), 1e-3)

  @parameterized.named_parameters(*SITES)
  def test_each_dropout_site_drops_at_its_rate(self, name, site):
    # Each entry of a dropout's input is zeroed or scaled by 1 / (1 - rate),
    # a fraction `rate` of them zeroed: a site that drops at a rate other
    # than its argument (half of it, say) still acts and draws by key, so
    # only the scale and the fraction show it.
    rate = 0.5
    _, variables, ids = _setup(name, batch=64)
    model = build(name, **dropout_kwargs(name, {site: rate}))
    calls = []

    def record(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Dropout):
        calls.append((np.asarray(args[0]), np.asarray(y)))
      return y

    with nn.intercept_methods(record):
      _train(model, variables, ids)
    kept = zeroed = 0
    for x, y in calls:
      if np.array_equal(x, y):  # A site at rate 0.
        continue
      scaled = np.isclose(y, x / (1 - rate), rtol=1e-6, atol=0)
      self.assertTrue(np.all(scaled | (y == 0)))
      live = x != 0
      kept += np.sum(live & scaled & (y != 0))
      zeroed += np.sum(live & (y == 0))
    self.assertGreater(kept + zeroed, 100)
    self.assertAlmostEqual(zeroed / (kept + zeroed), rate, delta=0.1)


MLP_SITES = [(t, name, site) for t, name, site in SITES if site[:3] == 'mlp']


def _np_mlp_dropped(x, params, drawn):
  """An MLP block in training: batch statistics, each hidden layer dropped.

  `drawn`: per hidden layer, its dropout's output (its zeros are the mask)
  and rate.
  """
  dense = [k for k in params if k.startswith('Dense_')]
  has_bn = any(k.startswith('BatchNorm_') for k in params)
  hidden = sum(k.startswith('BatchNorm_') for k in params) or len(dense) - 1
  assert len(drawn) == hidden, f'{len(drawn)} dropouts, {hidden} layers'
  for i, (y, rate) in enumerate(drawn):
    x = x @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}'].get('bias', 0)
    if has_bn:
      x = np_batchnorm(x, params[f'BatchNorm_{i}'])
    x = np.maximum(x, 0.0) * (y != 0) / (1 - rate)
  if len(dense) > hidden:
    out = params[f'Dense_{hidden}']
    x = (x @ out['kernel'] + out['bias'])[:, 0]
  return x


class DropoutPlacementTest(parameterized.TestCase):
  """A site at rate 1 zeroes what the layer after it reads.

  The rate checks above see a site's scale, not where it stands against
  the softmax or BatchNorm next to it; these compare against numpy.
  """

  def _train_at_rate_one(self, name, site):
    _, variables, ids = _setup(name)
    model = build(name, **dropout_kwargs(name, {site: 1.0}))
    logits, _ = _train(model, variables, ids)
    return logits, variables['params'], ids

  @parameterized.named_parameters(*MLP_SITES)
  def test_mlp_drops_each_hidden_layer_by_its_mask(self, name, site):
    # Each MLP block (DeepNetwork in FiBiNET) against numpy with the masks
    # drawn: a dropout after every hidden layer, not only the last.
    _, variables, ids = _setup(name)
    model = build(name, **dropout_kwargs(name, {site: 0.5}))
    blocks, stack = [], []

    def record(next_fun, args, kwargs, context):
      mod = context.module
      if type(mod).__name__ in ('MultiLayerPerceptron', 'DeepNetwork'):
        stack.append([])
        y = next_fun(*args, **kwargs)
        params = jax.tree.map(np.asarray, mod.variables['params'])
        blocks.append((np.asarray(args[0]), np.asarray(y), params, stack.pop()))
        return y
      y = next_fun(*args, **kwargs)
      if isinstance(mod, nn.Dropout) and stack:
        stack[-1].append((np.asarray(y), mod.rate))
      return y

    with nn.intercept_methods(record):
      _train(model, variables, ids)
    self.assertTrue(any(rate for *_, drawn in blocks for _, rate in drawn))
    for x, y, params, drawn in blocks:
      expected = _np_mlp_dropped(x, params, drawn)
      np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)

  @parameterized.parameters('attention', 'pooled')
  def test_afm_dropout_leaves_the_linear_term(self, site):
    # The attention weights (after the softmax: dropped scores would give
    # uniform weights) or the pooled pairs all dropped: no pair term.
    logits, p, ids = self._train_at_rate_one('afm', site)
    expected = np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

  @parameterized.parameters('nfm', 'fnfm')
  def test_interaction_dropout_follows_the_batchnorm(self, name):
    # MLP(mask * BN(pairs) / (1 - rate)) with the mask drawn, batch
    # statistics throughout. (A rate of 1 cannot tell the order: the MLP's
    # first BatchNorm removes the constant BN(0).)
    rate = 0.5
    _, variables, ids = _setup(name)
    model = build(name, **dropout_kwargs(name, {'interaction': rate}))
    outputs = []

    def record(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Dropout) and context.module.rate:
        outputs.append(np.asarray(y))
      return y

    with nn.intercept_methods(record):
      logits, _ = _train(model, variables, ids)
    (dropped,) = outputs
    p = variables['params']
    rows = ids + offsets(FIELD_DIMS)
    pairs = itertools.combinations(range(len(FIELD_DIMS)), 2)
    if name == 'nfm':  # sum_{f<g} v_f * v_g
      v = np.asarray(p['FeaturesEmbedding_0']['embedding'])[rows]
      z = sum(v[:, f] * v[:, g] for f, g in pairs)  # [B, D]
    else:  # [v_{x_f, g} * v_{x_g, f}] for f < g
      v = np.asarray(p['FieldAwareEmbedding_0']['embedding'])
      z = [v[rows[:, f], g] * v[rows[:, g], f] for f, g in pairs]
      z = np.concatenate(z, axis=1)  # [B, P * D]
    z = np_batchnorm(z, p['BatchNorm_0']) * (dropped != 0) / (1 - rate)
    mlp = p['MultiLayerPerceptron_0']
    hidden = len(TEST_KWARGS[name]['mlp_dims'])
    expected = np_linear(p['FeaturesLinear_0'], ids, FIELD_DIMS)
    expected += np_mlp(z, mlp, None, hidden)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


class BatchNormTest(parameterized.TestCase):
  def _setup_batchnorm(self, name):
    model, variables, ids = _setup(name)
    if 'batch_stats' not in variables:
      self.skipTest(f'{name} has no BatchNorm')
    return model, variables, ids

  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_running_statistics_keep_nine_tenths_of_the_old(self, name):
    # torch's BatchNorm1d momentum 0.1 is flax's 0.9 (DESIGN.md 5):
    # new = 0.9 old + 0.1 batch. The batch part does not depend on the old
    # statistics, so two runs from different old ones differ by 0.9 times
    # their difference.
    model, variables, ids = self._setup_batchnorm(name)
    other = randomize(variables['batch_stats'], seed=5)
    _, new = _train(model, variables, ids)
    _, new_other = _train(model, {**variables, 'batch_stats': other}, ids)
    old_leaves = jax.tree_util.tree_leaves_with_path(variables['batch_stats'])
    for (path, old), old2, got, got2 in zip(
      old_leaves,
      jax.tree.leaves(other),
      jax.tree.leaves(new),
      jax.tree.leaves(new_other),
      strict=True,
    ):
      with self.subTest(jax.tree_util.keystr(path)):
        # float32 rounding of the statistics themselves bounds the error.
        scale = max(np.max(np.abs(got)), np.max(np.abs(got2)), 1.0)
        np.testing.assert_allclose(
          got - got2, 0.9 * (old - old2), rtol=1e-4, atol=1e-6 * scale
        )
        # And the statistics moved towards the batch's.
        self.assertGreater(np.max(np.abs(got - old)), 1e-4)

  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_training_normalises_with_the_batch_statistics(self, name):
    # In training the running statistics do not enter the output; in
    # evaluation only they do.
    model, variables, ids = self._setup_batchnorm(name)
    other = {**variables, 'batch_stats': randomize(variables['batch_stats'], 5)}
    train_a, _ = _train(model, variables, ids)
    train_b, _ = _train(model, other, ids)
    np.testing.assert_allclose(train_a, train_b, rtol=1e-5, atol=1e-6)
    eval_a = model.apply(variables, ids, train=False)
    eval_b = model.apply(other, ids, train=False)
    self.assertGreater(np.max(np.abs(eval_a - eval_b)), 1e-3)
    self.assertGreater(np.max(np.abs(eval_a - train_a)), 1e-3)


class SownLossTest(absltest.TestCase):
  def test_attention_l2_is_sown_only_in_training(self):
    afm = module('afm')
    field_dims = (7, 11, 5, 4)
    ids = random_ids(4, field_dims)
    model = afm.Model(field_dims=field_dims, embed_dim=4, attn_l2=0.3)
    variables = model.init(jax.random.key(0), ids)
    kernel = variables['params']['AttentionalFactorizationMachine_0'][
      'attention'
    ]['kernel']
    _, state = model.apply(
      variables,
      ids,
      train=True,
      rngs={'dropout': jax.random.key(1)},
      mutable=['losses', 'batch_stats'],
    )
    # One value, under the attention layer's name, as the trainer sums it.
    self.assertEqual(
      jax.tree.map(np.shape, state['losses']),
      {'AttentionalFactorizationMachine_0': {'attention_l2': ((),)}},
    )
    (value,) = jax.tree.leaves(state['losses'])
    self.assertAlmostEqual(
      float(value), 0.3 * float(jnp.sum(kernel**2)), places=5
    )
    _, state = model.apply(variables, ids, train=False, mutable=['losses'])
    self.assertEmpty(jax.tree.leaves(state))
    off = afm.Model(field_dims=field_dims, embed_dim=4)
    _, state = off.apply(
      variables,
      ids,
      train=True,
      rngs={'dropout': jax.random.key(1)},
      mutable=['losses'],
    )
    self.assertEmpty(jax.tree.leaves(state))

  def test_attention_l2_gradient_reaches_the_attention_kernel(self):
    # The trainer differentiates the sown value: it must be a function of
    # the parameters, 2 * attn_l2 * W, not a constant.
    afm = module('afm')
    field_dims = (7, 11, 5)
    ids = random_ids(4, field_dims)
    model = afm.Model(field_dims=field_dims, embed_dim=4, attn_l2=0.3)
    params = random_variables(model, ids)['params']  # Shapes only.

    def penalty(p):
      _, state = model.apply(
        {'params': p},
        ids,
        train=True,
        rngs={'dropout': jax.random.key(1)},
        mutable=['losses'],
      )
      return sum(jnp.sum(x) for x in jax.tree.leaves(state['losses']))

    grads = jax.jit(jax.grad(penalty))(params)  # Not op by op.
    layer = 'AttentionalFactorizationMachine_0'
    np.testing.assert_allclose(
      grads[layer]['attention']['kernel'],
      0.6 * params[layer]['attention']['kernel'],
      rtol=1e-5,
    )
    self.assertEqual(
      float(jnp.abs(grads['FeaturesLinear_0']['weight']).max()), 0.0
    )


# Fields for the device tests: devices see different ids.
PMAP_FIELD_DIMS = (7, 11, 5, 4)


class BatchNormAcrossDevicesTest(parameterized.TestCase):
  @parameterized.parameters('fnn', 'wd')
  def test_pmap_statistics_equal_the_global_batch(self, name):
    self.assertEqual(jax.local_device_count(), 2)
    model_file = module(name)
    kwargs = dict(embed_dim=3, mlp_dims=(5, 4), dropout=0.0)
    ids = random_ids(16, PMAP_FIELD_DIMS, seed=5)
    # Devices see different ids, so per-device statistics differ.
    ids[8:] = random_ids(8, PMAP_FIELD_DIMS, seed=6) % 2
    single = model_file.Model(field_dims=PMAP_FIELD_DIMS, **kwargs)
    variables = single.init(jax.random.key(0), ids)
    variables = {
      'params': randomize(variables['params'], 7),
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
    synced = model_file.Model(
      field_dims=PMAP_FIELD_DIMS, axis_name='batch', **kwargs
    )
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

  # Models with BatchNorm, constructed without dropout so that the only
  # difference between the pmap and the single-device run is the statistics.
  @parameterized.named_parameters(
    ('nfm', 'nfm', dict(embed_dim=3, mlp_dims=(5, 4), dropouts=(0.0, 0.0))),
    (
      'ncf',
      'ncf',
      dict(
        user_field_idx=0,
        item_field_idx=1,
        embed_dim=3,
        mlp_dims=(5, 4),
        dropout=0.0,
      ),
    ),
    ('fnfm', 'fnfm', dict(embed_dim=3, mlp_dims=(5, 4), dropouts=(0.0, 0.0))),
    ('deepfm', 'deepfm', dict(embed_dim=3, mlp_dims=(5, 4), dropout=0.0)),
    # The rest pass axis_name on by their own lines (AFN's paper form to
    # its two LNN BatchNorms as well): TEST_KWARGS, every rate at 0.
    *(
      (name, name, dropout_kwargs(name))
      for name in (
        'dcn',
        'xdeepfm',
        'autoint',
        'pnn',
        'afn',
        'dcnv2',
        'finalmlp',
      )
    ),
  )
  def test_two_device_statistics_equal_global_batch(self, name, kwargs):
    num_devices = 2
    self.assertGreaterEqual(jax.local_device_count(), num_devices)
    model_file = module(name)
    single = model_file.Model(PMAP_FIELD_DIMS, **kwargs)
    sharded = model_file.Model(PMAP_FIELD_DIMS, axis_name='batch', **kwargs)
    ids = random_ids(32, PMAP_FIELD_DIMS, seed=3)
    variables = random_variables(single, ids)  # Shapes only: no eager init.

    _, global_stats = apply_train(single, variables, ids)  # Compiled.

    def step(v, x):
      _, state = sharded.apply(v, x, train=True, mutable=['batch_stats'])
      return state['batch_stats']

    per_device = jax.pmap(
      step,
      axis_name='batch',
      in_axes=(None, 0),
      devices=jax.local_devices()[:num_devices],
    )(variables, ids.reshape(num_devices, -1, ids.shape[1]))
    leaves = jax.tree_util.tree_leaves_with_path(global_stats)
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


def _lookup(tree, path):
  for key in path:
    tree = tree[key.key]
  return np.asarray(tree)


if __name__ == '__main__':
  absltest.main()
