"""Optimizers: torch's Adam with L2, and its row-sparse variant `lazy_adam`.

`create_optimizer(config, num_rows)` builds the optax transformation that
`config.optimizer` names; `apply_gradients` is the one update that every
caller uses (the pmapped train step, and the benchmarks with no axis).

The embedding tables of a CTR model dominate its step: a dense update reads
and writes every row, and under pmap the table-sized gradient is
all-reduced. `lazy_adam` updates only the rows the global batch touches, and
only those rows' gradients cross devices; it never builds a table-sized
update. Tables are the leaves whose first dimension is `num_rows`,
`sum(field_dims)`, indexed by `ids + field_offsets`.
"""

from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# The values of `config.optimizer`.
NAMES = ('adam', 'lazy_adam')


def is_table(x: jax.Array, num_rows: int) -> bool:
  """Whether a parameter leaf is a shared table of `num_rows` rows."""
  return x.ndim >= 1 and x.shape[0] == num_rows


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """`x[rows]`, zeros for the out-of-range padding of `touched_rows`."""
  return jnp.take(x, rows, axis=0, mode='fill', fill_value=0)


def touched_rows(
  ids: jax.Array, field_dims: tuple[int, ...], axis_name: str | None
) -> jax.Array:
  """Sorted unique table rows of the global batch, padded out of range.

  Args:
    ids: this device's ids `[batch / devices, fields]`.
    field_dims: the dataset's field sizes.
    axis_name: the pmap axis whose devices' rows are joined; None: this
      device's rows only.

  Returns:
    `[batch * fields]` int32: every row that some device's batch touches,
    once, then `sum(field_dims)` as padding (a static size for XLA). Every
    device gets the same array, so replicas update the same rows.
  """
  offsets = np.concatenate([[0], np.cumsum(field_dims)[:-1]]).astype(np.int32)
  rows = (ids + offsets).reshape(-1)
  if axis_name is not None:
    rows = lax.all_gather(rows, axis_name).reshape(-1)
  return jnp.unique(rows, size=rows.size, fill_value=sum(field_dims))


def gather_rows(grads: Any, rows: jax.Array, num_rows: int) -> Any:
  """The table leaves' gradients at `rows` `[len(rows), ...]`; others as is."""
  return jax.tree.map(
    lambda g: take_rows(g, rows) if is_table(g, num_rows) else g, grads
  )


def apply_row_updates(
  params: Any, updates: Any, rows: jax.Array, num_rows: int
) -> Any:
  """`optax.apply_updates` with the tables' updates given at `rows` only."""

  def apply(p, u):
    if is_table(p, num_rows):
      new = take_rows(p, rows) + u
      return p.at[rows].set(new.astype(p.dtype), mode='drop')
    return (p + u).astype(p.dtype)

  return jax.tree.map(apply, params, updates)


class LazyAdamState(NamedTuple):
  """State of `lazy_adam`: the step count and the first and second moments."""

  count: jax.Array
  mu: optax.Params
  nu: optax.Params


def lazy_adam(
  learning_rate: float,
  weight_decay: float,
  num_rows: int,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  """Row-sparse Adam with L2 (TensorFlow's LazyAdam, torch's SparseAdam).

  Table leaves (first dimension `num_rows`) are updated only in the touched
  `rows`: those rows get the weight decay, the moment updates and Adam's
  step exactly as dense Adam would; the other rows keep their parameters and
  moments. Bias correction uses the global step count. Other leaves get
  dense Adam with L2 (as `create_optimizer`'s 'adam'). (A layer with as
  many inputs as the tables have rows would be taken for a table; real
  tables have far more rows than any layer here has inputs.)

  `update(grads, state, params, rows=rows)` takes the rows' gradients
  `[len(rows), ...]` for the table leaves (`gather_rows`) and returns the
  rows' updates likewise, so that a step costs O(batch), not O(table), for
  the tables: apply them with `apply_row_updates`. `rows` are unique, padded
  with `num_rows` (out of range: read as zeros, dropped when written).
  """

  def init(params):
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
    return LazyAdamState(
      count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params)
    )

  def update(grads, state, params=None, *, rows=None, **extra_args):
    del extra_args
    if params is None or rows is None:
      raise ValueError('lazy_adam needs params and rows (apply_gradients).')
    count = optax.safe_increment(state.count)
    bc1, bc2 = 1 - b1**count, 1 - b2**count

    # The arithmetic of optax.add_decayed_weights + optax.adam, term by term.
    def leaf(g, m, v, p):
      table = is_table(p, num_rows)
      old = [take_rows(x, rows) for x in (m, v, p)] if table else [m, v, p]
      g = g + weight_decay * old[2]
      m_new = (1 - b1) * g + b1 * old[0]
      v_new = (1 - b2) * g**2 + b2 * old[1]
      m_hat = m_new / bc1.astype(m_new.dtype)
      v_hat = v_new / bc2.astype(v_new.dtype)
      u = m_hat / (jnp.sqrt(v_hat) + eps) * -learning_rate
      if table:
        m_new = m.at[rows].set(m_new, mode='drop')
        v_new = v.at[rows].set(v_new, mode='drop')
      return u, m_new, v_new

    treedef = jax.tree.structure(params)
    flat = (treedef.flatten_up_to(t) for t in (grads, state.mu, state.nu))
    out = [
      leaf(*xs) for xs in zip(*flat, treedef.flatten_up_to(params), strict=True)
    ]
    updates, mu, nu = (treedef.unflatten(x) for x in zip(*out, strict=True))
    return updates, LazyAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def create_optimizer(
  config: ml_collections.ConfigDict, num_rows: int = 0
) -> optax.GradientTransformation:
  """`config.optimizer`: 'adam' (torch's Adam with L2) or 'lazy_adam'.

  Args:
    config: the run's config (`optimizer`, `learning_rate`, `weight_decay`).
    num_rows: rows of the shared embedding tables, `sum(field_dims)`
      (needed by 'lazy_adam').
  """
  if config.optimizer == 'adam':
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.adam(config.learning_rate),
    )
  if config.optimizer == 'lazy_adam':
    if num_rows <= 0:
      raise ValueError('config.optimizer=lazy_adam needs num_rows.')
    return lazy_adam(config.learning_rate, config.weight_decay, num_rows)
  raise ValueError(
    f'config.optimizer: unknown {config.optimizer!r}; choose one of'
    f' {", ".join(NAMES)}.'
  )


def apply_gradients(
  tx: optax.GradientTransformation,
  grads: Any,
  opt_state: optax.OptState,
  params: Any,
  *,
  ids: jax.Array,
  field_dims: tuple[int, ...],
  axis_name: str | None,
) -> tuple[Any, optax.OptState]:
  """One optimizer step from this device's gradients.

  Devices hold equal shares of the global batch, so the mean of their
  gradients is the gradient of the global mean loss. With `lazy_adam` only
  the touched rows' gradients are averaged and updated; every device sees
  the same rows, so the replicas stay identical.

  Args:
    tx: from `create_optimizer`.
    grads: this device's gradients, shaped as `params`.
    opt_state: `tx`'s state.
    params: the parameters before the step.
    ids: this device's ids `[batch / devices, fields]` (read by `lazy_adam`).
    field_dims: the dataset's field sizes.
    axis_name: the pmap axis to average over; None: one device (no pmap).

  Returns:
    The new parameters and optimizer state.
  """
  mean = (lambda x: lax.pmean(x, axis_name)) if axis_name else (lambda x: x)
  if not isinstance(opt_state, LazyAdamState):
    updates, opt_state = tx.update(mean(grads), opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  num_rows = sum(field_dims)
  rows = touched_rows(ids, field_dims, axis_name)
  grads = mean(gather_rows(grads, rows, num_rows))
  updates, opt_state = tx.update(grads, opt_state, params, rows=rows)
  return apply_row_updates(params, updates, rows, num_rows), opt_state
