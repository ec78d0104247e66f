"""Side inputs of every model: multi-hot ids and numeric values.

Each file in models/ takes one-hot `ids` `[batch, fields]` and, when built
with `multi_field_dims` / `num_dense`, `multi_ids` `[batch, multi_fields,
max_len]` (padded with -1, pooled to one row per field) and `dense`
`[batch, dense_fields]` (value times a learned row): each side field is one
more field of the model's interaction. A model whose constructor has no
`multi_field_dims` argument is skipped.
"""

import functools
import inspect

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
from model_tables import MODEL_NAMES
from model_tables import TEST_KWARGS
from model_tables import module
from model_testing import apply_eval
from model_testing import init
from model_testing import loss_and_grads
from model_testing import np_fields
from model_testing import np_linear
from model_testing import np_pool
from model_testing import offsets
from model_testing import random_ids
from model_testing import random_variables
from model_testing import randomize
import numpy as np

FIELD_DIMS = (7, 11, 5)
MULTI_FIELD_DIMS = (6, 9)
NUM_DENSE = 2
BATCH = 5
MAX_LEN = 4
NAMED_MODELS = [(name, name) for name in MODEL_NAMES]


def _multi_ids(batch=BATCH, dims=MULTI_FIELD_DIMS, max_len=MAX_LEN, seed=0):
  """Lists of 0 to `max_len` ids (a repeat among them) padded with -1.

  Id 0 is never used, so a gradient or value leaking from the padding to
  each field's first row shows.
  """
  rng = np.random.default_rng(seed)
  out = np.full((batch, len(dims), max_len), -1, np.int32)
  for b in range(batch):
    for m, d in enumerate(dims):
      n = (b + 2 * m) % (max_len + 1)  # 0 (empty) .. max_len ids
      out[b, m, :n] = rng.integers(1, d, size=n)
  out[1, 1, :2] = [3, 3]  # the same id twice counts twice
  return out


def _dense(batch=BATCH, num_dense=NUM_DENSE, seed=0):
  values = np.random.default_rng(seed).normal(size=(batch, num_dense))
  values[2, 0] = 0.0
  return values.astype(np.float32)


def _inputs():
  """One-hot ids, multi-hot ids and numeric values of one batch."""
  return random_ids(BATCH, FIELD_DIMS), _multi_ids(), _dense()


def _np_fields(params, name, inputs, pooling='mean'):
  """`np_fields` of this file's fields; `inputs`: ids, multi_ids, dense."""
  ids, multi_ids, dense = inputs
  return np_fields(
    params, name, ids, FIELD_DIMS, multi_ids, MULTI_FIELD_DIMS, dense, pooling
  )


def _sum_sin(logits, labels):
  del labels
  return jnp.sum(jnp.sin(logits))


def _paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(tree)]


def _as_one_hot_fields(tree, multi_rows, dense_rows):
  """Moves each `multi_<name>`/`dense_<name>` table into `<name>`'s rows."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key.startswith(('multi_', 'dense_')):
      continue
    value = _as_one_hot_fields(value, multi_rows, dense_rows)
    parts = [value]
    if f'multi_{key}' in tree:
      parts.append(multi_rows(tree[f'multi_{key}']))
    if f'dense_{key}' in tree:
      parts.append(dense_rows(tree[f'dense_{key}']))
    out[key] = np.concatenate(parts) if len(parts) > 1 else value
  return out


class PoolingTest(parameterized.TestCase):
  @parameterized.named_parameters(('mean', 'mean'), ('sum', 'sum'))
  def test_pooling_matches_a_loop_with_padding_anywhere(self, pooling):
    fm = module('fm')
    rng = np.random.default_rng(0)
    for trailing in ((3,), (4, 3), (1,)):
      table = rng.normal(size=(sum(MULTI_FIELD_DIMS),) + trailing)
      table = table.astype(np.float32)
      multi_ids = _multi_ids()
      # Padding between ids is skipped as well as after them.
      multi_ids = rng.permuted(multi_ids, axis=2)
      out = fm.pool_multi_hot(table, multi_ids, MULTI_FIELD_DIMS, pooling)
      self.assertEqual(out.shape, (BATCH, 2) + trailing)
      np.testing.assert_allclose(
        out,
        np_pool(table, multi_ids, MULTI_FIELD_DIMS, pooling),
        rtol=1e-6,
        atol=1e-6,
      )

  def test_empty_list_pools_to_zeros_and_mean_divides_by_ids_present(self):
    fm = module('fm')
    table = np.arange(1, 16, dtype=np.float32).reshape(15, 1)  # row r = r+1
    multi_ids = np.array([[[-1, -1, -1], [2, -1, 4]]], np.int32)
    mean = fm.pool_multi_hot(table, multi_ids, MULTI_FIELD_DIMS)
    total = fm.pool_multi_hot(table, multi_ids, MULTI_FIELD_DIMS, 'sum')
    # Field 1 starts at row 6: ids 2 and 4 are rows 8 and 10, values 9, 11.
    np.testing.assert_array_equal(mean[0, :, 0], [0.0, 10.0])
    np.testing.assert_array_equal(total[0, :, 0], [0.0, 20.0])

  def test_unknown_pooling_raises(self):
    with self.assertRaisesRegex(ValueError, "'mean' or 'sum'"):
      module('fm').pool_multi_hot(
        np.zeros((15, 2)), _multi_ids(), MULTI_FIELD_DIMS, 'max'
      )


class FeatureBlocksTest(parameterized.TestCase):
  """The embedding and linear blocks of models/fm.py against brute force."""

  @parameterized.named_parameters(('mean', 'mean'), ('sum', 'sum'))
  def test_embeddings_of_every_field(self, pooling):
    fm = module('fm')
    block = fm.FeaturesEmbedding(
      FIELD_DIMS, 3, MULTI_FIELD_DIMS, NUM_DENSE, multi_pooling=pooling
    )
    inputs = _inputs()
    variables = block.init(jax.random.key(0), *inputs)
    p = variables['params']
    self.assertEqual(
      jax.tree.map(np.shape, p),
      {
        'embedding': (23, 3),
        'multi_embedding': (15, 3),
        'dense_embedding': (NUM_DENSE, 3),
      },
    )
    out = block.apply(variables, *inputs)  # [B, T, D]
    expected = _np_fields(p, 'embedding', inputs, pooling)
    self.assertEqual(out.shape, (BATCH, 3 + 2 + NUM_DENSE, 3))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # A numeric field's row is exactly its value times its vector.
    for b in range(BATCH):
      for n in range(NUM_DENSE):
        np.testing.assert_allclose(
          out[b, 5 + n], inputs[2][b, n] * p['dense_embedding'][n], rtol=1e-6
        )

  def test_linear_term_of_every_field(self):
    fm = module('fm')
    block = fm.FeaturesLinear(FIELD_DIMS, MULTI_FIELD_DIMS, NUM_DENSE)
    inputs = _inputs()
    variables = random_variables(block, *inputs)
    p = variables['params']
    out = block.apply(variables, *inputs)  # [B]
    w, mw, dw = p['weight'][:, 0], p['multi_weight'][:, 0], p['dense_weight']
    for b in range(BATCH):
      expected = float(p['bias'][0])
      expected += sum(w[inputs[0][b] + offsets(FIELD_DIMS)])
      for m, o in enumerate(offsets(MULTI_FIELD_DIMS)):
        listed = [i for i in inputs[1][b, m] if i >= 0]
        expected += sum(mw[o + i] for i in listed) / max(len(listed), 1)
      expected += sum(dw[n, 0] * inputs[2][b, n] for n in range(NUM_DENSE))
      self.assertAlmostEqual(float(out[b]), expected, places=5)


class ModelInputsTest(parameterized.TestCase):
  def _module(self, name):
    mod = module(name)
    if 'multi_field_dims' not in inspect.signature(mod.Model).parameters:
      self.skipTest(
        f'models/{name}.py has no multi_field_dims argument: it does not '
        'take multi-hot or numeric inputs yet.'
      )
    return mod

  def _side_model(self, mod, name, pooling='mean'):
    return mod.Model(
      FIELD_DIMS,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=NUM_DENSE,
      multi_pooling=pooling,
      **TEST_KWARGS.get(name, {}),
    )

  @parameterized.named_parameters(
    (f'{name}_{pooling}', name, pooling)
    for name in MODEL_NAMES
    for pooling in ('mean', 'sum')
  )
  def test_side_fields_act_as_one_hot_fields_with_their_rows(
    self, name, pooling
  ):
    # A side field equals a one-hot field whose id in example b is b and
    # whose row b is example b's pooled rows (multi-hot) or value times
    # vector (numeric): in every table (embeddings, linear weights,
    # field-aware vectors) and through every interaction and MLP.
    mod = self._module(name)
    model = self._side_model(mod, name, pooling)
    ids, multi_ids, dense = _inputs()
    # Id 0 is an id like any other (only -1 pads): a list of each field
    # starts with it.
    multi_ids[3, 0, 0] = multi_ids[4, 1, 0] = 0
    variables = random_variables(model, ids, multi_ids, dense)
    out = apply_eval(model, variables, ids, multi_ids, dense)

    extra = len(MULTI_FIELD_DIMS) + NUM_DENSE
    flat = mod.Model(FIELD_DIMS + (BATCH,) * extra, **TEST_KWARGS.get(name, {}))
    flat_ids = np.concatenate(
      [ids, np.repeat(np.arange(BATCH, dtype=np.int32)[:, None], extra, 1)],
      axis=1,
    )

    def multi_rows(table):  # [M * B, ...]: field m's row b, pooled
      pooled = np_pool(table, multi_ids, MULTI_FIELD_DIMS, pooling)
      return np.moveaxis(pooled, 1, 0).reshape((-1,) + table.shape[1:])

    def dense_rows(table):  # [N * B, ...]: field n's row b, value * vector
      trailing = (1,) * (table.ndim - 1)
      rows = dense.reshape(dense.shape + trailing) * np.asarray(table)
      return np.moveaxis(rows, 1, 0).reshape((-1,) + table.shape[1:])

    flat_variables = _as_one_hot_fields(variables, multi_rows, dense_rows)
    self.assertEqual(
      jax.tree.map(np.shape, flat_variables),
      jax.tree.map(
        np.shape, jax.eval_shape(flat.init, jax.random.key(0), flat_ids)
      ),
      'the side tables are not the only difference',
    )
    expected = apply_eval(flat, flat_variables, flat_ids)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)

  @parameterized.named_parameters(NAMED_MODELS)
  def test_without_side_inputs_the_model_is_the_ids_only_model(self, name):
    mod = self._module(name)
    kwargs = TEST_KWARGS.get(name, {})
    ids = random_ids(BATCH, FIELD_DIMS)
    model = mod.Model(FIELD_DIMS, **kwargs)
    variables = init(model, ids)
    for path in _paths(variables):
      self.assertNotIn("['multi_", path)
      self.assertNotIn("['dense_", path)
    explicit = mod.Model(FIELD_DIMS, multi_field_dims=(), num_dense=0, **kwargs)
    explicit_variables = init(explicit, ids)
    self.assertEqual(
      jax.tree.map(np.shape, explicit_variables),
      jax.tree.map(np.shape, variables),
    )
    for a, b in zip(
      jax.tree.leaves(explicit_variables),
      jax.tree.leaves(variables),
      strict=True,
    ):
      np.testing.assert_array_equal(a, b)
    variables = randomize(variables)
    out = model.apply(variables, ids)
    np.testing.assert_array_equal(model.apply(variables, ids, None, None), out)
    empty = (
      np.zeros((BATCH, 0, 3), np.int32),
      np.zeros((BATCH, 0), np.float32),
    )
    np.testing.assert_array_equal(model.apply(variables, ids, *empty), out)

  @parameterized.named_parameters(NAMED_MODELS)
  def test_gradients_reach_the_side_tables_at_the_listed_rows(self, name):
    mod = self._module(name)
    model = self._side_model(mod, name)
    inputs = _inputs()
    variables = random_variables(model, *inputs)

    # BatchNorm biases at 1 keep the ReLUs after them open, so that every
    # example reaches the output and every row it lists gets a gradient.
    def open_relus(path, x):
      where = jax.tree_util.keystr(path)
      return (
        np.ones_like(x) if 'BatchNorm_' in where and "['bias']" in where else x
      )

    variables = jax.tree_util.tree_map_with_path(open_relus, variables)
    _, _, grads, _ = loss_and_grads(
      model, variables, inputs, loss=_sum_sin, train=False
    )
    listed = np.zeros(sum(MULTI_FIELD_DIMS), bool)
    for m, o in enumerate(offsets(MULTI_FIELD_DIMS)):
      ids = inputs[1][:, m]
      listed[o + ids[ids >= 0]] = True
    side = {
      path: np.asarray(g)
      for path, g in zip(_paths(grads), jax.tree.leaves(grads), strict=True)
      if "['multi_" in path or "['dense_" in path
    }
    self.assertTrue(any("['multi_" in p for p in side), 'no multi-hot table')
    self.assertTrue(any("['dense_" in p for p in side), 'no numeric table')
    for path, g in side.items():
      touched = np.any(g != 0, axis=tuple(range(1, g.ndim)))  # [rows]
      if "['multi_" in path:
        np.testing.assert_array_equal(touched, listed, err_msg=path)
      else:
        self.assertTrue(np.all(touched), path)

  @parameterized.named_parameters(NAMED_MODELS)
  def test_inputs_that_disagree_with_the_fields_raise(self, name):
    mod = self._module(name)
    model = self._side_model(mod, name)
    ids, multi_ids, dense = _inputs()
    cases = {
      'multi_ids': (
        (ids, multi_ids[:, :1], dense),  # one field short
        (ids, multi_ids[:, :, 0], dense),  # no list axis
        (ids, None, dense),  # declared but missing
        (ids, multi_ids[:3], dense),  # another batch
      ),
      'dense': (
        (ids, multi_ids, dense[:, :1]),
        (ids, multi_ids, None),
        (ids, multi_ids, dense[:3]),
      ),
      'ids': ((ids[:, :2], multi_ids, dense),),
    }
    for input_name, calls in cases.items():
      for inputs in calls:
        with self.assertRaisesRegex(ValueError, f'^{input_name} must be'):
          init(model, *inputs)
    plain = mod.Model(FIELD_DIMS, **TEST_KWARGS.get(name, {}))
    with self.assertRaisesRegex(ValueError, r'multi_field_dims=\(\)'):
      init(plain, ids, multi_ids)
    with self.assertRaisesRegex(ValueError, 'num_dense=0'):
      init(plain, ids, None, dense)
    with self.assertRaisesRegex(ValueError, "'mean' or 'sum'"):
      init(self._side_model(mod, name, 'max'), ids, multi_ids, dense)

  @parameterized.named_parameters(NAMED_MODELS)
  def test_an_empty_batch_gives_no_logits(self, name):
    # torchfm's `.view(-1, n)` takes a batch of 0; `reshape(0, -1)` raised
    # ZeroDivisionError in the models that flatten their fields.
    mod = self._module(name)
    inputs = _inputs()
    plain = mod.Model(FIELD_DIMS, **TEST_KWARGS.get(name, {}))
    for model, model_inputs in (
      (plain, inputs[:1]),
      (self._side_model(mod, name), inputs),
    ):
      variables = random_variables(model, *model_inputs)
      # A full batch's logits: their shape and dtype (nothing compiles).
      out = jax.eval_shape(
        functools.partial(model.apply, train=False), variables, *model_inputs
      )
      empty = apply_eval(model, variables, *(x[:0] for x in model_inputs))
      self.assertEqual((out.shape, np.shape(empty)), ((BATCH,), (0,)))
      self.assertEqual(np.asarray(empty).dtype, out.dtype)

  @parameterized.named_parameters(NAMED_MODELS)
  def test_side_tables_start_as_the_one_hot_table(self, name):
    # Xavier over a side table's own few rows drew 13 numeric fields' rows
    # several times larger than the one-hot rows, and their products
    # swamped the first logits (FM on Criteo's numbers as values lost
    # 0.08-0.2 test AUC). Each side table is drawn from the one-hot table's
    # U(-b, b), b = sqrt(6 / (rows + dim)).
    mod = self._module(name)
    if name == 'lr':
      self.skipTest('LR has linear weights only, which start at zero.')
    field_dims, num_dense = (300, 500), 13
    model = mod.Model(
      field_dims,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=num_dense,
      **TEST_KWARGS.get(name, {}),
    )
    params = init(
      model,
      random_ids(BATCH, field_dims),
      _multi_ids(),
      _dense(num_dense=num_dense),
    )['params']
    checked = 0
    for path, one_hot in jax.tree.leaves_with_path(params):
      if path[-1].key != 'embedding':
        continue
      parent = params
      for key in path[:-1]:
        parent = parent[key.key]
      bound = np.sqrt(6 / (one_hot.shape[0] + one_hot.shape[-1]))
      for side in ('multi_embedding', 'dense_embedding'):
        if side not in parent:  # E.g. NCF's GMF table: the ids' fields only.
          continue
        values = np.asarray(parent[side])
        where = f'{jax.tree_util.keystr(path[:-1])}[{side!r}]'
        self.assertLessEqual(np.abs(values).max(), bound, where)
        # U(-b, b) has std b / sqrt(3); 208 draws or more.
        self.assertGreater(values.std(), 0.8 * bound / np.sqrt(3), where)
        checked += 1
    self.assertGreater(checked, 0, 'no one-hot embedding table found')

  @parameterized.named_parameters(NAMED_MODELS)
  def test_no_one_hot_field_is_a_clear_error(self, name):
    # field_dims=() used to fail inside xavier init (ZeroDivisionError) or
    # in a concatenation: multi-hot and numeric fields join the one-hot
    # fields, they cannot replace them. NCF names its user and item fields.
    mod = self._module(name)
    _, multi_ids, dense = _inputs()
    ids = np.zeros((BATCH, 0), np.int32)
    message = (
      r'user_field_idx .* in \[0, 0\)'
      if name == 'ncf'
      else r'^field_dims is empty: .* at least one one-hot \(categorical\)'
    )
    with self.assertRaisesRegex(ValueError, message):
      model = mod.Model(
        (),
        multi_field_dims=MULTI_FIELD_DIMS,
        num_dense=NUM_DENSE,
        **TEST_KWARGS.get(name, {}),
      )
      init(model, ids, multi_ids, dense)


class InteractionByHandTest(parameterized.TestCase):
  """Models whose whole formula is short enough to write out here."""

  def _run(self, name, **kwargs):
    model = module(name).Model(
      FIELD_DIMS,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=NUM_DENSE,
      **kwargs,
    )
    inputs = _inputs()
    variables = random_variables(model, *inputs)
    return model.apply(variables, *inputs), variables['params'], inputs

  def _linear(self, p, inputs):
    ids, multi_ids, dense = inputs
    return np_linear(
      p, ids, FIELD_DIMS, multi_ids, MULTI_FIELD_DIMS, dense
    )  # [B]

  def test_lr(self):
    out, p, inputs = self._run('lr')
    expected = self._linear(p['FeaturesLinear_0'], inputs)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_fm(self):
    out, p, inputs = self._run('fm', embed_dim=3)
    e = p['FeaturesEmbedding_0']
    v = _np_fields(e, 'embedding', inputs)  # [B, T, D]
    expected = self._linear(p['FeaturesLinear_0'], inputs)
    for f in range(v.shape[1]):
      for g in range(f + 1, v.shape[1]):
        expected += np.sum(v[:, f] * v[:, g], axis=-1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  def test_ffm(self):
    out, p, inputs = self._run('ffm', embed_dim=3)
    e = p['FieldAwareEmbedding_0']
    v = _np_fields(e, 'embedding', inputs)  # [B, T, T, D]
    self.assertEqual(v.shape[1:3], (7, 7))
    expected = self._linear(p['FeaturesLinear_0'], inputs)
    for f in range(7):
      for g in range(f + 1, 7):
        expected += np.sum(v[:, f, g] * v[:, g, f], axis=-1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(
    ('deepfm', 'deepfm'), ('wd', 'wd'), ('ncf', 'ncf')
  )
  def test_mlp_reads_every_field_embedding(self, name):
    mod = module(name)
    model = mod.Model(
      FIELD_DIMS,
      multi_field_dims=MULTI_FIELD_DIMS,
      num_dense=NUM_DENSE,
      **TEST_KWARGS[name],
    )
    inputs = _inputs()
    variables = random_variables(model, *inputs)
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, mod.MultiLayerPerceptron):
        seen.append(np.asarray(args[0]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply(variables, *inputs)
    key = 'embedding' if name == 'ncf' else 'FeaturesEmbedding_0'
    e = variables['params'][key]
    v = _np_fields(e, 'embedding', inputs)  # [B, T, D]
    self.assertLen(seen, 1)
    np.testing.assert_allclose(
      seen[0], v.reshape(BATCH, -1), rtol=1e-6, atol=1e-6
    )


if __name__ == '__main__':
  absltest.main()
