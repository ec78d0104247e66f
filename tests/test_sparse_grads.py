"""Tests of sparse.py: the tables' gradients as the rows read.

The row gradients are checked against the dense gradient that
`jax.grad` forms over the whole table, the rows against ids and offsets
computed here, and the cross-device exchange against a concatenation.
"""

import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

import batching
from configs import dcnv2 as dcnv2_config
from configs import default
from configs import finalmlp as finalmlp_config
from models import fm
import sparse
import train

FIELD_DIMS = (3, 4)
# Duplicates within a field and across the batch; row 2 of field 0 and
# rows 1, 3 of field 1 unread.
IDS = np.array([[0, 0], [1, 2], [0, 2], [1, 0], [0, 2], [1, 0]], np.int32)
LABELS = np.array([1, 0, 1, 0, 0, 1], np.float32)
# Two multi-hot fields of 3 and 2 ids, padded with -1; one example's list
# of the second field is empty.
MULTI_IDS = np.array(
  [
    [[0, 2, -1], [1, -1, -1]],
    [[2, 2, -1], [-1, -1, -1]],
    [[1, -1, -1], [0, 1, -1]],
    [[0, -1, -1], [1, -1, -1]],
    [[2, 0, 1], [0, -1, -1]],
    [[0, -1, -1], [1, 0, -1]],
  ],
  np.int32,
)
MULTI_FIELD_DIMS = (3, 2)
# IDS with field 1's ids 5 and 9: rows 8 and 12, past the 7 one-hot rows.
# Each reads the table's last row (the gather clips), unread in IDS.
IDS_PAST_END = np.array(
  [[0, 0], [1, 5], [0, 2], [1, 0], [0, 9], [1, 0]], np.int32
)
# MULTI_IDS with multi-hot field 1's id 3: row 6, past the 5 multi-hot rows.
MULTI_IDS_PAST_END = MULTI_IDS.copy()
MULTI_IDS_PAST_END[0, 1, 1] = 3
DENSE = np.linspace(-1, 1, 12, dtype=np.float32).reshape(6, 2)

MODEL_KWARGS = {
  'fm': {'embed_dim': 3},
  'ffm': {'embed_dim': 2},
  # GMF reads the user and item fields in its own table, item first here.
  'ncf': {
    'embed_dim': 3,
    'mlp_dims': (4,),
    'dropout': 0.0,
    'user_field_idx': 1,
    'item_field_idx': 0,
  },
  'wd': {
    'embed_dim': 3,
    'mlp_dims': (4,),
    'dropout': 0.0,
    'cross_fields': ((0, 1),),
    'cross_buckets': 5,
  },
  # As their configs build them, without BatchNorm (Linear with bias ->
  # ReLU -> Dropout, no batch_stats), smaller and without dropout;
  # FinalMLP's gates read fields 0 and 1 in their own tables.
  'dcnv2': dict(
    dcnv2_config.get_config().model.to_dict(),
    embed_dim=3,
    mlp_dims=(4,),
    num_cross_layers=1,
    num_experts=2,
    dropout=0.0,
  ),
  'finalmlp': dict(
    finalmlp_config.get_config().model.to_dict(),
    embed_dim=3,
    mlp1_dims=(4,),
    mlp2_dims=(4,),
    fs_dims=(4,),
    dropouts=(0.0, 0.0),
  ),
}


def _offsets(dims):
  return np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(np.int32)


def _rows_read(name, batch):
  """Brute force: each table's rows that `batch` reads, in lookup order."""
  one_hot = (batch['ids'] + _offsets(FIELD_DIMS)).reshape(-1)
  if name == 'ncf':
    user, item = 1, 0
    gmf = batch['ids'][:, [user, item]] + [0, FIELD_DIMS[user]]
    return {
      ('embedding', 'embedding'): one_hot,
      ('gmf_embedding', 'embedding'): gmf.reshape(-1),
    }
  if name in ('dcnv2', 'finalmlp'):  # No linear term.
    rows = {('FeaturesEmbedding_0', 'embedding'): one_hot}
    for k in (1, 2) if name == 'finalmlp' else ():
      fields = list(MODEL_KWARGS[name][f'fs{k}_context'])
      dims = [FIELD_DIMS[f] for f in fields]
      context = batch['ids'][:, fields] + _offsets(dims)
      rows[(f'fs{k}_context_embedding', 'embedding')] = context.reshape(-1)
    return rows
  prefix = 'FieldAwareEmbedding_0' if name == 'ffm' else 'FeaturesEmbedding_0'
  rows = {
    ('FeaturesLinear_0', 'weight'): one_hot,
    (prefix, 'embedding'): one_hot,
  }
  if name == 'wd':
    # Field 0 x field 1 has 12 pairs > 5 buckets: hashed, so only the
    # count and range of its rows can be checked here.
    rows[('CrossProductLinear_0', 'weight')] = None
  if 'multi_ids' in batch:
    multi = batch['multi_ids'] + _offsets(MULTI_FIELD_DIMS)[:, None]
    multi = np.where(batch['multi_ids'] >= 0, multi, -1).reshape(-1)
    rows[('FeaturesLinear_0', 'multi_weight')] = multi
    rows[('FeaturesEmbedding_0', 'multi_embedding')] = multi
  return rows


def _model_and_params(name, **fields):
  config = default.get_config()
  config.model_name = name
  config.model = dict(MODEL_KWARGS[name])
  model = train.create_model(config, FIELD_DIMS, **fields)
  # The variables' shapes (nothing compiles); random values everywhere:
  # zero-initialised tables hide gradients. BatchNorm's statistics as
  # init sets them: mean 0, variance 1.
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    **batching.example_inputs(model),
  )
  rng = np.random.default_rng(1)
  params = jax.tree.map(
    lambda x: (0.5 * rng.standard_normal(x.shape)).astype(x.dtype),
    shapes['params'],
  )
  batch_stats = jax.tree_util.tree_map_with_path(
    lambda path, x: np.full(x.shape, path[-1].key == 'var', x.dtype),
    shapes.get('batch_stats', {}),
  )
  return model, params, batch_stats


def _loss(model, batch_stats, batch):
  """`train.loss_fn` of `batch` as `sparse.value_and_grad` takes it."""
  return lambda params, perturbations: train.loss_fn(
    params,
    batch_stats,
    batch,
    jax.random.key(0),
    model=model,
    perturbations=perturbations,
  )


def _batch(multi=False, past_end=False):
  batch = {'ids': IDS_PAST_END if past_end else IDS, 'label': LABELS}
  if multi:
    multi_ids = MULTI_IDS_PAST_END if past_end else MULTI_IDS
    batch.update(multi_ids=multi_ids, dense=DENSE)
  return batch


class RowGradientsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ('fm', 'fm', False),
    ('ffm', 'ffm', False),
    ('ncf_item_field_first', 'ncf', False),
    ('wd_with_a_cross', 'wd', False),
    ('fm_multi_hot_and_numeric', 'fm', True),
    ('dcnv2_no_batch_norm', 'dcnv2', False),
    ('finalmlp_no_batch_norm', 'finalmlp', False),
    ('fm_ids_past_the_end', 'fm', False, True),
    ('fm_multi_hot_ids_past_the_end', 'fm', True, True),
    ('ncf_ids_past_the_end', 'ncf', False, True),
  )
  def test_row_gradients_are_the_rows_of_the_dense_gradient(
    self, name, multi, past_end=False
  ):
    fields = (
      {'multi_field_dims': MULTI_FIELD_DIMS, 'num_dense': 2} if multi else {}
    )
    model, params, batch_stats = _model_and_params(name, **fields)
    if MODEL_KWARGS[name].get('batch_norm') is False:  # As the configs'.
      self.assertEqual(batch_stats, {})
    batch = _batch(multi, past_end)

    fun = _loss(model, batch_stats, batch)
    tables = sparse.declared_tables(
      model.apply,
      {'params': params, 'batch_stats': batch_stats},
      **batching.model_inputs(batch),
    )
    want_rows = _rows_read(name, batch)
    self.assertEqual(tables, frozenset(want_rows))

    # Both compiled, so that both sum the same float32 terms in one order.
    (dense_loss, _), dense = jax.jit(
      jax.value_and_grad(lambda p: fun(p, None), has_aux=True)
    )(params)
    (loss, _), grads = jax.jit(
      functools.partial(sparse.value_and_grad, fun, tables=tables)
    )(params)
    self.assertEqual(loss, dense_loss)
    dense = traverse_util.flatten_dict(dense)
    grads = traverse_util.flatten_dict(grads)
    self.assertEqual(set(dense), set(grads))
    for path, g in grads.items():
      with self.subTest('/'.join(path)):
        if path not in tables:
          np.testing.assert_array_equal(g, dense[path])
          continue
        self.assertIsInstance(g, sparse.RowGrads)
        rows = np.asarray(g.rows)
        num_rows = dense[path].shape[0]
        if want_rows[path] is None:
          self.assertEqual(len(rows), len(IDS))
        else:
          # A row past the end is the last row, which the gather read.
          want = np.minimum(want_rows[path], num_rows - 1)
          np.testing.assert_array_equal(rows, want)
        if past_end and path[-1] == 'embedding':
          self.assertIn(num_rows - 1, rows)
        # Summed per row: exactly the dense gradient's rows (bit for bit),
        # whose other rows are zero.
        count, summed = jax.jit(sparse.dedup, static_argnums=1)(g, num_rows)
        read = np.asarray(summed.rows)[:count]
        self.assertEqual(sorted(read), sorted(set(rows[rows >= 0])))
        np.testing.assert_array_equal(summed.rows[count:], num_rows)
        np.testing.assert_array_equal(summed.values[:count], dense[path][read])
        unread = np.setdiff1d(np.arange(num_rows), read)
        np.testing.assert_array_equal(dense[path][unread], 0)
        self.assertGreater(np.abs(dense[path][read]).max(), 0)

  def test_dedup_sums_each_rows_lookups_in_order(self):
    rng = np.random.default_rng(0)
    rows = rng.integers(-1, 9, 40).astype(np.int32)  # -1: padding.
    rows[rows == 4] = 5  # Row 4 unread.
    values = rng.normal(size=(40, 2, 3)).astype(np.float32)
    count, out = sparse.dedup(sparse.RowGrads(jnp.asarray(rows), values), 9)
    # Distinct rows in order of first lookup, then padding.
    first_seen = list(dict.fromkeys(r for r in rows.tolist() if r >= 0))
    self.assertEqual(int(count), len(first_seen))
    np.testing.assert_array_equal(out.rows[:count], first_seen)
    np.testing.assert_array_equal(out.rows[count:], 9)
    np.testing.assert_array_equal(out.values[count:], 0)
    for i, r in enumerate(first_seen):
      want = np.zeros((2, 3), np.float32)
      for j in np.flatnonzero(rows == r):  # In lookup order.
        want = want + values[j]
      np.testing.assert_array_equal(out.values[i], want)

  def test_dedup_of_large_tables_through_hashed_buckets_is_the_same(self):
    rng = np.random.default_rng(1)
    num_rows = 50_000
    rows = (rng.zipf(1.3, 3000) % num_rows).astype(np.int32)
    rows[rng.random(3000) < 0.05] = -1  # Padding.
    values = rng.normal(size=(3000, 4)).astype(np.float32)
    grads = sparse.RowGrads(jnp.asarray(rows), jnp.asarray(values))
    dedup = jax.jit(sparse.dedup, static_argnums=1)
    want = jax.tree.map(np.asarray, dedup(grads, num_rows))
    for multipliers in (
      sparse._HASH_MULTIPLIERS,  # What rounds leave is rare.
      (0,),  # Every row in one bucket: one row per round, the rest after.
      (0, 0x9E3779B1),
      (1, 3),  # Rows below 2**17 share a bucket.
    ):
      with (
        self.subTest(multipliers=multipliers),
        mock.patch.object(sparse, 'HASHED_ROWS', 0),
        mock.patch.object(sparse, '_HASH_MULTIPLIERS', multipliers),
      ):
        # A new function: jit's cache would hold the first trace.
        again = jax.jit(lambda g, n: sparse.dedup(g, n), static_argnums=1)
        got = jax.tree.map(np.asarray, again(grads, num_rows))
        jax.tree.map(np.testing.assert_array_equal, got, want)
    self.assertGreater(int(want[0]), 100)  # Distinct rows.

  def test_update_rows_changes_the_rows_read_only_in_chunks(self):
    # 7 distinct rows in chunks of 3: three rounds of the rule, the last
    # one partial.
    rows = np.array([6, 0, 6, 2, 9, 3, -1, 11, 0, 5, 9], np.int32)
    values = np.arange(11, dtype=np.float32)[:, None] * [1.0, 10.0]
    table = np.zeros((12, 2), np.float32)
    count = np.zeros((12,), np.float32)

    def rule(g, t, c):
      return t + g, c + 1

    new_table, new_count = jax.jit(
      functools.partial(sparse.update_rows, rule=rule, chunk=3)
    )(sparse.RowGrads(jnp.asarray(rows), values), (table, count))
    want_table, want_count = table.copy(), count.copy()
    for r in set(rows.tolist()) - {-1}:
      want_table[r] = values[rows == r].sum(axis=0)
      want_count[r] = 1
    np.testing.assert_array_equal(new_table, want_table)
    np.testing.assert_array_equal(new_count, want_count)

  def _check_each_row_updated_once(self, rows, chunks):
    """`update_rows` in each of `chunks` adds each row's summed values once
    and counts one update per row read."""
    values = np.arange(1, len(rows) + 1, dtype=np.float32)[:, None]
    values = values * [1.0, 10.0]
    table = np.zeros((10, 2), np.float32)
    count = np.zeros((10,), np.float32)
    want_table, want_count = table.copy(), count.copy()
    for r in set(rows.tolist()):
      want_table[r] = values[rows == r].sum(axis=0)
      want_count[r] = 1

    def rule(g, t, c):
      return t + g, c + 1

    for chunk in chunks:
      with self.subTest(chunk=chunk):
        new_table, new_count = jax.jit(
          functools.partial(sparse.update_rows, rule=rule, chunk=chunk)
        )(sparse.RowGrads(jnp.asarray(rows), values), (table, count))
        np.testing.assert_array_equal(new_table, want_table)
        np.testing.assert_array_equal(new_count, want_count)

  def test_update_rows_pads_a_last_chunk_past_the_lookups(self):
    # 10 distinct rows in 11 lookups: chunks of 3, 4 or 8 end past the 11th
    # slot. Padded, the last chunk holds the rows left; a slice moved back
    # to fit would update the rows before them a second time. With 8 the
    # padding is 5 slots (-11 % 8); 3 (11 % 8) would be too few.
    rows = np.array([3, 0, 7, 1, 9, 6, 3, 5, 2, 8, 4], np.int32)
    self._check_each_row_updated_once(rows, (3, 4, 8, 11, 16))

  def test_update_rows_runs_no_chunk_past_distinct_lookups(self):
    # 6 lookups, all distinct, in chunks that divide them (6 is also the
    # default chunk's, min(2048, 6)): nothing is padded, and one chunk more
    # would be a slice moved back onto the last rows, updated twice.
    rows = np.array([3, 0, 7, 1, 9, 6], np.int32)
    self._check_each_row_updated_once(rows, (2, 3, 2048))

  def test_init_and_plain_apply_are_unchanged(self):
    model, params, _ = _model_and_params('fm')
    variables = model.init(jax.random.key(0), IDS[:2])
    self.assertEqual(set(variables), {'params'})
    # Another batch size than init's: no perturbation of init's shape.
    logits = model.apply({'params': params}, IDS)
    self.assertEqual(logits.shape, (len(IDS),))

  def test_the_traced_program_does_not_depend_on_the_tables_order(self):
    # A frozenset iterates in the order of the process's string hashes; a
    # program traced in that order differs between processes and misses
    # the persistent compilation cache.
    class Reversed(frozenset):
      def __iter__(self):
        return iter(sorted(frozenset.__iter__(self), reverse=True))

    model, params, batch_stats = _model_and_params(
      'fm', multi_field_dims=MULTI_FIELD_DIMS, num_dense=2
    )
    batch = _batch(multi=True)
    tables = sparse.declared_tables(
      model.apply,
      {'params': params, 'batch_stats': batch_stats},
      **batching.model_inputs(batch),
    )
    self.assertLen(tables, 4)  # Two tables of the one-hot, two multi-hot.

    def program(order):
      loss = _loss(model, batch_stats, batch)
      fun = lambda p: sparse.value_and_grad(loss, p, order(tables))
      return jax.jit(fun).lower(params).as_text()

    self.assertEqual(program(Reversed), program(frozenset))

  def test_tables_other_than_those_read_are_refused(self):
    # One read but not declared, or declared but not read: named, before
    # any gradient is formed.
    model, params, batch_stats = _model_and_params('fm')
    fun = _loss(model, batch_stats, _batch())
    read = frozenset(_rows_read('fm', _batch()))
    for tables in (
      read - {('FeaturesLinear_0', 'weight')},
      read | {('Other_0', 'embedding')},
    ):
      declared = ', '.join(sorted(f"'{'/'.join(k)}'" for k in tables))
      with (
        self.subTest(declared=declared),
        self.assertRaisesRegex(
          ValueError,
          r'^The model read its tables otherwise than declared: read'
          r" \{'FeaturesEmbedding_0/embedding': 1, 'FeaturesLinear_0/weight':"
          rf' 1\}} \(times\), declared \[{declared}\]\.$',
        ),
      ):
        sparse.value_and_grad(fun, params, tables)

  def test_a_table_read_twice_is_refused(self):
    # The rows of each table are perturbed once, under its name: a second
    # read's gradient would land on the first read's rows.
    class Twice(nn.Module):
      @nn.compact
      def __call__(self, rows):
        t = self.param('t', nn.initializers.normal(1.0), (5, 2))
        a = fm.take_rows(t, rows[:, 0], self, 't')
        b = fm.take_rows(t, rows[:, 1], self, 't')
        return jnp.sum(a * b, axis=-1)

    model = Twice()
    rows = np.array([[0, 1], [2, 2], [4, 0]], np.int32)
    params = model.init(jax.random.key(0), rows)['params']

    def fun(params, perturbations):
      variables = {'params': params}
      if perturbations:
        variables[sparse.PERTURBATIONS] = perturbations
      out, state = model.apply(variables, rows, mutable=[sparse.ROWS])
      return jnp.sum(out), (None, state[sparse.ROWS])

    with self.assertRaisesRegex(
      ValueError, r"otherwise than declared: read \{'t': 2\} \(times\)"
    ):
      sparse.value_and_grad(fun, params, frozenset({('t',)}))

  def test_every_model_declares_its_one_hot_tables(self):
    for name in ('lr', 'fm', 'ffm', 'fnn', 'afm', 'nfm', 'fnfm', 'deepfm'):
      config = default.get_config()
      config.model_name = name
      model = train.create_model(config, FIELD_DIMS)
      # Shapes suffice (sparse.declared_tables traces): nothing runs.
      variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), IDS
      )
      tables = sparse.declared_tables(model.apply, variables, IDS)
      params = traverse_util.flatten_dict(variables['params'])
      with self.subTest(name):
        self.assertTrue(tables)
        for path in tables:
          self.assertEqual(params[path].shape[0], sum(FIELD_DIMS))


class ExchangeTest(absltest.TestCase):
  def test_two_devices_send_their_rows_and_average_the_rest(self):
    rows = np.array([[0, 3, -1], [3, 1, 2]], np.int32)
    values = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    dense = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
    out = jax.pmap(
      lambda g: sparse.exchange(g, 'batch'),
      axis_name='batch',
      devices=jax.local_devices()[:2],
    )({'table': sparse.RowGrads(rows, values), 'bias': dense})
    for device in range(2):
      np.testing.assert_array_equal(out['table'].rows[device], rows.reshape(-1))
      np.testing.assert_array_equal(
        out['table'].values[device], values.reshape(6, 2) / 2
      )
      np.testing.assert_array_equal(out['bias'][device], [2.0, 4.0])


if __name__ == '__main__':
  absltest.main()
