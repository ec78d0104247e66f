"""Shared by the model tests: inputs, compiled calls, numpy references, checks.

Compiled calls: eager `model.init` and `jax.grad` dispatch every primitive
on its own, one small compilation each. Here each call is one `jax.jit`
program, cached by the (hashable) module, so that a second call with the
same model and shapes compiles nothing; where only shapes matter
(`random_variables`), `jax.eval_shape` compiles nothing at all.

Numpy references follow the layer names of the shared blocks that every
model file copies (`FeaturesLinear`, `FeaturesEmbedding`,
`MultiLayerPerceptron`). The torch converters read torchfm 0.7.0 state
dicts as tools/make_torchfm_fixtures.py stores them (`w/<name>` weights,
`grad/<name>` gradients, `after/<name>` running statistics after one
training step).
"""

import functools
import itertools
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

# Flax's BatchNorm epsilon, which is also torch's.
EPS = 1e-5
FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


# Inputs and parameters.


def offsets(field_dims):
  """First row of each field in a table shared by the fields: `[fields]`."""
  return np.cumsum((0,) + tuple(field_dims[:-1]))


def random_ids(batch, field_dims, seed=0):
  """Uniform ids `[batch, fields]` int32."""
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.integers(0, d, size=batch) for d in field_dims], axis=1
  ).astype(np.int32)


def side_inputs(batch, multi_field_dims, num_dense=2, seed=0):
  """Multi-hot ids `[batch, fields, 3]` and numeric values `[batch, dense]`.

  Each list holds 0 to 3 distinct ids padded with -1, so some are empty.
  """
  rng = np.random.default_rng(seed)
  multi = np.full((batch, len(multi_field_dims), 3), -1, np.int32)
  for b in range(batch):
    for m, d in enumerate(multi_field_dims):
      n = rng.integers(0, 4)
      multi[b, m, :n] = rng.choice(d, size=n, replace=False)
  dense = rng.normal(size=(batch, num_dense)).astype(np.float32)
  return multi, dense


def randomize(variables, seed=1, scale=0.5):
  """Random parameters (N(0, scale^2)) and BatchNorm statistics everywhere.

  Zero-initialised leaves (the linear term) would otherwise hide the effect
  of whatever follows them; running variances are drawn from [0.5, 1.5].
  Only the shapes of `variables` are read.
  """
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, size=np.shape(x)).astype(np.float32)
    return (scale * rng.normal(size=np.shape(x))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)


def random_variables(model, *inputs, seed=1, scale=0.5):
  """`randomize` on the variables `model.init` would create for `inputs`."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  return randomize(shapes, seed, scale)


def lookup(tree, path):
  """The leaf of `tree` at a key path of `jax.tree_util`."""
  for key in path:
    tree = tree[key.key]
  return tree


# Compiled model calls; the module is a static (hashed) argument.


@functools.partial(jax.jit, static_argnums=0)
def _init(model, rngs, inputs):
  return model.init(rngs, *inputs, train=False)


def init(model, *inputs, seed=0):
  """The model's variables, initialised in eval mode, compiled once."""
  rngs = {'params': jax.random.key(seed), 'dropout': jax.random.key(seed + 1)}
  return _init(model, rngs, inputs)


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def _apply(model, variables, inputs, key, *, train):
  rngs = None if key is None else {'dropout': key}
  if not train:
    return model.apply(variables, *inputs, train=False, rngs=rngs)
  logits, state = model.apply(
    variables, *inputs, train=True, rngs=rngs, mutable=['batch_stats']
  )
  return logits, state.get('batch_stats', {})


def apply_eval(model, variables, *inputs, seed=None):
  """Eval-mode logits `[batch]`; `seed`: a dropout key to pass (unused)."""
  key = None if seed is None else jax.random.key(seed)
  return _apply(model, variables, inputs, key, train=False)


def apply_train(model, variables, *inputs, seed=0):
  """Training-mode logits `[batch]` and updated BatchNorm statistics."""
  return _apply(model, variables, inputs, jax.random.key(seed), train=True)


def logistic_loss(logits, labels):
  """Mean binary cross-entropy of `sigmoid(logits)`, written stably."""
  return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)


@functools.partial(jax.jit, static_argnames=('model', 'loss', 'train'))
def _loss_and_grads(model, loss, params, others, inputs, labels, key, train):
  def loss_fn(p):
    logits, state = model.apply(
      {'params': p, **others},
      *inputs,
      train=train,
      rngs={'dropout': key},
      mutable=['batch_stats'],
    )
    return loss(logits, labels), (logits, state.get('batch_stats', {}))

  (value, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    params
  )
  return value, logits, grads, stats


def loss_and_grads(
  model,
  variables,
  inputs,
  labels=None,
  *,
  loss=logistic_loss,
  train=True,
  seed=0,
):
  """One forward and backward pass, compiled once per model and shapes.

  Args:
    model: the model.
    variables: its variables; the gradient is taken of `params`.
    inputs: the model's positional inputs (`ids`, then side inputs).
    labels: the second argument of `loss`.
    loss: `loss(logits, labels)`, a scalar; a module-level function, so that
      the compiled program is reused.
    train: training mode (batch statistics, dropout with key `seed`).
    seed: the dropout key.

  Returns:
    `(loss, logits [batch], gradients of params, updated batch_stats)`.
  """
  others = {k: v for k, v in variables.items() if k != 'params'}
  return _loss_and_grads(
    model,
    loss,
    variables['params'],
    others,
    tuple(inputs),
    labels,
    jax.random.key(seed),
    train,
  )


def zero_gradient_leaves(model, ids, seeds=(0,)):
  """Parameters whose gradient is exactly zero at initialisation.

  The gradient of a training-mode logistic loss on random 0/1 labels at
  `model.init`'s own parameters, as the first step of a run sees it: a
  parameter without one there (behind a dead ReLU, in an unused branch) may
  never train.

  Args:
    model: the model.
    ids: its input ids `[batch, fields]`.
    seeds: initialisations to try; a dead unit may depend on the draw.

  Returns:
    `{seed: [key paths (jax.tree_util.keystr) of the all-zero leaves]}`.
  """
  labels = np.random.default_rng(0).integers(0, 2, size=len(ids))
  labels = labels.astype(np.float32)
  zeros = {}
  for seed in seeds:
    rngs = {'params': jax.random.key(seed), 'dropout': jax.random.key(seed)}
    variables = _init(model, rngs, (ids,))
    _, _, grads, _ = loss_and_grads(
      model, variables, (ids,), labels, seed=seed + 1
    )
    zeros[seed] = [
      jax.tree_util.keystr(path)
      for path, g in jax.tree_util.tree_leaves_with_path(grads)
      if not np.any(g)
    ]
  return zeros


# Numpy references of the shared blocks (float64, loops where it helps).


def np_pool(table, multi_ids, multi_field_dims, pooling='mean'):
  """Pooled rows `[batch, multi_fields, ...]` by a loop over every listed id.

  Padding (-1) is skipped wherever it stands; an empty list pools to zeros;
  an id listed twice counts twice.
  """
  table = np.asarray(table, np.float64)
  starts = offsets(multi_field_dims)
  batch, fields, _ = multi_ids.shape
  out = np.zeros((batch, fields) + table.shape[1:])
  for b, m in itertools.product(range(batch), range(fields)):
    present = [starts[m] + i for i in multi_ids[b, m] if i >= 0]
    for row in present:
      out[b, m] += table[row]
    if pooling == 'mean' and present:
      out[b, m] /= len(present)
  return out


def np_fields(
  params,
  name,
  ids,
  field_dims,
  multi_ids=None,
  multi_field_dims=(),
  dense=None,
  pooling='mean',
):
  """Every field's rows `[batch, F + M + N, ...]` from one block's tables.

  Args:
    params: the block's parameters: `name` (one-hot rows), and with side
      inputs `multi_<name>` and `dense_<name>`.
    name: the table, e.g. 'embedding' or 'weight'.
    ids: one-hot ids `[batch, F]`.
    field_dims: the sizes of the F one-hot fields.
    multi_ids: multi-hot ids `[batch, M, max_len]` padded with -1, or None.
    multi_field_dims: the sizes of the M multi-hot fields.
    dense: numeric values `[batch, N]` (value times a learned row), or None.
    pooling: 'mean' or 'sum' of the listed ids' rows.
  """
  table = np.asarray(params[name], np.float64)
  out = [table[ids + offsets(field_dims)]]
  if multi_ids is not None:
    multi_table = params[f'multi_{name}']
    out.append(np_pool(multi_table, multi_ids, multi_field_dims, pooling))
  if dense is not None:
    dense_table = np.asarray(params[f'dense_{name}'], np.float64)
    trailing = (1,) * (dense_table.ndim - 1)
    out.append(dense.reshape(dense.shape + trailing) * dense_table)
  return np.concatenate(out, axis=1)


def np_linear(
  params, ids, field_dims, multi_ids=None, multi_field_dims=(), dense=None
):
  """FeaturesLinear: `w_0 + sum_f w_f` over every field, `[batch]`."""
  w = np_fields(
    params, 'weight', ids, field_dims, multi_ids, multi_field_dims, dense
  )
  return params['bias'][0] + w[..., 0].sum(axis=1)


def np_batchnorm(x, params, stats=None, axis=-1):
  """BatchNorm of `x` over every axis but `axis`.

  `stats`: running statistics (`mean`, `var`), or None for the batch's
  (training mode).
  """
  if stats is None:
    others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    mean, var = x.mean(axis=others), x.var(axis=others)
  else:
    mean, var = np.asarray(stats['mean']), np.asarray(stats['var'])
  shape = [1] * x.ndim
  shape[axis] = -1
  x = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS)
  scale, bias = np.asarray(params['scale']), np.asarray(params['bias'])
  return x * scale.reshape(shape) + bias.reshape(shape)


def np_mlp(x, params, stats, num_hidden, *, output_layer=True, batchnorm=True):
  """MultiLayerPerceptron with dropout as the identity.

  Per hidden layer Dense -> BatchNorm -> ReLU (Dense -> ReLU without
  `batchnorm`), then the output Dense to one unit.

  Args:
    x: `[batch, in]`.
    params: the block's parameters (`Dense_i`, `BatchNorm_i`).
    stats: its running statistics, or None for the batch's.
    num_hidden: the number of hidden layers.
    output_layer: whether the block ends with `Dense_<num_hidden>`.
    batchnorm: whether the hidden layers have BatchNorm.

  Returns:
    `[batch]` with the output layer, the last hidden layer otherwise.
  """
  for i in range(num_hidden):
    dense = params[f'Dense_{i}']  # No bias before BatchNorm.
    x = x @ dense['kernel'] + dense.get('bias', 0.0)
    if batchnorm:
      s = None if stats is None else stats[f'BatchNorm_{i}']
      x = np_batchnorm(x, params[f'BatchNorm_{i}'], s)
    x = np.maximum(x, 0.0)
  if output_layer:
    out = params[f'Dense_{num_hidden}']
    x = (x @ out['kernel'] + out['bias'])[:, 0]
  return x


# torchfm state dicts (name -> array) to our variables. The same functions
# convert gradients and running statistics stored under the same names.


def load_fixture(name):
  """tests/fixtures/torchfm_<name>.npz and the field sizes of its ids."""
  data = np.load(os.path.join(FIXTURES, f'torchfm_{name}.npz'))
  return data, tuple(int(d) for d in data['field_dims'])


def prefixed(data, prefix):
  """The arrays of `data` whose key starts with `prefix`, without it."""
  return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}


def torch_dense(w, name):
  """torch Linear -> nn.Dense params."""
  return {'kernel': w[f'{name}.weight'].T, 'bias': w[f'{name}.bias']}


def torch_features_linear(w, name='linear'):
  """torch FeaturesLinear -> our FeaturesLinear params."""
  return {'weight': w[f'{name}.fc.weight'], 'bias': w[f'{name}.bias']}


def torch_features_embedding(w, name='embedding'):
  """torch FeaturesEmbedding -> our FeaturesEmbedding params."""
  return {'embedding': w[f'{name}.embedding.weight']}


def torch_batchnorm(w, name):
  """torch BatchNorm1d -> nn.BatchNorm `(params, batch_stats)`."""
  params = {'scale': w[f'{name}.weight'], 'bias': w[f'{name}.bias']}
  stats = {'mean': w[f'{name}.running_mean'], 'var': w[f'{name}.running_var']}
  return params, stats


def torch_mlp(w, prefix, num_hidden, output_layer=True):
  """torch MultiLayerPerceptron -> our `(params, batch_stats)`.

  torch's Sequential holds Linear, BatchNorm1d, ReLU, Dropout per hidden
  layer (indices 4i and 4i + 1), then the output Linear (index 4n) when
  `output_layer`. A hidden Linear's bias goes into the running mean (ours
  have none); its gradient, which BatchNorm makes zero, is dropped.
  """
  params, stats = {}, {}
  for i in range(num_hidden):
    # Our hidden Dense has no bias: BatchNorm cancels it. It moves into the
    # running mean, which evaluation subtracts from the same sum.
    dense = torch_dense(w, f'{prefix}.{4 * i}')
    bias = dense.pop('bias')
    params[f'Dense_{i}'] = dense
    bn, bn_stats = torch_batchnorm(w, f'{prefix}.{4 * i + 1}')
    params[f'BatchNorm_{i}'] = bn
    stats[f'BatchNorm_{i}'] = {**bn_stats, 'mean': bn_stats['mean'] - bias}
  if output_layer:
    out = f'{prefix}.{4 * num_hidden}'
    params[f'Dense_{num_hidden}'] = torch_dense(w, out)
  return params, stats


# Checks against the fixtures and of training mode.


def assert_trees_close(got, want, rtol, atol):
  """The same tree structure, and every leaf close (named on failure)."""
  assert jax.tree.structure(got) == jax.tree.structure(want), (
    jax.tree.structure(got),
    jax.tree.structure(want),
  )
  for (path, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
  ):
    np.testing.assert_allclose(
      g, w, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


def assert_same_shapes(got, want):
  """The same tree structure and the same shape at every leaf."""
  got, want = jax.tree.map(np.shape, got), jax.tree.map(np.shape, want)
  assert got == want, (got, want)


def check_torchfm_eval(model, data, convert, prefix=''):
  """Our eval-mode probabilities are torchfm's from the same weights.

  Args:
    model: our model.
    data: the fixture (`ids`, `<prefix>w/<name>`, `<prefix>probs`).
    convert: torch state dict (name -> array) -> our variables; they must
      have the structure and shapes that `model.init` creates.
    prefix: the key prefix of a second torch model in the fixture.
  """
  variables = convert(prefixed(data, f'{prefix}w/'))
  ids = data['ids']
  assert_same_shapes(
    jax.eval_shape(model.init, jax.random.key(0), ids), variables
  )
  logits = apply_eval(model, variables, ids)
  np.testing.assert_allclose(
    jax.nn.sigmoid(logits), data[f'{prefix}probs'], rtol=1e-5, atol=1e-5
  )


def torchfm_running_stats(w, data):
  """torch's running statistics after the fixture's step, as Flax's.

  Same momentum (torch 0.1 is Flax 0.9), but torch averages the unbiased
  batch variance into the running one, Flax the biased one.
  """
  after = prefixed(data, 'after/')
  n = len(data['ids'])
  for key in [k for k in after if k.endswith('running_var')]:
    unbiased = (after[key] - 0.9 * w[key]) / 0.1
    after[key] = 0.9 * w[key] + 0.1 * unbiased * (n - 1) / n
  return after


def check_torchfm_step(model, data, convert, grads=None):
  """One training step from the fixture's weights is torchfm's step.

  torchfm's step ran in training mode with every dropout rate at 0: batch
  statistics in BatchNorm, BCE of the probabilities, then the update of the
  running statistics. Outputs, loss, the gradient of every parameter and
  every running statistic must agree.

  Args:
    model: our model, every dropout rate at 0.
    data: the fixture (`ids`, `w/*`, `train/*`, `grad/*`, `after/*`).
    convert: torch state dict (name -> array) -> our variables; it converts
      the gradients and the statistics as it converts the weights.
    grads: torch's gradients by name; the fixture's `grad/` by default.
  """
  w = prefixed(data, 'w/')
  variables = convert(w)
  ids, labels = data['ids'], data['train/labels']
  loss, logits, got_grads, got_stats = loss_and_grads(
    model, variables, (ids,), labels
  )
  np.testing.assert_allclose(
    jax.nn.sigmoid(logits), data['train/probs'], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(loss, data['train/loss'], rtol=1e-5)
  grads = prefixed(data, 'grad/') if grads is None else grads
  running = ('running_mean', 'running_var')
  np.testing.assert_equal(
    sorted(grads), sorted(k for k in w if not k.endswith(running))
  )
  expected = convert({**w, **grads})['params']
  assert_trees_close(got_grads, expected, rtol=1e-4, atol=1e-6)
  old = variables.get('batch_stats', {})
  expected = convert({**w, **torchfm_running_stats(w, data)})
  expected = expected.get('batch_stats', {})
  assert_trees_close(got_stats, expected, rtol=1e-4, atol=1e-6)
  # The means within 1e-5, and every statistic moved.
  for (path, got), want, before in zip(
    jax.tree_util.tree_leaves_with_path(got_stats),
    jax.tree.leaves(expected),
    jax.tree.leaves(old),
    strict=True,
  ):
    name = jax.tree_util.keystr(path)
    if name.endswith("['mean']"):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_less(1e-4, np.max(np.abs(got - before)), name)


def check_dropout_in_training_only(base, dropped, variables, ids):
  """The training-mode contract of a model and one of its dropout sites.

  Without dropout, training mode is deterministic; with BatchNorm it uses
  batch statistics, so it differs from eval mode and every running
  statistic moves; without BatchNorm it is eval mode. The dropout changes
  training outputs, by key; eval mode ignores dropout and keys.

  Args:
    base: the model with every dropout rate at 0.
    dropped: the same model with a rate of 0.5 at the site under test.
    variables: random variables of both.
    ids: a batch of ids `[batch, fields]`.
  """
  out0, stats0 = apply_train(base, variables, ids, seed=0)
  out1, _ = apply_train(base, variables, ids, seed=1)
  np.testing.assert_array_equal(out0, out1)
  eval_out = apply_eval(base, variables, ids)
  if 'batch_stats' in variables:
    assert not np.allclose(out0, eval_out), 'no batch statistics in training'
    for path, new in jax.tree_util.tree_leaves_with_path(stats0):
      old = lookup(variables['batch_stats'], path)
      assert not np.allclose(new, old), jax.tree_util.keystr(path)
  else:
    np.testing.assert_allclose(out0, eval_out, rtol=1e-6, atol=1e-6)
  a, _ = apply_train(dropped, variables, ids, seed=0)
  b, _ = apply_train(dropped, variables, ids, seed=1)
  np.testing.assert_array_less(0.9, np.mean(~np.isclose(a, out0)))
  np.testing.assert_array_less(0.9, np.mean(~np.isclose(a, b)))
  dropped_eval = apply_eval(dropped, variables, ids)
  np.testing.assert_array_equal(
    dropped_eval, apply_eval(dropped, variables, ids, seed=5)
  )
  np.testing.assert_array_equal(dropped_eval, eval_out)


def check_training_mode_is_eval_mode(model, variables, *inputs):
  """A model without dropout and BatchNorm: `train=True` changes nothing.

  There is no state to update either.
  """
  assert set(variables) == {'params'}, set(variables)
  train, stats = apply_train(model, variables, *inputs, seed=1)
  assert not stats, stats
  np.testing.assert_array_equal(train, apply_eval(model, variables, *inputs))


def recipe(config_module, arg=None) -> dict:
  """The model arguments that `config_module.get_config(arg)` sets itself,
  without those `configs.default.with_model_arguments` adds at the model's
  defaults (so that a flag can set them)."""
  from configs import default  # pylint: disable=g-import-not-at-top

  with mock.patch.object(default, 'with_model_arguments', lambda c: c):
    return dict(config_module.get_config(arg).model)


def check_config_model(model_file, config):
  """A config's model on two MovieLens-like fields gives logits `[4]` float32.

  Shapes only (`jax.eval_shape`): the full-size config compiles nothing.

  Args:
    model_file: the module `models/<config.model_name>.py`.
    config: the config, whose `model` holds the constructor arguments.

  Returns:
    The shapes of the model's variables, for more checks.
  """
  model = model_file.Model(field_dims=(6, 9), **config.model)
  ids = random_ids(4, (6, 9))
  variables = jax.eval_shape(model.init, jax.random.key(0), ids)
  out = jax.eval_shape(model.apply, variables, ids)
  assert (out.shape, out.dtype) == ((4,), jnp.float32), out
  return variables
