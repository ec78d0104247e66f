"""Gradients of embedding tables as the rows a batch reads, not the tables.

Every model file declares its tables: it reads them with `take_rows`, which,
when asked, sows the rows it reads into the 'table_rows' collection and adds
zeros from a 'perturbations' collection to what it read. `value_and_grad`
differentiates with respect to those zeros: the gradient of each lookup, one
row per id of the batch, instead of a table-sized gradient that is zero in
all but those rows (and that a dense optimizer would then read and write in
full). `dedup` sums the lookups of each row; optim.py's row-wise optimizers
read and write only those rows of the tables and of their state. Across
devices only the rows read and their gradients travel (`exchange`).
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any, NamedTuple

from flax import linen as nn
from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# The collections that the models' `take_rows` fills and reads.
ROWS = 'table_rows'
PERTURBATIONS = 'perturbations'

# Tables of more rows than this find each row's first lookup (`dedup`)
# through hashed buckets, not a scratch array of the table's size, whose
# cost grows with the table (benchmarks/README.md, "A step, operation by
# operation").
HASHED_ROWS = 1 << 22
# Odd 32-bit multipliers of the hash, one per round.
_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)

# A parameter's path in the params tree, e.g. ('FeaturesEmbedding_0',
# 'embedding').
Path = tuple[str, ...]


class RowGrads(NamedTuple):
  """A table's gradient as the rows read: `values[i]` belongs to `rows[i]`.

  Attributes:
    rows: `[n]` int32 rows of the table, repeated once per lookup, below its
      size; negative rows (padding) belong to no row.
    values: `[n, ...]`, each of the table's row shape.
  """

  rows: jax.Array
  values: jax.Array


def is_rows(x: Any) -> bool:
  """Whether `x` is a `RowGrads` (a leaf of a grads tree)."""
  return isinstance(x, RowGrads)


def declared_tables(
  apply_fn: Callable, variables: Any, *args, **kwargs
) -> frozenset[Path]:
  """The params paths of the tables that a model reads with `take_rows`.

  Args:
    apply_fn: the model's `apply`.
    variables: its variables (`params`, and `batch_stats` if any).
    *args: inputs of one call, e.g. ids `[batch, fields]` (only their shapes
      matter: nothing runs).
    **kwargs: keyword arguments of that call, e.g. `train=False`.
  """
  _, state = jax.eval_shape(
    functools.partial(apply_fn, mutable=[ROWS], **kwargs), variables, *args
  )
  return frozenset(traverse_util.flatten_dict(state.get(ROWS, {})))


def value_and_grad(
  fun: Callable, params: Any, tables: frozenset[Path]
) -> tuple[tuple[jax.Array, Any], Any]:
  """`jax.value_and_grad(fun, has_aux=True)` with tables' gradients as rows.

  Args:
    fun: `fun(params, perturbations) -> (loss, (aux, rows))`: the loss of
      the model applied with `perturbations` (None: none) and `rows`, the
      'table_rows' collection that the call filled.
    params: the parameters.
    tables: the paths of the tables (`declared_tables`); empty: the plain
      dense gradient.

  Returns:
    `((loss, aux), grads)`: `grads` is shaped as `params`, but each table's
    leaf is the `RowGrads` of every lookup of this call; a lookup past the
    table's end is its last row, which it read, as in a dense gradient.

  Raises:
    ValueError: the call reads other tables than `tables`, or one table
      twice.
  """
  if not tables:
    (loss, (aux, _)), grads = jax.value_and_grad(
      lambda p: fun(p, None), has_aux=True
    )(params)
    return (loss, aux), grads
  # In a fixed order: a frozenset's follows the process's string hashes,
  # and a traced program that differs between processes misses the
  # persistent compilation cache.
  tables = sorted(tables)
  flat = traverse_util.flatten_dict(params)
  shapes = _rows_read(fun, params, tables)
  _check_reads(shapes, tables)
  zeros = {
    path: jnp.zeros(
      shapes[path][0].shape + flat[path].shape[1:], flat[path].dtype
    )
    for path in tables
  }
  # The tables enter as constants: their own gradient is never formed.
  fixed = {path: lax.stop_gradient(flat[path]) for path in tables}
  dense = {path: x for path, x in flat.items() if path not in tables}

  def loss(dense, zeros):
    params = traverse_util.unflatten_dict({**dense, **fixed})
    return fun(params, traverse_util.unflatten_dict(zeros))

  try:
    (value, (aux, rows)), (dense_grads, row_grads) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True
    )(dense, zeros)
  except Exception:  # E.g. a table read but not declared: named, if so.
    try:
      read = _rows_read(fun, params, ())
    except Exception:  # The same error, traced again: raised once.
      read = None
    if read is not None:
      _check_reads(read, tables)
    raise
  rows = traverse_util.flatten_dict(rows)
  # The reads after those that `_rows_read` saw.
  _check_reads(rows, tables)
  grads = dict(dense_grads)  # Both keyed by path, as `dense` and `zeros`.
  for path in tables:
    # A row past the table's end read its last row (`take_rows` clips), so
    # its gradient goes there, as a dense gradient's would; padding stays.
    table_rows = rows[path][0].reshape(-1).astype(jnp.int32)
    table_rows = jnp.minimum(table_rows, flat[path].shape[0] - 1)
    values = row_grads[path].reshape((-1,) + flat[path].shape[1:])
    grads[path] = RowGrads(table_rows, values)
  return (value, aux), traverse_util.unflatten_dict(grads)


class _AllRead(Exception):
  """Ends `_rows_read`'s trace: every table has been read once."""


def _rows_read(
  fun: Callable, params: Any, tables: Sequence[Path]
) -> dict[Path, tuple[jax.ShapeDtypeStruct, ...]]:
  """The shapes of the rows that `fun(params, None)` reads of each table.

  As its 'table_rows' collection from `jax.eval_shape`, but the trace stops
  as soon as each of `tables` has been read once (checked after each call of
  a module's method): the model's layers after its lookups are traced once,
  by `value_and_grad`'s gradient, not twice. Reads after that point are
  seen in the gradient's own rows. Empty `tables`: the whole trace.
  """
  read = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    for path in tables:
      if path[:-1] == module.scope.path and module.has_variable(ROWS, path[-1]):
        read[path] = tuple(
          jax.ShapeDtypeStruct(x.shape, x.dtype)
          for x in module.get_variable(ROWS, path[-1])
        )
    if tables and len(read) == len(tables):
      if all(len(r) == 1 for r in read.values()):
        raise _AllRead()
    return out

  try:
    with nn.intercept_methods(interceptor):
      _, (_, rows) = jax.eval_shape(fun, params, None)
  except _AllRead:
    return read
  return traverse_util.flatten_dict(rows)


def _check_reads(rows: dict[Path, tuple], tables: Sequence[Path]) -> None:
  """Raises a ValueError unless `rows` holds one read of each of `tables`."""
  if set(rows) != set(tables) or any(len(r) != 1 for r in rows.values()):
    raise ValueError(
      'The model read its tables otherwise than declared: read'
      f' { {"/".join(k): len(v) for k, v in rows.items()} } (times),'
      f' declared {sorted("/".join(k) for k in tables)}.'
    )


def exchange(grads: Any, axis_name: str | None) -> Any:
  """The global batch's gradients from each device's share of it.

  Devices hold equal shares of the global batch, so the gradient of the
  global mean loss is the mean of theirs. Dense leaves are averaged
  (`pmean`); a table's `RowGrads` are gathered from every device, in device
  order, and divided by the device count: only the rows read travel. On an
  axis of one device nothing travels (XLA:CPU would copy the gathered rows).

  Args:
    grads: this device's gradients (`value_and_grad`).
    axis_name: the pmap axis; None: one device, `grads` as they are.
  """
  if axis_name is None:
    return grads
  count = lax.axis_size(axis_name)
  if count == 1:
    return grads

  def one(g):
    if isinstance(g, RowGrads):
      gather = functools.partial(
        lax.all_gather, axis_name=axis_name, tiled=True
      )
      return RowGrads(gather(g.rows), gather(g.values) / count)
    return lax.pmean(g, axis_name)

  return jax.tree.map(one, grads, is_leaf=is_rows)


def dedup(grads: RowGrads, num_rows: int) -> tuple[jax.Array, RowGrads]:
  """Sums the lookups of each row, in lookup order, rows read first.

  Each lookup finds the first lookup of its row through a `[num_rows]` int32
  scratch array (a scatter-min of positions): a small fraction of the
  table, and no sort; above `HASHED_ROWS` rows, through hashed buckets
  (`_hashed_owners`), with the same result. The sizes stay static: the
  distinct rows come first, in order of first lookup, then padding.

  Args:
    grads: `[n]` rows and `[n, ...]` values; negative rows are padding, and
      rows from `num_rows` are dropped as well (`value_and_grad` gives
      none).
    num_rows: the table's rows.

  Returns:
    The number of distinct rows read, and `RowGrads` of `[n]` distinct rows
    followed by `num_rows` (out of the table's range), with each row's
    summed values (zeros after the distinct rows).
  """
  n = grads.rows.shape[0]
  positions = jnp.arange(n, dtype=jnp.int32)
  rows = jnp.where(grads.rows < 0, num_rows, grads.rows)
  if num_rows > HASHED_ROWS:
    owner = _hashed_owners(rows, num_rows)
  else:
    owner = _owners(rows, num_rows)  # [n]
  is_first = owner == positions
  slot = jnp.cumsum(is_first, dtype=jnp.int32) - 1  # [n]
  count = slot[-1] + 1
  unique = jnp.full((n,), num_rows, jnp.int32)
  unique = unique.at[jnp.where(is_first, slot, n)].set(rows, mode='drop')
  slot = jnp.take(slot, owner, mode='fill', fill_value=n)  # The row's slot.
  sums = jnp.zeros_like(grads.values).at[slot].add(grads.values, mode='drop')
  return count, RowGrads(unique, sums)


def _owners(rows: jax.Array, num_rows: int) -> jax.Array:
  """The position of the first lookup of each lookup's row, through a
  `[num_rows]` scratch array; `n` for padding (row `num_rows`)."""
  n = rows.shape[0]
  positions = jnp.arange(n, dtype=jnp.int32)
  first = jnp.full((num_rows,), n, jnp.int32)
  first = first.at[rows].min(positions, mode='drop')
  return jnp.take(first, rows, mode='fill', fill_value=n)


def _hashed_owners(rows: jax.Array, num_rows: int) -> jax.Array:
  """`_owners` of every lookup through a scratch array of about `3 n`
  buckets, not one of the table's size.

  In each round the lookups not yet resolved scatter-min their positions
  into their rows' buckets (a multiplicative hash, another per round); the
  bucket's minimum is a lookup's owner if it belongs to the same row. Every
  lookup of a row shares its buckets, so the row that holds a bucket's
  minimum gets its true first lookup, and the rows that collided with it
  try the next round's hash. What rounds leave (rarely any) goes through
  `_owners`, in a branch taken only then.
  """
  n = rows.shape[0]
  bits = max(4, (3 * n - 1).bit_length())
  positions = jnp.arange(n, dtype=jnp.int32)
  owner = jnp.full((n,), n, jnp.int32)
  open_ = rows < num_rows
  for multiplier in _HASH_MULTIPLIERS:
    bucket = rows.astype(jnp.uint32) * np.uint32(multiplier)
    bucket = (bucket >> np.uint32(32 - bits)).astype(jnp.int32)
    first = jnp.full((1 << bits,), n, jnp.int32)
    first = first.at[jnp.where(open_, bucket, 1 << bits)].min(
      positions, mode='drop'
    )
    found = jnp.take(first, bucket)
    same = jnp.take(rows, found, mode='fill', fill_value=-1) == rows
    owner = jnp.where(open_ & same, found, owner)
    open_ &= ~same
  rest = jnp.where(open_, rows, num_rows)  # Resolved lookups as padding.
  return lax.cond(
    open_.any(),
    lambda: jnp.where(open_, _owners(rest, num_rows), owner),
    lambda: owner,
  )


def update_rows(
  grads: RowGrads,
  arrays: tuple[jax.Array, ...],
  rule: Callable,
  chunk: int = 2048,
) -> tuple[jax.Array, ...]:
  """Updates only the rows read of a table and of its per-row state.

  The lookups are summed per row (`dedup`), then `rule` runs on chunks of
  `chunk` distinct rows, as many chunks as the rows read need (a loop of
  dynamic length), so that the work follows the rows read, not the batch's
  lookups nor the table. Updated in place when the arrays are donated.

  Args:
    grads: the table's `RowGrads`, lookups of the global batch.
    arrays: the table `[rows, ...]`, then its states, each `[rows, ...]`.
    rule: `rule(g, *rows) -> new rows`: `g` the summed gradients `[c, ...]`
      of `c` distinct rows, `rows` those rows of each of `arrays`; returns
      their new values, one per array.
    chunk: distinct rows per call of `rule`.

  Returns:
    `arrays` with the rows read replaced.
  """
  num_rows = arrays[0].shape[0]
  count, summed = dedup(grads, num_rows)
  n = summed.rows.shape[0]
  chunk = min(chunk, n)
  pad = -n % chunk
  rows = jnp.pad(summed.rows, (0, pad), constant_values=num_rows)
  values = jnp.pad(
    summed.values, [(0, pad)] + [(0, 0)] * (grads.values.ndim - 1)
  )

  def body(i, arrays):
    r = lax.dynamic_slice_in_dim(rows, i * chunk, chunk)
    g = lax.dynamic_slice_in_dim(values, i * chunk, chunk)
    new = rule(g, *(take(a, r) for a in arrays))
    return tuple(put(a, r, x) for a, x in zip(arrays, new, strict=True))

  return lax.fori_loop(0, (count + chunk - 1) // chunk, body, tuple(arrays))


def take(x: jax.Array, rows: jax.Array) -> jax.Array:
  """`x[rows]`; an out-of-range row reads the last row (its write drops)."""
  return jnp.take(x, rows, axis=0, mode='clip')


def put(x: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  """`x` with `x[rows] = values`; out-of-range rows are dropped."""
  return x.at[rows].set(values.astype(x.dtype), mode='drop')
