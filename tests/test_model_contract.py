"""The contract every file in models/ keeps (DESIGN.md 2).

Shapes and dtypes, parameter counts, gradients, imports, running alone,
identical copies of shared code, initialisation, and the configs that build
each model. The per-model tables live in tests/model_tables.py.
"""

import ast
import collections
from collections.abc import Sequence
import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
from model_tables import BATCH
from model_tables import CASE_NAMES
from model_tables import DROPOUT_SITES
from model_tables import FIELD_DIMS
from model_tables import MODEL_NAMES
from model_tables import PARAM_COUNTS
from model_tables import TEST_KWARGS
from model_tables import TORCHFM_PARITY
from model_tables import TWO_FIELD_ZERO_GRADIENTS
from model_tables import VARIANTS
from model_tables import build
from model_tables import initial_zero_gradients
from model_tables import module
from model_testing import check_config_model
from model_testing import init
from model_testing import loss_and_grads
from model_testing import random_ids
from model_testing import random_variables
import numpy as np

from configs import deepfm as deepfm_config
from configs import fm as fm_config
from configs import fnfm as fnfm_config
from configs import ncf as ncf_config
from configs import nfm as nfm_config
from model_contract import ContractError
import models
import threefry
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, 'models')

# Top-level names that may differ between model files. Every other class,
# function or constant defined in two or more files must be the same text.
SHARED_NAME_EXCEPTIONS = frozenset({'Model'})


def _source(name):
  with open(os.path.join(MODELS_DIR, f'{name}.py')) as f:
    return f.read()


def _top_level_definitions(source):
  """Yields `(name, source text)` of each top-level def, class and constant."""
  for node in ast.parse(source).body:
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      names = [node.name]
    elif isinstance(node, ast.Assign):
      names = [t.id for t in node.targets if isinstance(t, ast.Name)]
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names = [node.target.id]
    else:
      continue
    for name in names:
      yield name, ast.get_source_segment(source, node)


# Run in an empty directory holding copies of the model files; argv: the
# constructor arguments by model (a Python literal, tuples kept), then the
# project's directory.
_RUN_ALONE = """
import ast, importlib, json, sys
import jax, jax.numpy as jnp, numpy as np

ids = np.array([[0, 1], [2, 3], [1, 0], [0, 2]], np.int32)
labels = np.array([1, 0, 0, 1], np.float32)


def run(module, kwargs):
  model = importlib.import_module(module).Model(field_dims=(3, 4), **kwargs)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  v = model.init(rngs, ids, train=False)
  train, _ = model.apply(v, ids, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(2)})
  return model, v, [model.apply(v, ids).tolist(), train.tolist()]


def jitted(model, v):
  # One compiled program: the eval logits, the train loss and its gradient.
  def loss(params):
    logits, _ = model.apply({**v, 'params': params}, ids, train=True,
                            mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(2)})
    return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

  step = jax.jit(lambda p: (model.apply({**v, 'params': p}, ids),
                            *jax.value_and_grad(loss)(p)))
  logits, value, _ = step(v['params'])
  # The gradient along a random unit direction, and central differences,
  # off the initial parameters: there an activation can sit on its kink
  # (xdeepfm's one-sided differences: 0.141 and 0.163). On host arrays:
  # numpy's arithmetic compiles nothing.
  leaves, tree = jax.tree.flatten(jax.device_get(v['params']))
  rng = np.random.default_rng(0)
  normal = lambda x: rng.standard_normal(x.shape).astype(np.float32)
  point = [x + 0.1 * normal(x) for x in leaves]
  d = [normal(x) for x in leaves]
  d = [x / np.sqrt(sum(np.sum(y * y) for y in d)) for x in d]
  grads = jax.tree.leaves(jax.device_get(step(tree.unflatten(point))[2]))
  along = sum(np.sum(g * x) for g, x in zip(grads, d))
  eps = 1e-3
  moved = [step(tree.unflatten([p + s * eps * x for p, x in zip(point, d)]))[1]
           for s in (1, -1)]
  return [logits.tolist(), float(value), float(along),
          float(moved[0] - moved[1]) / (2 * eps)]


def copy_run(name, kw):
  model, v, out = run(name, kw)
  return out + [jitted(model, v)]


kwargs = ast.literal_eval(sys.argv[1])
copies = {name: copy_run(name, kw) for name, kw in kwargs.items()}
project = ('models', 'data', 'train', 'configs')
imported = sorted(m for m in sys.modules if m.split('.')[0] in project)
sys.path.insert(0, sys.argv[2])
ref = {name: run('models.' + name, kw)[2][0] for name, kw in kwargs.items()}
print(json.dumps([imported, copies, ref]))
"""


class ModelContractTest(parameterized.TestCase):
  def test_every_model_has_a_table_entry(self):
    problems = table_problems(
      {
        'PARAM_COUNTS': (PARAM_COUNTS, CASE_NAMES),
        'TEST_KWARGS': (TEST_KWARGS, MODEL_NAMES),
        'DROPOUT_SITES': (DROPOUT_SITES, MODEL_NAMES),
        'TORCHFM_PARITY': (TORCHFM_PARITY, MODEL_NAMES),
      }
    )
    if problems:  # One line each, naming the model and the table.
      self.fail('\n'.join(problems))

  def test_the_variants_are_the_configs_without_batch_norm(self):
    # A config that turns BatchNorm off builds a model that the model's
    # default does not: its variant runs the contract tests as well.
    off = [
      name
      for name in MODEL_NAMES
      if os.path.exists(os.path.join(ROOT, 'configs', f'{name}.py'))
      and importlib.import_module(f'configs.{name}')
      .get_config()
      .model.get('batch_norm', True)
      is False
    ]
    self.assertEqual(off, ['dcnv2', 'finalmlp'])
    self.assertEqual(
      sorted(m for m, kw in VARIANTS.values() if kw == {'batch_norm': False}),
      off,
    )
    # The variables' collections: their shapes suffice (nothing compiles).
    ids = random_ids(BATCH, FIELD_DIMS)
    rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}

    def collections_of(model):
      return jax.eval_shape(lambda: model.init(rngs, ids, train=False))

    for case, (name, _) in VARIANTS.items():
      with self.subTest(case):
        self.assertNotIn('batch_stats', collections_of(build(case)))
        self.assertIn('batch_stats', collections_of(build(name)))

  @parameterized.named_parameters((n, n) for n in CASE_NAMES)
  def test_output_shape_and_dtype(self, name):
    model = build(name)
    ids = random_ids(BATCH, FIELD_DIMS)
    rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
    # init's variables and the eval logits in one compiled program.
    logits = jax.jit(
      lambda ids: model.apply(
        model.init(rngs, ids, train=False), ids, train=False
      )
    )(ids)
    self.assertEqual(logits.shape, (BATCH,))
    self.assertEqual(logits.dtype, jnp.float32)
    self.assertTrue(np.all(np.isfinite(logits)))

  @parameterized.parameters('afm', 'autoint', 'finalmlp', 'fnfm', 'nfm')
  def test_two_dropout_rates_or_a_clear_error(self, name):
    # afm and finalmlp took the first two of three rates; nfm and fnfm
    # raised an unpacking error naming neither the argument nor what it
    # holds, finalmlp an IndexError at its first call.
    for rates in ((0.1,), (0.1, 0.2, 0.3)):
      with self.assertRaisesRegex(
        ValueError, r'^config\.model\.dropouts: give two rates \(.*\);'
      ):
        module(name).Model((3, 4), dropouts=rates)
    module(name).Model((3, 4), dropouts=(0.1, 0.2))

  def test_take_rows_clips_so_the_gather_needs_no_mask(self):
    # One copy (the copies are identical, tested below). A row past the
    # table reads its last row, padding (-1) row 0, and the compiled gather
    # has no select over its result: jnp.take's default 'fill' mode adds
    # one, which reads every gathered row again (benchmarks/README.md).
    take_rows = module('fm').take_rows
    table = jnp.arange(12.0).reshape(4, 3)
    rows = jnp.array([[0, 3], [-1, 7]])
    np.testing.assert_array_equal(
      take_rows(table, rows), table[jnp.array([[0, 3], [0, 3]])]
    )
    hlo = jax.jit(take_rows).lower(table, rows).compile().as_text()
    self.assertIn(' gather(', hlo)
    self.assertNotIn(' select(', hlo)

  def test_take_rows_apart_branches_only_in_a_trainers_cpu_program(self):
    # `apart` keeps the gather out of XLA:CPU's fusion with the flattening
    # reshape after it by a branch whose two sides are the same gather: the
    # same values and gradients, a conditional in the compiled program only
    # when the rows are collected (a trainer's program) and are 8 fields or
    # more, none otherwise (export) nor without `apart`.
    fm = module('fm')
    table = jnp.arange(24.0).reshape(8, 3)
    rows = jnp.array(  # [3, 8]; -1 is padding, most rows are read twice.
      [
        [0, 7, 1, 2, 3, 4, 5, 6],
        [-1, 5, 2, 2, 0, 0, 1, 1],
        [6, 5, 4, 3, 2, 1, 0, 7],
      ]
    )
    cotangent = jnp.arange(72.0).reshape(3, 24)

    class Flat(nn.Module):
      apart: bool

      @nn.compact
      def __call__(self, rows):
        t = self.param('t', lambda *_: table)
        x = fm.take_rows(t, rows, self, 't', self.apart)  # [3, F, 3]
        return x.reshape(x.shape[0], -1)  # [3, F * 3]

    def run(apart, collect, rows=rows):
      model = Flat(apart)
      variables = model.init(jax.random.key(0), rows)
      mutable = ['table_rows'] if collect else False

      def loss(params, rows):
        out = model.apply({'params': params}, rows, mutable=mutable)
        out = out[0] if collect else out
        return jnp.sum(out * cotangent[:, : out.shape[1]]), out

      fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
      (_, out), grads = fn(variables['params'], rows)
      hlo = fn.lower(variables['params'], rows).compile().as_text()
      return out, grads['t'], ' conditional(' in hlo

    plain_out, plain_grad, branched = run(apart=False, collect=True)
    self.assertFalse(branched)
    read = np.maximum(np.asarray(rows), 0)
    np.testing.assert_array_equal(plain_out, table[read].reshape(3, 24))
    expected_grad = np.zeros((8, 3))
    np.add.at(expected_grad, read, np.asarray(cotangent).reshape(3, 8, 3))
    np.testing.assert_array_equal(plain_grad, expected_grad)
    for collect in (True, False):
      out, grad, branched = run(apart=True, collect=collect)
      self.assertEqual(branched, collect)
      np.testing.assert_array_equal(out, plain_out)
      np.testing.assert_array_equal(grad, plain_grad)
    # Below 8 fields the plain gather.
    self.assertFalse(run(apart=True, collect=True, rows=rows[:, :7])[2])
    # The models whose embeddings only the MLP's flattening reads ask for it.
    field_dims = (3,) * 8
    for name, kwargs, branched in (
      ('wd', {}, True),
      ('ncf', dict(shared_embedding=False), True),
      ('fnn', dict(fm_linear_inputs=False), True),
      # Its factors are concatenated with the linear weights: no branch.
      ('fnn', dict(fm_linear_inputs=True), False),
    ):
      model = build(name, field_dims=field_dims, **kwargs)
      ids = random_ids(BATCH, field_dims)
      variables = init(model, ids)
      hlo = (
        jax.jit(
          lambda v, ids, model=model: model.apply(
            v, ids, train=False, mutable=['table_rows']
          )[0]
        )
        .lower(variables, ids)
        .compile()
        .as_text()
      )
      with self.subTest(model=name, **kwargs):
        self.assertEqual(' conditional(' in hlo, branched)
    # Not when numeric rows are concatenated after it: the concatenation
    # would fuse with the reshape again, slower than without the branch.
    model = build('wd', field_dims=field_dims, num_dense=2)
    ids, dense = random_ids(BATCH, field_dims), jnp.ones((BATCH, 2))
    variables = model.init(jax.random.key(0), ids, dense=dense)
    hlo = (
      jax.jit(
        lambda v, ids, dense: model.apply(
          v, ids, dense=dense, train=False, mutable=['table_rows']
        )[0]
      )
      .lower(variables, ids, dense)
      .compile()
      .as_text()
    )
    self.assertNotIn(' conditional(', hlo)

  @parameterized.named_parameters((n, n) for n in CASE_NAMES)
  def test_param_count(self, name):
    model = build(name)
    ids = random_ids(BATCH, FIELD_DIMS)
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params']))
    self.assertEqual(count, PARAM_COUNTS.get(name))

  @parameterized.named_parameters((n, n) for n in CASE_NAMES)
  def test_gradients_finite_and_nonzero(self, name):
    model = build(name)
    ids = random_ids(32, FIELD_DIMS)
    # Random parameters everywhere, so that zero-initialised leaves (the
    # linear term) do not hide the gradient of another leaf.
    variables = random_variables(model, ids, seed=2, scale=0.3)
    labels = (np.arange(32) % 2).astype(np.float32)
    _, _, grads, _ = loss_and_grads(
      model, variables, (ids,), labels, loss=_squared_error, seed=3
    )
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      with self.subTest(jax.tree_util.keystr(path)):
        self.assertTrue(np.all(np.isfinite(g)))
        self.assertGreater(float(jnp.max(jnp.abs(g))), 0.0)

  @parameterized.named_parameters((n, n) for n in CASE_NAMES)
  def test_every_parameter_gets_a_gradient_from_initialisation(self, name):
    # The TEST_KWARGS model on two fields, three draws: a parameter without
    # a gradient at the first step (behind a dead ReLU, in an unused branch)
    # may never train.
    zeros = initial_zero_gradients(name)
    expected = list(TWO_FIELD_ZERO_GRADIENTS.get(name, ()))
    self.assertEqual(zeros, dict.fromkeys(zeros, expected))

  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
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
    tree = ast.parse(_source(name))
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

  def test_names_defined_in_several_files_are_identical_copies(self):
    # Shared blocks are copied verbatim (DESIGN.md 2): whatever name two
    # files both define must be the same text, with no list to keep.
    copies = collections.defaultdict(list)
    for name in MODEL_NAMES:
      for block, text in _top_level_definitions(_source(name)):
        copies[block].append((name, text))
    shared = {
      block: versions
      for block, versions in copies.items()
      if len(versions) > 1 and block not in SHARED_NAME_EXCEPTIONS
    }
    # The parse found the blocks that most files share.
    self.assertGreater(len(shared.get('FeaturesLinear', ())), 2)
    self.assertGreater(len(shared.get('MultiLayerPerceptron', ())), 2)
    for block, versions in sorted(shared.items()):
      first_name, first = versions[0]
      for other_name, other in versions[1:]:
        with self.subTest(block=block, file=other_name):
          self.assertEqual(
            first,
            other,
            f'{block} differs in models/{first_name}.py and '
            f'models/{other_name}.py',
          )

  def test_each_model_file_runs_alone_in_an_empty_directory(self):
    # One subprocess for all models keeps the JAX start-up cost single.
    # Eager calls where they suffice: the primitives that the models share
    # compile once for all of them (copies and project files alike). Each
    # copy compiles once more, whole, under jit with its gradient, on one
    # batch of 4 rows (about 5 s of CPU for the 20 models). The copies run
    # first, with nothing of the project importable; then the project's
    # directory goes on the path and its files compute the reference in the
    # same process.
    kwargs = {n: TEST_KWARGS.get(n, {}) for n in MODEL_NAMES}
    with tempfile.TemporaryDirectory() as tmp:
      for name in MODEL_NAMES:
        with open(os.path.join(tmp, f'{name}.py'), 'w') as dst:
          dst.write(_source(name))
      env = dict(os.environ, PYTHONPATH='')
      result = subprocess.run(
        [sys.executable, '-c', _RUN_ALONE, repr(kwargs), ROOT],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
      )
    self.assertEqual(result.returncode, 0, result.stderr)
    alone, outputs, reference = json.loads(
      result.stdout.strip().splitlines()[-1]
    )
    # Nothing of the project was imported while the copies ran.
    self.assertEqual(alone, [])
    self.assertEqual(sorted(outputs), MODEL_NAMES)
    labels = np.array([1, 0, 0, 1])
    for name in MODEL_NAMES:
      # The copy computes what the project's file computes.
      eval_out, train_out, (jit_out, loss, along, differences) = outputs[name]
      np.testing.assert_allclose(
        eval_out, reference[name], rtol=1e-5, err_msg=name
      )
      self.assertLen(train_out, 4, name)
      self.assertTrue(np.all(np.isfinite(train_out)), name)
      # Under jit, the same logits and the eager train logits' loss; its
      # gradient along a random direction matches central differences.
      np.testing.assert_allclose(jit_out, eval_out, rtol=1e-5, err_msg=name)
      train_out = np.array(train_out)
      eager = np.mean(np.logaddexp(0, train_out) - labels * train_out)
      self.assertAlmostEqual(loss, eager, places=5, msg=name)
      self.assertNotEqual(along, 0.0, name)
      np.testing.assert_allclose(
        along, differences, rtol=1e-2, atol=5e-5, err_msg=name
      )


def table_problems(tables: dict) -> list[str]:
  """Each entry missing from or extra in tests/model_tables.py, in words.

  Args:
    tables: table name -> (the table, the model or case names it needs).
  """
  problems = []
  for table, (entries, names) in tables.items():
    problems += [
      f'{table} in tests/model_tables.py has no entry for {name!r}: add'
      f' one as the other models have (models/{VARIANTS.get(name, [name])[0]}'
      '.py)'
      for name in sorted(set(names) - set(entries))
    ]
    problems += [
      f'{table} in tests/model_tables.py has an entry for {name!r}, which'
      ' is no model (nor variant): remove it or rename it'
      for name in sorted(set(entries) - set(names))
    ]
  return problems


def _squared_error(logits, labels):
  return jnp.mean(jnp.square(logits - labels))


def _fields(name):
  """Constructor argument names of models/<name>.py's Model."""
  return {f.name for f in dataclasses.fields(module(name).Model)}


# Field sizes for the initialisation statistics: a few thousand numbers per
# table, so that the bounds below are tight.
INIT_FIELD_DIMS = (300, 500, 200)

# Dense layers outside the MLP that `linear_init` starts too, by a part of
# their parameter path: those whose pytorch-fm counterpart is a Linear.
TORCH_INIT_LAYERS = {
  'ncf': ("['prediction']",),
  'dcn': ("['VectorCrossNetwork_0']['w_", "['output']"),
  'fibinet': ("['DeepNetwork_0']", "['SqueezeExcitation_0']"),
}


class InitialisationTest(parameterized.TestCase):
  """Initial values as pytorch-fm's, except the zero linear term.

  The bounds are 6 standard errors of the statistic for the table's sample
  size: a false alarm is a 1e-8 event, while N(0, 1) values or another
  initialiser miss them by far.
  """

  def _params(self, name):
    model = build(name, field_dims=INIT_FIELD_DIMS)
    ids = random_ids(4, INIT_FIELD_DIMS)
    return init(model, ids)['params']

  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_embedding_tables_are_xavier_uniform(self, name):
    # torch.nn.init.xavier_uniform_ on each [rows, dim] table: U(-b, b) with
    # b = sqrt(6 / (rows + dim)), so mean 0 and variance b^2 / 3. FFM-style
    # [rows, fields, dim] tables are one such table per field.
    for path, table in jax.tree_util.tree_leaves_with_path(self._params(name)):
      if path[-1].key != 'embedding':
        continue
      table = np.asarray(table, np.float64)
      rows, dim = table.shape[0], table.shape[-1]
      bound = np.sqrt(6.0 / (rows + dim))
      slices = table.reshape(rows, -1, dim)
      for i in range(slices.shape[1]):
        x = slices[:, i].ravel()
        n = x.size
        with self.subTest(f'{jax.tree_util.keystr(path)}[:, {i}]'):
          self.assertLessEqual(np.max(np.abs(x)), bound)
          # The support is filled: the largest |x| is near the bound.
          self.assertGreater(np.max(np.abs(x)), bound * (1 - 20.0 / n))
          self.assertLess(abs(x.mean()), 6 * bound / np.sqrt(3 * n))
          var_se = np.sqrt(4.0 / 45.0) * bound**2 / np.sqrt(n)
          self.assertLess(abs(x.var() - bound**2 / 3), 6 * var_se)
          # Uniform, not bell-shaped: half the values inside b / 2.
          inner = np.mean(np.abs(x) < bound / 2)
          self.assertLess(abs(inner - 0.5), 6 * 0.5 / np.sqrt(n))

  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_linear_terms_start_at_zero(self, name):
    # Unlike pytorch-fm's N(0, 1) (models/*.py docstrings): every weight and
    # bias of a linear-term block (FeaturesLinear, CrossProductLinear) is 0.
    for path, x in jax.tree_util.tree_leaves_with_path(self._params(name)):
      if any('Linear' in str(getattr(k, 'key', '')) for k in path[:-1]):
        with self.subTest(jax.tree_util.keystr(path)):
          np.testing.assert_array_equal(x, np.zeros_like(x))

  @parameterized.named_parameters(
    (n, n) for n in MODEL_NAMES if 'linear_init' in _fields(n)
  )
  def test_torch_linear_init_is_torch_nn_linear_default(self, name):
    # linear_init='torch' changes the MLP's Dense layers, and the other Dense
    # layers that a model's docstring names (TORCH_INIT_LAYERS), and nothing
    # else (Flax derives each layer's key from its path): kernel and bias
    # (where there is one) U(-b, b) with b = 1/sqrt(fan_in), as
    # torch.nn.Linear. The default stays Flax's: LeCun-normal kernels
    # (variance 1/fan_in), zero biases.
    ids = random_ids(4, INIT_FIELD_DIMS)
    torch_params = init(
      build(name, field_dims=INIT_FIELD_DIMS, linear_init='torch'), ids
    )['params']
    flat = dict(jax.tree_util.tree_leaves_with_path(self._params(name)))
    torch_flat = dict(jax.tree_util.tree_leaves_with_path(torch_params))
    scaled = {'kernel': ([], []), 'bias': ([], [])}
    others = TORCH_INIT_LAYERS.get(name, ())
    for path, x in torch_flat.items():
      where = jax.tree_util.keystr(path)
      lecun = np.asarray(flat[path], np.float64)
      if np.array_equal(lecun, x):
        self.assertFalse(any(o in where for o in others), where)
        continue
      self.assertTrue(
        'MultiLayerPerceptron' in where
        or 'mlp' in where
        or any(o in where for o in others),
        where,
      )
      kind = path[-1].key
      (fan_in,) = [
        v.shape[0]
        for p, v in torch_flat.items()
        if p[:-1] == path[:-1] and p[-1].key == 'kernel'
      ]
      scaled[kind][0].append(np.ravel(x) * np.sqrt(fan_in))
      scaled[kind][1].append(np.ravel(lecun) * np.sqrt(fan_in))
    self.assertNotEmpty(scaled['kernel'][0])
    # The hidden layers have no bias (BatchNorm follows them); an output
    # layer has one.
    self.assertLess(len(scaled['bias'][0]), len(scaled['kernel'][0]))
    for kind, (torch_x, lecun_x) in scaled.items():
      if not torch_x:
        continue
      x, ref = np.concatenate(torch_x), np.concatenate(lecun_x)
      n = x.size
      with self.subTest(kind):
        # U(-1, 1) once scaled by sqrt(fan_in): variance 1/3.
        self.assertLessEqual(np.max(np.abs(x)), 1.0)
        self.assertLess(abs(x.mean()), 6 / np.sqrt(3 * n))
        self.assertLess(abs(x.var() - 1 / 3), 6 * np.sqrt(4 / 45 / n))
        if kind == 'bias':
          np.testing.assert_array_equal(ref, 0.0)
        else:
          # LeCun normal: variance 1 once scaled (a 6-sigma band).
          self.assertLess(abs(ref.var() - 1.0), 6 * np.sqrt(2 / n))
    with self.assertRaisesRegex(ValueError, "linear_init must be 'lecun'"):
      init(build(name, field_dims=INIT_FIELD_DIMS, linear_init='x'), ids)


class ConfigTest(parameterized.TestCase):
  @parameterized.parameters(
    (
      'nfm',
      nfm_config,
      dict(embed_dim=64, mlp_dims=(64,), linear_init='torch'),
    ),
    (
      'ncf',
      ncf_config,
      dict(embed_dim=16, mlp_dims=(16, 16), dropout=0.2, linear_init='torch'),
    ),
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
    check_config_model(module(name), config)


class Toy(nn.Module):
  """A 2-field draft for the start-up checks: a pairwise term, then `out`.

  Attributes:
    field_dims: number of ids of each field.
    out: 'logits'; 'sigmoid' (`nn.sigmoid` of them), 'formula' (`1 / (1 +
      exp(-x))` of a column, squeezed) or 'train_column' (`[batch, 1]` in
      training alone).
    batch_norm: None; 'synced' (a BatchNorm over `axis_name`),
      'train_only' (built in training alone) or 'train_unsynced' (off the
      axis in training).
    axis_name: the pmap axis.
  """

  field_dims: Sequence[int]
  out: str = 'logits'
  batch_norm: str | None = None
  axis_name: str | None = None

  @nn.compact
  def __call__(self, ids, *, train=False):
    table = self.param(
      'embedding', nn.initializers.normal(0.1), (sum(self.field_dims), 2)
    )
    rows = ids + np.array([0, self.field_dims[0]])  # [B, 2]
    v = module('fm').take_rows(table, rows, self, 'embedding')  # [B, 2, D]
    if self.batch_norm == 'train_only':
      if train:
        v = nn.BatchNorm(use_running_average=False, axis_name=self.axis_name)(v)
    elif self.batch_norm:
      off = self.batch_norm == 'train_unsynced' and train
      axis = None if off else self.axis_name
      v = nn.BatchNorm(use_running_average=not train, axis_name=axis)(v)
    y = jnp.sum(v[:, 0] * v[:, 1], axis=-1)  # [B]
    if self.out == 'sigmoid':
      return nn.sigmoid(y)
    if self.out == 'formula':
      return (1.0 / (1.0 + jnp.exp(-y[:, None]))).squeeze(-1)
    return y[:, None] if self.out == 'train_column' and train else y


def _toy_config(**model):
  config = fm_config.get_config('smoke')
  config.model_name = 'toy'
  config.model = model
  config.optimizer = 'adam'
  return config


class StartUpCheckTest(absltest.TestCase):
  """What `model_contract.check` and the train program's trace refuse."""

  def test_the_model_init_is_traced_once_for_both_shapes(self):
    # The contract check's variables and the train state's shapes share one
    # trace of `model.init`, which the init program reuses; the check
    # traces the eval call once more.
    model = Toy((3, 4), axis_name=train.AXIS)
    calls = []

    def count(next_fun, args, kwargs, context):
      if isinstance(context.module, Toy):
        calls.append(context.method_name)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
      init = train.state_initializer(_toy_config(), model)
      jax.eval_shape(init, threefry.key(0))
    self.assertEqual(calls, ['__call__', '__call__'])

  def test_probabilities_are_refused(self):
    # Trained through the loss's own sigmoid, FM's test AUC fell from
    # 0.7875 to 0.7719 with no word. `nn.sigmoid` is one `logistic`; the
    # formula, on a column squeezed after it, is 1 / (1 + exp(-x)).
    for out in ('sigmoid', 'formula'):
      model = Toy((3, 4), out=out, axis_name=train.AXIS)
      with self.subTest(out), self.assertRaises(ContractError) as caught:
        train.state_initializer(_toy_config(out=out), model)
      message = str(caught.exception)
      self.assertIn('train=False) returns probabilities', message)
      self.assertIn('drop the sigmoid', message)
      self.assertNotIn('\n', message)

  def test_a_batch_norm_met_in_training_alone_is_checked_there(self):
    # The start-up check traces the eval call, which meets neither; the
    # train program's trace (train.loss_fn, here one device's batch under
    # the pmap axis) refuses both, the first before flax's own error for
    # its missing scale.
    batch = {'ids': np.zeros((1, 4, 2), np.int32), 'label': np.zeros((1, 4))}
    for norm, told in (
      ('train_only', 'BatchNorm BatchNorm_0 is built in training alone'),
      ('train_unsynced', r'BatchNorm_0 \(axis_name=None\) does not average'),
      ('synced', None),  # Built in both modes over the axis: accepted.
    ):
      model = Toy((3, 4), batch_norm=norm, axis_name=train.AXIS)
      init = train.state_initializer(_toy_config(), model)
      state = jax.eval_shape(init, threefry.key(0))
      loss = jax.vmap(
        functools.partial(train.loss_fn, model=model),
        in_axes=(None, None, 0, None),
        axis_name=train.AXIS,
      )
      args = state.params, state.batch_stats, batch, jax.random.key(0)
      with self.subTest(norm):
        if told is None:
          jax.eval_shape(loss, *args)
          continue
        with self.assertRaisesRegex(ContractError, told) as caught:
          jax.eval_shape(loss, *args)
        self.assertIn('axis_name=self.axis_name', str(caught.exception))

  def test_a_refused_first_run_leaves_only_its_config_and_lock(self):
    # The train program's trace refused its logits only after the encoder,
    # sources.json and checkpoints/ were written. Now such a first run
    # leaves what a refusal by the start-up check leaves: config.json (the
    # first thing a run writes) and the lock file.
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    ratings = os.path.join(tmp, 'ratings.csv')
    with open(ratings, 'w') as f:
      f.write('userId,movieId,rating,timestamp\n')
      f.writelines(f'{i % 7},{i % 11},{i % 5 + 1},{i}\n' for i in range(300))
    # Not mock.patch.dict(sys.modules): its exit would drop the modules
    # that the run imports (pandas' parsers), and later imports break.
    sys.modules['models.toy'] = mock.Mock(Model=Toy)
    self.addCleanup(sys.modules.pop, 'models.toy')
    with mock.patch.object(models, 'names', lambda: [*MODEL_NAMES, 'toy']):
      left = {}
      for out, told in (
        ('sigmoid', 'train=False) returns probabilities'),
        ('train_column', 'train=True) returned float32['),
      ):
        config = _toy_config(out=out)
        config.dataset.path = ratings
        config.dataset.cache_dir = os.path.join(tmp, 'cache')
        config.batch_size = 64
        workdir = os.path.join(tmp, out)
        with self.assertRaises(utils.UserError) as caught:
          train.train_and_evaluate(config, workdir)
        self.assertStartsWith(str(caught.exception), 'models/toy.py: ')
        self.assertIn(told, str(caught.exception))
        left[out] = sorted(os.listdir(workdir))
    self.assertEqual(left['sigmoid'], ['config.json', 'run.lock'])
    self.assertEqual(left['train_column'], left['sigmoid'])

  def test_a_missing_table_entry_names_the_model_and_the_table(self):
    # Before, a new model without its entries failed as 'Lists differ'.
    problems = table_problems(
      {
        'TEST_KWARGS': ({'fm': {}, 'old': {}}, ['fm', 'new']),
        'PARAM_COUNTS': ({'fm': 1}, ['fm', 'dcnv2_no_batch_norm']),
      }
    )
    self.assertEqual(
      problems,
      [
        "TEST_KWARGS in tests/model_tables.py has no entry for 'new': add"
        ' one as the other models have (models/new.py)',
        "TEST_KWARGS in tests/model_tables.py has an entry for 'old', which"
        ' is no model (nor variant): remove it or rename it',
        'PARAM_COUNTS in tests/model_tables.py has no entry for'
        " 'dcnv2_no_batch_norm': add one as the other models have"
        ' (models/dcnv2.py)',
      ],
    )


if __name__ == '__main__':
  absltest.main()
