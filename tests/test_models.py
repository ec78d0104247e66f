"""Contract tests that every file in models/ must pass."""

import ast
import importlib
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, 'models')
MODEL_NAMES = sorted(
  f[:-3]
  for f in os.listdir(MODELS_DIR)
  if f.endswith('.py') and not f.startswith('_')
)

FIELD_DIMS = (7, 11, 5)
BATCH = 6

# Constructor arguments used by the contract tests: small, but every layer
# (dropout, BatchNorm, attention) present.
TEST_KWARGS = {
  'lr': {},
  'fm': {'embed_dim': 4},
  'ffm': {'embed_dim': 4},
  'fnn': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropout': 0.2},
  'wd': {
    'embed_dim': 4,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
    'cross_fields': ((0, 1),),
    'cross_buckets': 50,
  },
  'afm': {'embed_dim': 4, 'attn_size': 3, 'dropouts': (0.2, 0.2)},
  'nfm': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropouts': (0.2, 0.2)},
  'ncf': {
    'user_field_idx': 0,
    'item_field_idx': 1,
    'embed_dim': 4,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
  },
  'fnfm': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropouts': (0.2, 0.2)},
  'deepfm': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropout': 0.2},
}

# Number of parameters with FIELD_DIMS and TEST_KWARGS. A model without an
# entry fails `test_param_count`.
PARAM_COUNTS = {
  'lr': 23 + 1,  # one weight per id + bias
  'fm': 23 + 1 + 23 * 4,  # linear + factors
  # linear + one [23, 4] table per field (3 fields)
  'ffm': 23 + 1 + 23 * 3 * 4,
  # factors + per-id FM weights (no bias) + MLP on 3 * (1 + 4) = 15 inputs:
  # Dense 15->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'fnn': 23 * 4 + 23 + (15 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + (6 + 1),
  # linear + cross 0x1 (7 * 11 = 77 pairs hashed into 50) + embeddings +
  # MLP on 3 * 4 = 12 inputs: Dense 12->8, BN(8), Dense 8->6, BN(6), 6->1
  'wd': 23 + 1 + 50 + 23 * 4 + (12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7,
  # linear + embeddings + attention W [4, 3], b [3] + h [3] + p [4]
  'afm': 23 + 1 + 23 * 4 + (4 * 3 + 3) + 3 + 4,
  # linear + embeddings + BN(4) on f_BI + MLP on the 4 dims of f_BI:
  # Dense 4->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'nfm': (
    23 + 1 + 23 * 4 + 2 * 4 + (4 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7
  ),
  # MLP embeddings [23, 4] + GMF embeddings of user and item [7 + 11, 4] +
  # MLP tower on 3 * 4 = 12 inputs: Dense 12->8, BN(8), Dense 8->6, BN(6) +
  # prediction Dense on [GMF 4; MLP 6] -> 1
  'ncf': 23 * 4 + 18 * 4 + (12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 11,
  # linear + field-aware factors [23, 3, 4] + BN on 3 pairs * 4 = 12 + MLP:
  # Dense 12->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'fnfm': (
    (23 + 1 + 23 * 3 * 4 + 2 * 12)
    + ((12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7)
  ),
  # linear + embeddings + MLP on 3 * 4 = 12 inputs: Dense 12->8, BN(8),
  # Dense 8->6, BN(6), Dense 6->1
  'deepfm': 23 + 1 + 23 * 4 + (12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7,
}

# Blocks that model files copy verbatim from each other (DESIGN.md 2).
SHARED_BLOCKS = (
  'field_offsets',
  'FeaturesLinear',
  'FeaturesEmbedding',
  'FactorizationMachine',
  'MultiLayerPerceptron',
  'FieldAwareEmbedding',  # ffm.py and fnfm.py
)


def _ids(seed=0, batch=BATCH):
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.integers(0, d, size=batch) for d in FIELD_DIMS], axis=1
  ).astype(np.int32)


def _build(name):
  module = importlib.import_module(f'models.{name}')
  return module.Model(field_dims=FIELD_DIMS, **TEST_KWARGS.get(name, {}))


def _init(model, ids):
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return model.init(rngs, ids, train=False)


class ModelContractTest(parameterized.TestCase):
  def test_every_model_has_a_table_entry(self):
    self.assertEqual(sorted(PARAM_COUNTS), MODEL_NAMES)
    self.assertEqual(sorted(TEST_KWARGS), MODEL_NAMES)

  @parameterized.parameters(*MODEL_NAMES)
  def test_output_shape_and_dtype(self, name):
    model = _build(name)
    ids = _ids()
    variables = _init(model, ids)
    logits = model.apply(variables, ids, train=False)
    self.assertEqual(logits.shape, (BATCH,))
    self.assertEqual(logits.dtype, jnp.float32)
    self.assertTrue(np.all(np.isfinite(logits)))

  @parameterized.parameters(*MODEL_NAMES)
  def test_param_count(self, name):
    model = _build(name)
    variables = _init(model, _ids())
    count = sum(x.size for x in jax.tree.leaves(variables['params']))
    self.assertEqual(count, PARAM_COUNTS.get(name))

  @parameterized.parameters(*MODEL_NAMES)
  def test_gradients_finite_and_nonzero(self, name):
    model = _build(name)
    ids = _ids(batch=32)
    variables = _init(model, ids)
    # Random parameters everywhere, so that zero-initialised leaves (the
    # linear term) do not hide the gradient of another leaf.
    leaves, treedef = jax.tree.flatten(variables['params'])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
      treedef,
      [
        0.3 * jax.random.normal(k, x.shape)
        for k, x in zip(keys, leaves, strict=True)
      ],
    )
    labels = (np.arange(32) % 2).astype(np.float32)
    others = {k: v for k, v in variables.items() if k != 'params'}

    def loss_fn(p):
      logits, _ = model.apply(
        {'params': p, **others},
        ids,
        train=True,
        rngs={'dropout': jax.random.key(3)},
        mutable=['batch_stats'],
      )
      return jnp.mean(jnp.square(logits - labels))

    grads = jax.grad(loss_fn)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      with self.subTest(jax.tree_util.keystr(path)):
        self.assertTrue(np.all(np.isfinite(g)))
        self.assertGreater(float(jnp.max(jnp.abs(g))), 0.0)

  @parameterized.parameters(*MODEL_NAMES)
  def test_train_flag_matters_only_with_dropout_or_batchnorm(self, name):
    model = _build(name)
    ids = _ids(batch=16)
    variables = _init(model, ids)
    eval_logits = model.apply(variables, ids, train=False)
    train_logits, _ = model.apply(
      variables,
      ids,
      train=True,
      rngs={'dropout': jax.random.key(4)},
      mutable=['batch_stats'],
    )
    source = open(os.path.join(MODELS_DIR, f'{name}.py')).read()
    stochastic = 'nn.Dropout(' in source or 'nn.BatchNorm(' in source
    if stochastic:
      self.assertFalse(np.allclose(eval_logits, train_logits))
    else:
      np.testing.assert_array_equal(eval_logits, train_logits)

  @parameterized.parameters(*MODEL_NAMES)
  def test_model_file_imports_only_allowed_modules(self, name):
    allowed = {
      'flax',
      'jax',
      'numpy',
      'typing',
      'collections',
      'functools',
      'math',
    }
    tree = ast.parse(open(os.path.join(MODELS_DIR, f'{name}.py')).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        roots = [a.name.split('.')[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        self.assertEqual(node.level, 0, 'relative import')
        roots = [node.module.split('.')[0]]
      else:
        continue
      for root in roots:
        self.assertIn(root, allowed)

  def test_shared_blocks_are_identical_copies(self):
    copies = {}
    for name in MODEL_NAMES:
      path = os.path.join(MODELS_DIR, f'{name}.py')
      source = open(path).read()
      for node in ast.parse(source).body:
        if getattr(node, 'name', None) in SHARED_BLOCKS:
          copies.setdefault(node.name, []).append(
            (name, ast.get_source_segment(source, node))
          )
    self.assertIn('FeaturesLinear', copies)
    for block, versions in copies.items():
      first_name, first = versions[0]
      for other_name, other in versions[1:]:
        self.assertEqual(
          first, other, f'{block} differs in {first_name} and {other_name}'
        )

  def test_each_model_file_runs_alone_in_an_empty_directory(self):
    # One subprocess for all models keeps the JAX start-up cost single.
    script = (
      'import importlib, sys\n'
      'import jax, jax.numpy as jnp, numpy as np\n'
      'assert "data" not in sys.modules\n'
      'for name, kwargs in %r.items():\n'
      '  m = importlib.import_module(name)\n'
      '  model = m.Model(field_dims=(3, 4), **kwargs)\n'
      '  ids = np.array([[0, 1], [2, 3], [1, 0], [0, 2]], np.int32)\n'
      '  v = model.init({"params": jax.random.key(0),'
      ' "dropout": jax.random.key(1)}, ids, train=False)\n'
      '  def loss(p):\n'
      '    out, _ = model.apply({**v, "params": p}, ids, train=True,'
      ' rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])\n'
      '    return jnp.mean(out ** 2)\n'
      '  g = jax.grad(loss)(v["params"])\n'
      '  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))\n'
      '  print("ok", name)\n'
    ) % {n: TEST_KWARGS[n] for n in MODEL_NAMES}
    with tempfile.TemporaryDirectory() as tmp:
      for name in MODEL_NAMES:
        with open(os.path.join(MODELS_DIR, f'{name}.py')) as src:
          with open(os.path.join(tmp, f'{name}.py'), 'w') as dst:
            dst.write(src.read())
      env = dict(os.environ, PYTHONPATH='')
      result = subprocess.run(
        [sys.executable, '-c', script],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
      )
    self.assertEqual(result.returncode, 0, result.stderr)
    for name in MODEL_NAMES:
      self.assertIn(f'ok {name}', result.stdout)


class InteractionTest(absltest.TestCase):
  def test_fm_pairwise_term_matches_brute_force(self):
    fm = importlib.import_module('models.fm')
    x = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    brute = np.zeros(5)
    for f in range(4):
      for g in range(f + 1, 4):
        brute += np.sum(x[:, f] * x[:, g], axis=-1)
    out = fm.FactorizationMachine(reduce_sum=True).apply({}, x)
    np.testing.assert_allclose(out, brute, rtol=1e-5, atol=1e-5)
    per_dim = fm.FactorizationMachine(reduce_sum=False).apply({}, x)
    np.testing.assert_allclose(per_dim.sum(-1), brute, rtol=1e-5, atol=1e-5)

  def test_fm_model_equals_linear_plus_pairwise_by_hand(self):
    fm = importlib.import_module('models.fm')
    model = fm.Model(field_dims=FIELD_DIMS, embed_dim=3)
    ids = _ids()
    params = _init(model, ids)['params']
    rng = np.random.default_rng(1)
    params = jax.tree.map(
      lambda x: rng.normal(size=x.shape).astype(np.float32), params
    )
    out = model.apply({'params': params}, ids)
    offsets = np.cumsum((0,) + FIELD_DIMS[:-1])
    w = np.asarray(params['FeaturesLinear_0']['weight'])[:, 0]
    b = float(params['FeaturesLinear_0']['bias'][0])
    v = np.asarray(params['FeaturesEmbedding_0']['embedding'])
    for i, row in enumerate(ids):
      rows = row + offsets
      expected = b + w[rows].sum()
      for f in range(len(rows)):
        for g in range(f + 1, len(rows)):
          expected += v[rows[f]] @ v[rows[g]]
      self.assertAlmostEqual(float(out[i]), expected, places=4)


if __name__ == '__main__':
  absltest.main()
