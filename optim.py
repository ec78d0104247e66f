"""Optimizers: torch's Adam with L2, and two that update only the rows read.

`create_optimizer(config, tables)` builds the transformation that
`config.optimizer` names; `apply_gradients` is the one update that every
caller uses (the pmapped train step, and the benchmarks with no axis).

- 'auto' (the default): 'adam' while the fields have fewer than
  `AUTO_SPARSE_ROWS` one-hot and multi-hot ids (W&D's hashed crosses and
  NCF's GMF table not counted), 'lazy_adam' from there (`resolve`).
- 'adam': optax's Adam with L2 weight decay added to the gradient, over every
  parameter, tables included (torch's `Adam(weight_decay=...)`, as
  pytorch-fm): the reference.
- 'lazy_adam': the same Adam, but each table's rows, first and second
  moments are decayed and updated only where the batch read them
  (TensorFlow's LazyAdam, torch's SparseAdam).
- 'rowwise_adagrad': Adagrad on the tables with one accumulator per row, the
  mean of the row's squared gradient (TorchRec's default for embeddings);
  dense Adam with L2 on the other parameters.

The row-wise two take the tables' gradients as the rows read
(`sparse.RowGrads`, from `sparse.value_and_grad`) and read and write only
those rows of the parameters and moments: beside the batch's rows a step
costs at most an int32 per table row (`sparse.dedup`'s scratch, below
`sparse.HASHED_ROWS` rows).

In each, `config.table_weight_decay`, when set, is the tables' L2
coefficient and `weight_decay` the other parameters' (as FuxiCTR's
separate embedding and network regularizers); None keeps `weight_decay`
everywhere. `config.lr_plateau_factor` < 1 multiplies the learning rates
by it after each epoch without a better validation AUC (`on_plateau`).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import sparse

# The values of `config.optimizer`.
NAMES = ('auto', 'adam', 'lazy_adam', 'rowwise_adagrad')

# 'auto' takes 'lazy_adam' from this many one-hot and multi-hot ids. Below
# it a batch reads a large share of the rows: dense Adam's update over the
# whole table costs little, and it is pytorch-fm's. Above it 'lazy_adam',
# whose step touches only the rows read, reaches the same test AUC sooner
# (benchmarks/README.md, "The default optimizer: `auto`").
AUTO_SPARSE_ROWS = 100_000


def resolve(name: str, table_rows: int) -> str:
  """The optimizer that `name` is for fields of `table_rows` ids in all.

  'auto' becomes 'adam' below `AUTO_SPARSE_ROWS` ids and 'lazy_adam' from
  there; any other name is itself.
  """
  if name != 'auto':
    return name
  return 'lazy_adam' if table_rows >= AUTO_SPARSE_ROWS else 'adam'


class RowSparse(NamedTuple):
  """An optimizer whose `tables` take their gradients as `sparse.RowGrads`.

  Attributes:
    init: `init(params) -> state`, as optax's.
    apply: `apply(grads, state, params) -> (params, state)`: one step, the
      tables' rows read updated in place (when donated).
    tables: the params paths of the tables.
  """

  init: Callable
  apply: Callable
  tables: frozenset[sparse.Path]


class Dense(NamedTuple):
  """A dense optax transformation, and the tables it updates densely.

  Attributes:
    init: optax's `init(params) -> state`.
    update: optax's `update(grads, state, params) -> (updates, state)`.
    tables: the params paths of the model's tables (their weight decay may
      differ from the other parameters').
  """

  init: Callable
  update: Callable
  tables: frozenset[sparse.Path]


class LazyAdamState(NamedTuple):
  """State of `lazy_adam`: the step count and the first and second moments."""

  count: jax.Array
  mu: optax.Params
  nu: optax.Params


class RowwiseAdagradState(NamedTuple):
  """State of `rowwise_adagrad`.

  Attributes:
    count: the step count (bias correction of the dense leaves' Adam).
    mu: Adam's first moments of the dense leaves (`optax.MaskedNode()` at
      the tables).
    nu: their second moments, likewise.
    accumulator: the tables' sums of mean squared row gradients, `[rows]`
      (`optax.MaskedNode()` at the dense leaves).
  """

  count: jax.Array
  mu: optax.Params
  nu: optax.Params
  accumulator: optax.Params


def tables_of(tx: Any) -> frozenset[sparse.Path]:
  """The tables whose gradients `tx` takes as rows; empty for dense ones."""
  return tx.tables if isinstance(tx, RowSparse) else frozenset()


def model_tables_of(tx: Any) -> frozenset[sparse.Path]:
  """The model's tables that `create_optimizer` was given, dense or not."""
  return getattr(tx, 'tables', frozenset())


def _decay_of(
  path: sparse.Path,
  weight_decay: float,
  table_weight_decay: float | None,
  tables: frozenset[sparse.Path],
) -> float:
  """The L2 coefficient of the leaf at `path`."""
  if table_weight_decay is not None and path in tables:
    return table_weight_decay
  return weight_decay


def add_decayed_weights(
  weight_decay: float,
  table_weight_decay: float | None = None,
  tables: frozenset[sparse.Path] = frozenset(),
) -> optax.GradientTransformation:
  """`optax.add_decayed_weights` with its own coefficient for the tables.

  Adds `table_weight_decay * p` to the gradient of each table in `tables`
  and `weight_decay * p` to every other leaf's. With `table_weight_decay`
  None it is `optax.add_decayed_weights(weight_decay)` itself, and either
  way its state is optax's empty one, so checkpoints do not depend on it.
  """
  if table_weight_decay is None:
    return optax.add_decayed_weights(weight_decay)

  def update(updates, state, params):
    def leaf(path, g, p):
      decay = _decay_of(path, weight_decay, table_weight_decay, tables)
      return (g + decay * p,)

    (updates,) = _map_leaves(leaf, params, updates)
    return updates, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adam(g, m, v, p, count, learning_rate, weight_decay, b1, b2, eps):
  """optax.add_decayed_weights + optax.adam, term by term: `(u, m, v)`."""
  g = g + weight_decay * p
  m = (1 - b1) * g + b1 * m
  v = (1 - b2) * g**2 + b2 * v
  m_hat = m / (1 - b1**count).astype(m.dtype)
  v_hat = v / (1 - b2**count).astype(v.dtype)
  return m_hat / (jnp.sqrt(v_hat) + eps) * -learning_rate, m, v


def _leaves(tree: Any, params: Any) -> list:
  """`tree`'s subtrees at `params`' leaves (a `RowGrads` is one)."""
  return jax.tree.structure(params).flatten_up_to(tree)


def _row_grads(g: Any, path: sparse.Path) -> sparse.RowGrads:
  if not isinstance(g, sparse.RowGrads):
    raise TypeError(
      f'The gradient of table {"/".join(path)} must be sparse.RowGrads'
      ' (sparse.value_and_grad), not a dense array.'
    )
  return g


def _paths(params: Any) -> list[sparse.Path]:
  return [
    tuple(k.key for k in path)
    for path, _ in jax.tree_util.tree_leaves_with_path(params)
  ]


def _map_leaves(fn: Callable, params: Any, *trees: Any) -> tuple:
  """`fn(path, *leaves of trees, param)` on each leaf of `params`.

  Returns:
    One tree shaped as `params` per output of `fn`.
  """
  out = [
    fn(*xs)
    for xs in zip(
      _paths(params),
      *(_leaves(t, params) for t in trees),
      jax.tree.leaves(params),
      strict=True,
    )
  ]
  treedef = jax.tree.structure(params)
  return tuple(treedef.unflatten(x) for x in zip(*out, strict=True))


def lazy_adam(
  learning_rate: float,
  weight_decay: float,
  tables: frozenset[sparse.Path],
  table_weight_decay: float | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> RowSparse:
  """Row-sparse Adam with L2 (TensorFlow's LazyAdam, torch's SparseAdam).

  The rows of a table that the batch read get the weight decay, the moment
  updates and Adam's step exactly as dense Adam would give them; its other
  rows keep their parameters and moments. Bias correction uses the global
  step count. Other leaves get dense Adam with L2, as 'adam'.

  Args:
    learning_rate: Adam's step size.
    weight_decay: L2 coefficient added to the gradient.
    tables: the params paths of the tables (`sparse.declared_tables`).
    table_weight_decay: the tables' L2 coefficient (None: `weight_decay`).
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the root of the second moment.
  """

  def init(params):
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    return LazyAdamState(
      count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params)
    )

  def apply(grads, state, params):
    count = optax.safe_increment(state.count)

    def leaf(path, g, m, v, p):
      decay = _decay_of(path, weight_decay, table_weight_decay, tables)
      hyper = (count, learning_rate, decay, b1, b2, eps)
      if path not in tables:
        u, m, v = _adam(g, m, v, p, *hyper)
        return (p + u).astype(p.dtype), m, v

      def rule(g, p, m, v):
        u, m, v = _adam(g, m, v, p, *hyper)
        return p + u, m, v

      return sparse.update_rows(_row_grads(g, path), (p, m, v), rule)

    params, mu, nu = _map_leaves(leaf, params, grads, state.mu, state.nu)
    return params, LazyAdamState(count=count, mu=mu, nu=nu)

  return RowSparse(init, apply, frozenset(tables))


def rowwise_adagrad(
  learning_rate: float,
  weight_decay: float,
  tables: frozenset[sparse.Path],
  table_learning_rate: float | None = None,
  table_weight_decay: float | None = None,
  eps: float = 1e-8,
  b1: float = 0.9,
  b2: float = 0.999,
) -> RowSparse:
  """Row-wise Adagrad on the tables, Adam with L2 on the other leaves.

  For each row `r` of a table that the batch read, with `g` its summed
  gradient plus `table_weight_decay * w_r` (TorchRec's exact row-wise
  Adagrad with L2 weight decay; `weight_decay` when None):

    a_r <- a_r + mean(g^2),
    w_r <- w_r - table_learning_rate * g / (sqrt(a_r) + eps).

  One accumulator per row instead of Adam's two moments per weight: a step
  reads and writes a row and one number. Rows not read keep their weights
  and accumulators. The other leaves get dense Adam with L2, as 'adam'.

  Args:
    learning_rate: Adam's step size.
    weight_decay: L2 coefficient added to the gradient.
    tables: the params paths of the tables (`sparse.declared_tables`).
    table_learning_rate: Adagrad's step size (None: `learning_rate`);
      Adagrad's steps shrink as its accumulators grow, so it wants larger
      ones than Adam.
    table_weight_decay: the tables' L2 coefficient (None: `weight_decay`).
    eps: added to the root of the accumulator (and of Adam's moment).
    b1: Adam's decay of the first moment (dense leaves).
    b2: Adam's decay of the second moment (dense leaves).
  """

  def init(params):
    treedef = jax.tree.structure(params)

    def per_leaf(table, other):
      leaves = zip(_paths(params), jax.tree.leaves(params), strict=True)
      return treedef.unflatten(
        [table(p) if path in tables else other(p) for path, p in leaves]
      )

    masked = lambda p: optax.MaskedNode()  # noqa: E731
    rows = lambda p: jnp.zeros(p.shape[:1], jnp.float32)  # noqa: E731
    return RowwiseAdagradState(
      count=jnp.zeros([], jnp.int32),
      mu=per_leaf(masked, jnp.zeros_like),
      nu=per_leaf(masked, jnp.zeros_like),
      accumulator=per_leaf(rows, masked),
    )

  table_rate = (
    learning_rate if table_learning_rate is None else table_learning_rate
  )
  table_decay = (
    weight_decay if table_weight_decay is None else table_weight_decay
  )

  def apply(grads, state, params):
    count = optax.safe_increment(state.count)
    hyper = (count, learning_rate, weight_decay, b1, b2, eps)

    def rule(g, p, a):
      g = g + table_decay * p
      a = a + jnp.mean(jnp.square(g).reshape(g.shape[0], -1), axis=1)
      scale = table_rate / (jnp.sqrt(a) + eps)
      return p - scale.reshape((-1,) + (1,) * (g.ndim - 1)) * g, a

    def leaf(path, g, m, v, a, p):
      if path not in tables:
        u, m, v = _adam(g, m, v, p, *hyper)
        return (p + u).astype(p.dtype), m, v, a
      p, a = sparse.update_rows(_row_grads(g, path), (p, a), rule)
      return p, m, v, a

    params, mu, nu, acc = _map_leaves(
      leaf, params, grads, state.mu, state.nu, state.accumulator
    )
    return params, RowwiseAdagradState(count, mu, nu, acc)

  return RowSparse(init, apply, frozenset(tables))


# The rates that `create_optimizer` may take as arrays instead of constants.
RATES = (
  'learning_rate',
  'weight_decay',
  'table_learning_rate',
  'table_weight_decay',
)

# The lowest rate that `on_plateau` reduces a learning rate to (FuxiCTR's
# `min_lr`); a rate set lower stays as set.
MIN_PLATEAU_RATE = 1e-6


def plateau_scale(scale: float, config: ml_collections.ConfigDict) -> float:
  """The learning rates' scale after an epoch without a better validation
  AUC: `scale` times `config.lr_plateau_factor` (FuxiCTR's
  `reduce_lr_on_plateau`: 0.1; 1, pytorch-fm's: kept)."""
  factor = config.get('lr_plateau_factor', 1.0)
  if factor != 1:
    logging.info(
      'No better validation AUC: learning rates x%g.', scale * factor
    )
  return scale * factor


def on_plateau(
  config: ml_collections.ConfigDict, scale: float
) -> ml_collections.ConfigDict:
  """`config` with `learning_rate` and `table_learning_rate` times `scale`
  (`plateau_scale`), none below `MIN_PLATEAU_RATE` unless set so.

  The rates are the train program's arguments (`rates_of`): nothing
  compiles again.
  """
  if scale == 1:
    return config
  out = config.copy_and_resolve_references()
  for key in ('learning_rate', 'table_learning_rate'):
    rate = config.get(key)
    if rate is not None:
      out[key] = max(rate * scale, min(rate, MIN_PLATEAU_RATE))
  return out


def rates_of(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """`config`'s `RATES`, float32 scalars, for `create_optimizer(rates=...)`.

  A program that takes them as arguments rather than constants compiles
  once for all learning rates and weight decays (`train.hyperparameters`).
  `table_learning_rate` None is `learning_rate`; `table_weight_decay` None
  is `weight_decay` (whether it is None is the optimizer's structure, read
  from `config` by `create_optimizer`).
  """
  table_lr = config.get('table_learning_rate')
  table_wd = config.get('table_weight_decay')
  return {
    'learning_rate': np.float32(config.learning_rate),
    'weight_decay': np.float32(config.weight_decay),
    'table_learning_rate': np.float32(
      config.learning_rate if table_lr is None else table_lr
    ),
    'table_weight_decay': np.float32(
      config.weight_decay if table_wd is None else table_wd
    ),
  }


def create_optimizer(
  config: ml_collections.ConfigDict,
  tables: frozenset[sparse.Path] = frozenset(),
  rates: dict[str, jax.Array] | None = None,
) -> Dense | RowSparse:
  """The optimizer that `config.optimizer` names (see the module docstring).

  Args:
    config: the run's config (`optimizer`, `learning_rate`, `weight_decay`,
      `table_weight_decay`, and for 'rowwise_adagrad'
      `table_learning_rate`).
    tables: the model's tables (`sparse.declared_tables`), updated row-wise
      by 'lazy_adam' and 'rowwise_adagrad'; 'adam' updates them densely
      (`tables_of` its result is empty, `model_tables_of` gives them).
    rates: `rates_of(config)` (None: computed here), possibly traced: the
      same optimizer, whose state does not depend on them, in a program
      that does not change with them.

  Raises:
    ValueError: an unknown `config.optimizer`, or 'auto' (`resolve` it
      first: it depends on the tables' rows).
  """
  if config.optimizer == 'auto':
    raise ValueError(
      "config.optimizer 'auto' depends on the tables' rows: resolve it with"
      ' optim.resolve (train.resolve_optimizer) first.'
    )
  rates = rates_of(config) if rates is None else rates
  lr, wd, table_lr, table_wd = (rates[name] for name in RATES)
  if config.get('table_weight_decay') is None:
    table_wd = None  # The same program as before the key existed.
  if config.optimizer == 'adam':
    tx = optax.chain(add_decayed_weights(wd, table_wd, tables), optax.adam(lr))
    return Dense(tx.init, tx.update, frozenset(tables))
  if config.optimizer == 'lazy_adam':
    return lazy_adam(lr, wd, tables, table_wd)
  if config.optimizer == 'rowwise_adagrad':
    return rowwise_adagrad(lr, wd, tables, table_lr, table_wd)
  raise ValueError(
    f'config.optimizer: unknown {config.optimizer!r}; choose one of'
    f' {", ".join(NAMES)}.'
  )


def apply_gradients(
  tx: Dense | RowSparse,
  grads: Any,
  opt_state: optax.OptState,
  params: Any,
  *,
  axis_name: str | None,
) -> tuple[Any, optax.OptState]:
  """One optimizer step from this device's gradients.

  Args:
    tx: from `create_optimizer`.
    grads: this device's gradients (`sparse.value_and_grad` with
      `tables_of(tx)`: the tables' leaves are `sparse.RowGrads`).
    opt_state: `tx`'s state.
    params: the parameters before the step.
    axis_name: the pmap axis whose devices' gradients are joined
      (`sparse.exchange`); None: one device (no pmap).

  Returns:
    The new parameters and optimizer state; every device gets the same.
  """
  grads = sparse.exchange(grads, axis_name)
  if isinstance(tx, RowSparse):
    return tx.apply(grads, opt_state, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
