"""Tests of what a first run (an empty compilation cache) traces.

`sparse.value_and_grad` needs the shapes of the rows each table reads
before it traces the gradient; it takes them from a trace of the model cut
short after the lookups, so the layers after them are traced once. The
gradient is checked against `jax.grad`'s dense one, and the program against
the one traced with the shapes of a whole `jax.eval_shape`. `threefry.key`
is checked against `jax.random.key`, and for compiling nothing; `jit(init)`
compiled with `utils.init_compiler_options()` against XLA's defaults.
"""

import importlib
import os
from unittest import mock

from absl.testing import absltest
from flax import linen as nn
from flax import traverse_util
import jax
from jax import monitoring
import jax.numpy as jnp
import numpy as np

from configs import default
from models import fm
import sparse
import threefry
import train
import utils

ROWS = np.array([[0, 3], [2, 2], [4, 1]], np.int32)
TABLE = ('Lookup_0', 'table')
# One entry per trace of `Head`.
TRACES = []


class Lookup(nn.Module):
  """Reads rows of its table with `take_rows`."""

  @nn.compact
  def __call__(self, rows):
    t = self.param('table', nn.initializers.normal(1.0), (5, 2))
    return fm.take_rows(t, rows, self, 'table')  # [B, F, 2]


class Head(nn.Module):
  """A dense layer that counts how often it is traced (`TRACES`)."""

  @nn.compact
  def __call__(self, x):
    TRACES.append(1)
    return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]


class Model(nn.Module):
  """A lookup, a head after it and, with `again`, a second lookup of the
  same table after the head, or, with `other`, a lookup of an undeclared
  table there."""

  again: bool = False
  other: bool = False

  @nn.compact
  def __call__(self, rows):
    lookup = Lookup()
    out = Head()(lookup(rows))
    if self.again:
      out += jnp.sum(lookup(rows), axis=(1, 2))
    if self.other:
      out += jnp.sum(Lookup(name='Other_0')(rows), axis=(1, 2))
    return out


def _loss(model):
  def fun(params, perturbations):
    variables = {'params': params}
    if perturbations:
      variables[sparse.PERTURBATIONS] = perturbations
    out, state = model.apply(variables, ROWS, mutable=[sparse.ROWS])
    return jnp.sum(jnp.sin(out)), (None, state[sparse.ROWS])

  return fun


def _whole_trace(fun, params, tables):
  """The row shapes as before: the whole of `jax.eval_shape`."""
  del tables
  _, (_, rows) = jax.eval_shape(fun, params, None)
  return traverse_util.flatten_dict(rows)


def _params(**kwargs):
  model = Model(**kwargs)
  return model.init(jax.random.key(0), ROWS)['params']


class RowShapesTest(absltest.TestCase):
  def test_the_layers_after_the_lookups_are_traced_once(self):
    model = Model()
    params = _params()
    TRACES.clear()
    (loss, _), grads = sparse.value_and_grad(
      _loss(model), params, frozenset({TABLE})
    )
    self.assertLen(TRACES, 1)  # Twice with a whole `jax.eval_shape`.
    # The gradient is the dense one's rows read.
    (want_loss, _), dense = jax.value_and_grad(
      lambda p: _loss(model)(p, None), has_aux=True
    )(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    grads = traverse_util.flatten_dict(grads)
    dense = traverse_util.flatten_dict(dense)
    rows = grads[TABLE]
    np.testing.assert_array_equal(rows.rows, ROWS.reshape(-1))
    summed = np.zeros_like(dense[TABLE])
    np.add.at(summed, np.asarray(rows.rows), np.asarray(rows.values))
    np.testing.assert_allclose(summed, dense[TABLE], rtol=1e-5, atol=1e-7)
    for path in dense:
      if path != TABLE:
        np.testing.assert_allclose(grads[path], dense[path], rtol=1e-6)

  def test_the_program_is_the_one_of_a_whole_trace(self):
    # The same program, so the same trained numbers and cache entries.
    model = Model()
    params = _params()

    def program():
      fun = lambda p: sparse.value_and_grad(_loss(model), p, frozenset({TABLE}))
      return jax.jit(fun).lower(params).as_text()

    with mock.patch.object(sparse, '_rows_read', _whole_trace):
      want = program()
    self.assertEqual(program(), want)

  def test_a_second_read_after_the_lookups_is_refused(self):
    # Past the point where the shapes' trace stops: seen in the gradient's.
    model = Model(again=True)
    with self.assertRaisesRegex(
      ValueError,
      r"otherwise than declared: read \{'Lookup_0/table': 2\} \(times\)",
    ):
      sparse.value_and_grad(_loss(model), _params(), frozenset({TABLE}))

  def test_an_undeclared_table_read_after_the_lookups_is_named(self):
    model = Model(other=True)
    with self.assertRaisesRegex(
      ValueError,
      r"otherwise than declared: read \{'Lookup_0/table': 1,"
      r" 'Other_0/table': 1\} \(times\), declared \['Lookup_0/table'\]\.$",
    ):
      sparse.value_and_grad(
        _loss(model), _params(other=True), frozenset({TABLE})
      )


class KeyTest(absltest.TestCase):
  def test_the_key_of_jax_random_key(self):
    seeds = (0, 1, 7, 2**31 - 1, 2**31, 2**32 + 3, 2**40 + 7, 2**63 - 1)
    for x64 in (False, True):
      with jax.enable_x64(x64):
        for seed in seeds:
          with self.subTest(x64=x64, seed=seed):
            want = jax.random.key(seed)
            got = threefry.key(seed)
            self.assertEqual(got.dtype, want.dtype)
            np.testing.assert_array_equal(
              jax.random.key_data(got), jax.random.key_data(want)
            )

  def _compiled(self, fun):
    """The programs that `fun()` compiles, from empty in-memory caches."""
    compiled = []

    def listen(name, duration, **kwargs):
      del duration, kwargs
      if name == '/jax/core/compile/backend_compile_duration':
        compiled.append(name)

    jax.clear_caches()
    monitoring.register_event_duration_secs_listener(listen)
    try:
      fun()
    finally:
      monitoring.unregister_event_duration_listener(listen)
    return compiled

  def test_compiles_nothing(self):
    self.assertNotEmpty(self._compiled(lambda: jax.random.key(11)))
    self.assertEmpty(self._compiled(lambda: threefry.key(11)))

  def test_the_train_state_initializer_compiles_nothing(self):
    # Its shapes only: the run's first compilation is its own program's.
    config = default.get_config()
    config.model_name = 'fm'
    model = train.create_model(config, (3, 4))
    self.assertEmpty(
      self._compiled(lambda: train.state_initializer(config, model))
    )


class InitOptionsTest(absltest.TestCase):
  def test_the_init_program_compiles_with_them(self):
    config = default.get_config()
    config.model_name = 'fm'
    model = train.create_model(config, (3, 4))
    with mock.patch.object(
      utils, 'init_compiler_options', return_value={'xla_no_such_option': 1}
    ):
      init = train.state_initializer(config, model)
    rng = threefry.key(0)
    jax.eval_shape(init, rng)  # Traced: nothing compiles.
    with self.assertRaisesRegex(Exception, 'xla_no_such_option'):
      init(rng)

  def test_the_same_state_as_with_xlas_defaults(self):
    with mock.patch.dict(os.environ):
      os.environ.pop('XLA_FLAGS', None)  # The tests' own level 0.
      options = utils.init_compiler_options()
    self.assertEqual(
      options,
      {
        'xla_backend_optimization_level': '2',
        'xla_cpu_use_fusion_emitters': False,
      },
    )
    defaults = {
      'xla_backend_optimization_level': '3',
      'xla_cpu_use_fusion_emitters': True,
    }
    # Each config's optimizer; smaller layers.
    for name, sizes in (
      ('fm', {'embed_dim': 4}),
      ('fnn', {'embed_dim': 4, 'mlp_dims': (8,)}),
      ('dcn', {'embed_dim': 4, 'mlp_dims': (8,)}),
    ):
      config = importlib.import_module(f'configs.{name}').get_config()
      config.model.update(sizes)
      model = train.create_model(config, (30, 40))
      rng = threefry.key(3)
      lowered = jax.jit(train.state_initializer(config, model)).lower(rng)
      got = lowered.compile(compiler_options=options)(rng)
      want = lowered.compile(compiler_options=defaults)(rng)
      with self.subTest(name):
        leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        for a, b in leaves:
          np.testing.assert_array_equal(a, b)
        self.assertGreater(
          np.abs(got.params['FeaturesEmbedding_0']['embedding']).max(), 0
        )


if __name__ == '__main__':
  absltest.main()
