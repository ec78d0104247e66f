"""Contracts of DESIGN.md that no other test guards, on the code's output."""

import ast
import dataclasses
import functools
import importlib
import inspect
import json
import os
import tempfile
import tomllib
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from model_tables import CASE_NAMES
from model_tables import FIELD_DIMS
from model_tables import MODEL_NAMES
from model_tables import TEST_KWARGS
from model_tables import build
from model_testing import random_ids
from model_testing import random_variables
from model_testing import side_inputs
import numpy as np

import batching
from configs import default
import data
import programs
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages of our scripts rather than of the library.
SCRIPTS = ('benchmarks',)


def _project_modules() -> dict[str, str]:
  """{module name: path} of the library's modules: the files at the top and
  those of its packages (configs, datasets, models)."""
  out = {}
  for entry in sorted(os.listdir(ROOT)):
    path = os.path.join(ROOT, entry)
    if entry.endswith('.py'):
      out[entry[:-3]] = path
    elif entry not in SCRIPTS and os.path.exists(f'{path}/__init__.py'):
      for name in sorted(os.listdir(path)):
        if name.endswith('.py'):
          module = entry if name == '__init__.py' else f'{entry}.{name[:-3]}'
          out[module] = os.path.join(path, name)
  return out


class DeprecationFilterTest(absltest.TestCase):
  def test_deprecation_warnings_of_every_project_module_are_errors(self):
    # DESIGN.md 5: the tests run with DeprecationWarnings as errors for our
    # own code. pyproject.toml named 10 modules, and 48 only warned:
    # programs.py (the pmap programs), checkpoints.py (orbax), predict.py,
    # export.py, configs/ and more; then none of benchmarks/ or tests/. A
    # DeprecationWarning raised in each module, under the filters
    # pyproject.toml gives pytest, must raise.
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
      filters = tomllib.load(f)['tool']['pytest']['ini_options']
    modules = _project_modules()
    for package in ('benchmarks', 'tests'):  # Tests import theirs at the top.
      directory = os.path.join(ROOT, package)
      prefix = '' if package == 'tests' else f'{package}.'
      for name in sorted(os.listdir(directory)):
        if name.endswith('.py') and name != '__init__.py':
          modules[prefix + name[:-3]] = os.path.join(directory, name)
    for name in ('programs', 'datasets.core', 'models.fm'):
      self.assertIn(name, modules)
    for name in ('benchmarks.throughput', 'test_main', 'conftest'):
      self.assertIn(name, modules)
    with warnings.catch_warnings():
      warnings.resetwarnings()
      for entry in filters['filterwarnings']:
        action, message, category, module = (entry.split(':') + [''] * 4)[:4]
        self.assertEqual(category, 'DeprecationWarning', entry)
        warnings.filterwarnings(action, message, DeprecationWarning, module)
      warnings.simplefilter('ignore', DeprecationWarning, append=True)
      missed = []
      for name, path in sorted(modules.items()):
        try:
          warnings.warn_explicit(
            'deprecated', DeprecationWarning, path, 1, name
          )
        except DeprecationWarning:
          continue
        missed.append(name)
    self.assertEqual(missed, [], 'add them to pyproject.toml filterwarnings')


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The project modules that the file at `path` imports, at its top or in
  a function, but not for type checking alone (`if TYPE_CHECKING:`).

  `importlib.import_module(name)` counts too: a constant name as itself, a
  formatted one (`f'datasets.{f}'`) as every module whose name begins with
  its constant start (data.py's registry imports the sources so).
  """
  with open(path) as f:
    tree = ast.parse(f.read())
  checking = {
    id(node)
    for block in ast.walk(tree)
    if isinstance(block, ast.If) and 'TYPE_CHECKING' in ast.unparse(block.test)
    for stmt in block.body
    for node in ast.walk(stmt)
  }
  out = set()
  for node in ast.walk(tree):
    if id(node) in checking:
      continue
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      if node.module in modules:
        out.add(node.module)
      for a in node.names:
        if f'{node.module}.{a.name}' in modules:
          out.add(f'{node.module}.{a.name}')
    elif (
      isinstance(node, ast.Call)
      and ast.unparse(node.func) in ('importlib.import_module', 'import_module')
      and node.args
    ):
      name = node.args[0]
      if isinstance(name, ast.Constant) and name.value in modules:
        out.add(name.value)
      elif isinstance(name, ast.JoinedStr) and name.values:
        start = name.values[0]
        start = start.value if isinstance(start, ast.Constant) else ''
        out.update(m for m in modules if start and m.startswith(start))
  return out


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """A cycle of `graph` ({module: imported modules}) as a path, or []."""
  state = {}  # 1: on the path, 2: done.

  def visit(node, path):
    state[node] = 1
    for other in sorted(graph[node]):
      if state.get(other) == 1:
        return path[path.index(other) :] + [other]
      if other not in state and (found := visit(other, path + [other])):
        return found
    state[node] = 2
    return []

  for node in sorted(graph):
    if node not in state and (found := visit(node, [node])):
      return found
  return []


class ImportLayersTest(absltest.TestCase):
  def test_imports_go_only_downward(self):
    # DESIGN.md 7: no file imports one that imports it, through any chain
    # (the sources and data.py, the encoder and the registry, optim.py and
    # train.py closed such circles before the restructuring).
    modules = _project_modules()
    graph = {
      name: _imports(path, modules) - {name} for name, path in modules.items()
    }
    # The parse finds the imports: train.py's of the layers below it.
    self.assertLessEqual({'data', 'optim', 'programs'}, graph['train'])
    self.assertIn('datasets.core', graph['data'])
    # And data.py's importlib import of the sources (its registry).
    self.assertIn('datasets.movielens', graph['data'])
    self.assertEqual(_cycle(graph), [])
    # The shared types sit at the bottom: nothing of the data layers above.
    self.assertLessEqual(graph['datasets.core'], {'utils'})


def _has_batch_norm(name: str) -> bool:
  with open(os.path.join(ROOT, 'models', f'{name}.py')) as f:
    return 'nn.BatchNorm(' in f.read()


# BatchNorm models whose statistics test_model_training.py's
# BatchNormAcrossDevicesTest checks on 2 devices against the global batch's
# (a BatchNorm without axis_name fails there, named). The whole step runs
# here on two of them, which catch what is common to all (train.create_model
# passing axis_name, train_step's pmean); a BatchNorm model not listed runs
# here too.
SYNCED_ELSEWHERE = (
  'afn',
  'autoint',
  'dcn',
  'dcnv2',
  'deepfm',
  'finalmlp',
  'fnfm',
  'fnn',
  'ncf',
  'nfm',
  'pnn',
  'wd',
  'xdeepfm',
)
WHOLE_STEP = ('afn', 'fnn')


class ReplicasTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (n, n)
    for n in MODEL_NAMES
    if _has_batch_norm(n) and (n in WHOLE_STEP or n not in SYNCED_ELSEWHERE)
  )
  def test_a_pmapped_step_leaves_one_state_on_every_device(self, name):
    # DESIGN.md 4 and 5: pmap does not check that replicas agree, and the
    # run saves device 0's copy. Each device trains on its own half batch;
    # a BatchNorm without the pmap axis (axis_name) would keep that half's
    # statistics on its device. Every leaf of the state, statistics,
    # parameters and optimizer slots, must be the same on both.
    self.assertEqual(jax.local_device_count(), 2, 'conftest sets 2 devices')
    config = default.get_config('smoke')
    config.model_name = name
    config.model = ml_collections.ConfigDict(TEST_KWARGS[name])
    model = train.create_model(config, FIELD_DIMS, axis_name=train.AXIS)
    config = train.resolve_optimizer(config, model)
    state = train.state_initializer(config, model)(jax.random.key(0))
    self.assertNotEmpty(jax.tree.leaves(state.batch_stats))
    batch = {
      'ids': random_ids(16, FIELD_DIMS, seed=1),
      'label': (np.arange(16) % 2).astype(np.float32),
    }
    p_step = jax.pmap(
      functools.partial(train.train_step, model=model, config=config),
      axis_name=train.AXIS,
    )
    new, _ = p_step(
      train.replicate(state),
      batching.shard(batch, 2),
      train.replicate(train.hyperparameters(config)),
    )
    differ = [
      jax.tree_util.keystr(path)
      for path, x in jax.tree_util.tree_leaves_with_path(new)
      if not np.array_equal(x.addressable_data(0), x.addressable_data(1))
    ]
    self.assertEqual(differ, [])
    # The statistics moved: the step updated them.
    moved = jax.tree.map(
      lambda a, b: np.abs(np.asarray(a.addressable_data(0))[0] - b).max(),
      new.batch_stats,
      state.batch_stats,
    )
    self.assertGreater(min(jax.tree.leaves(moved)), 0)


class RunFilesTest(absltest.TestCase):
  def test_metrics_jsonl_and_config_json_hold_what_design_md_says(self):
    # DESIGN.md 4: every line has split, epoch and step; train lines add
    # loss and examples_per_sec, valid and test lines auc, logloss and
    # num_examples (and each line wall_time and time, metrics.py); the last
    # line is the test line; config.json holds the resolved config.
    config = default.get_config('smoke')
    config.model = ml_collections.ConfigDict(dict(embed_dim=4))
    with tempfile.TemporaryDirectory() as workdir:
      config.dataset.cache_dir = os.path.join(workdir, 'cache')
      test = train.train_and_evaluate(config, workdir)
      with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        lines = [json.loads(line) for line in f]
      with open(os.path.join(workdir, 'config.json')) as f:
        saved = json.load(f)
      dataset = data.load_dataset(config.dataset)
    steps = len(dataset.train) // config.batch_size
    common = {'split': str, 'epoch': int, 'step': int}
    common.update(wall_time=float, time=float)
    fields = {
      'train': dict(common, loss=float, examples_per_sec=float),
      'valid': dict(common, auc=float, logloss=float, num_examples=int),
    }
    fields['test'] = fields['valid']
    self.assertEqual(
      [(r['split'], r['epoch']) for r in lines],
      [('train', 1), ('valid', 1), ('train', 2), ('valid', 2)]
      + [('test', lines[-1]['epoch'])],
    )
    for record in lines:
      want = fields[record['split']]
      self.assertEqual(
        {k: type(v) for k, v in record.items()}, want, record['split']
      )
      self.assertEqual(record['step'], record['epoch'] * steps)
    valid = [r for r in lines if r['split'] == 'valid']
    best = max(valid, key=lambda r: r['auc'])
    self.assertEqual(lines[-1]['epoch'], best['epoch'])
    self.assertEqual(valid[0]['num_examples'], len(dataset.valid))
    self.assertEqual(lines[-1]['num_examples'], len(dataset.test))
    self.assertEqual(
      test, {k: lines[-1][k] for k in ('auc', 'logloss', 'num_examples')}
    )
    # Resolved: 'auto' is saved as the optimizer it chose.
    self.assertEqual(config.optimizer, 'auto')
    self.assertEqual(saved['optimizer'], 'adam')
    self.assertEqual(saved['model'], config.model.to_dict())


class SparseStepMemoryTest(absltest.TestCase):
  def test_the_row_wise_steps_form_no_table_sized_gradient(self):
    # DESIGN.md 4: the sparse path must never materialise a table-sized
    # gradient. The run's train program (train.pmapped_steps), compiled
    # from shapes for FM on tables of 500,000 rows: dense Adam's temporary
    # buffers hold the embedding table's gradient (30.5 MiB here); the
    # row-wise optimizers' hold the batch's rows and an int32 per table row
    # (sparse.dedup's scratch), 5.8 MiB.
    field_dims, dim = (300_000, 200_000), 16
    table = sum(field_dims) * dim * 4  # Bytes of the embedding table.
    devices = jax.local_device_count()
    batches = {  # [devices, steps, batch / devices, ...]
      'ids': jax.ShapeDtypeStruct((devices, 2, 64, 2), np.int32),
      'label': jax.ShapeDtypeStruct((devices, 2, 64), np.float32),
    }
    temp = {}
    for optimizer in ('adam', 'lazy_adam', 'rowwise_adagrad'):
      config = default.get_config('smoke')
      config.optimizer = optimizer
      config.model = ml_collections.ConfigDict(dict(embed_dim=dim))
      model = train.create_model(config, field_dims, axis_name=train.AXIS)
      shapes = jax.eval_shape(
        train.state_initializer(config, model), jax.random.key(0)
      )
      hyper = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((), np.result_type(x)),
        train.hyperparameters(config),
      )
      p_train_step, _ = train.pmapped_steps(model, config)
      args = (
        programs.replicated_shapes(shapes),
        batches,
        programs.replicated_shapes(hyper),
        None,
        programs.replicated_shapes(jax.ShapeDtypeStruct((), np.int32)),
      )
      compiled = p_train_step.lower(*args).compile()
      temp[optimizer] = compiled.memory_analysis().temp_size_in_bytes
    # The measure sees a table-sized gradient where there is one.
    self.assertGreaterEqual(temp['adam'], table, temp)
    self.assertLess(temp['lazy_adam'], table / 3, temp)
    self.assertLess(temp['rowwise_adagrad'], table / 3, temp)


class ModelFileTest(parameterized.TestCase):
  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_signature_and_docstring_are_the_contracts(self, name):
    # DESIGN.md 2: Model(field_dims, ..., axis_name=None, dtype=float32),
    # the file ends with `Model = <ClassName>`, it is called as
    # `apply(variables, ids, train=bool)`, and its docstring cites the
    # paper (year and link) and how it differs from pytorch-fm, with shapes.
    path = os.path.join(ROOT, 'models', f'{name}.py')
    with open(path) as f:
      tree = ast.parse(f.read())
    last = tree.body[-1]
    self.assertIsInstance(last, ast.Assign)
    self.assertEqual(ast.unparse(last.targets[0]), 'Model')
    model = importlib.import_module(f'models.{name}').Model
    self.assertEqual(ast.unparse(last.value), model.__name__)
    self.assertTrue(issubclass(model, nn.Module))
    fields = {
      f.name: f
      for f in dataclasses.fields(model)
      if f.name not in ('parent', 'name')
    }
    first = next(iter(fields.values()))
    self.assertEqual(first.name, 'field_dims')
    self.assertIs(first.default, dataclasses.MISSING)
    self.assertIsNone(fields['axis_name'].default)
    self.assertIs(fields['dtype'].default, jnp.float32)
    params = list(inspect.signature(model.__call__).parameters.values())
    self.assertEqual(params[1].name, 'ids')
    self.assertEqual(params[1].kind, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    train_arg = inspect.signature(model.__call__).parameters['train']
    self.assertEqual(train_arg.kind, inspect.Parameter.KEYWORD_ONLY)
    doc = ast.get_docstring(tree)
    self.assertRegex(doc, r'https://(arxiv\.org|doi\.org)/')
    self.assertRegex(doc, r'\b(19|20)\d\d\b')  # The paper's year.
    self.assertIn('pytorch-fm', doc)
    self.assertIn('[batch', doc)


class PaddingTest(parameterized.TestCase):
  @parameterized.named_parameters((n, n) for n in CASE_NAMES)
  def test_padding_rows_change_no_score_and_score_finite(self, name):
    # DESIGN.md 3: evaluation pads the last batch and masks the padding, so
    # metrics are exact. That needs each row's eval logit to depend on its
    # row alone (BatchNorm on its running averages), and the padding rows
    # (batching.eval_batches': id 0, empty lists, 0) to score finite:
    # eval_step multiplies their losses by a mask of 0, and NaN * 0 is NaN.
    model = build(name, multi_field_dims=(6, 9), num_dense=2)
    ids = random_ids(5, FIELD_DIMS, seed=3)
    multi_ids, dense = side_inputs(5, (6, 9), seed=4)
    labels = np.ones(5, np.float32)
    split = data.Split(ids, labels, multi_ids, dense)
    (batch,) = batching.eval_batches(split, 8)
    self.assertEqual(batch['mask'].tolist(), [1.0] * 5 + [0.0] * 3)
    # The batch contract: its keys and dtypes.
    self.assertEqual(
      {k: v.dtype for k, v in batch.items()},
      dict(
        ids=np.int32,
        label=np.float32,
        multi_ids=np.int32,
        dense=np.float32,
        mask=np.float32,
      ),
    )
    variables = random_variables(model, ids, multi_ids, dense, seed=5)
    inputs = batching.model_inputs(batch)
    padded = np.asarray(model.apply(variables, **inputs, train=False))
    alone = np.asarray(
      model.apply(variables, ids, multi_ids, dense, train=False)
    )
    np.testing.assert_allclose(padded[:5], alone, rtol=1e-5, atol=1e-6)
    self.assertTrue(np.all(np.isfinite(padded)), padded)


if __name__ == '__main__':
  absltest.main()
