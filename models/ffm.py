"""Field-aware Factorization Machine (FFM).

Yuchin Juan, Yong Zhuang, Wei-Sheng Chin, Chih-Jen Lin. "Field-aware
Factorization Machines for CTR Prediction". ACM Conference on Recommender
Systems (RecSys), 2016. https://doi.org/10.1145/2959100.2959134 (no arXiv
version).

Each feature has one latent vector per field it can meet: `v_{j, g}` is the
vector of feature `j` used against a feature of field `g`. The paper's eq. (4),

  phi_FFM(x) = sum_{j1 < j2} <v_{j1, f2}, v_{j2, f1}> x_{j1} x_{j2},

with one active (one-hot) feature `x_f` per field `f` reads

  y(x) = w_0 + sum_f w_{x_f} + sum_{f < g} <v_{x_f, g}, v_{x_g, f}>.

The pairwise term has no O(fields * dim) identity as FM's has: it costs
O(fields^2 * dim), computed as one `[batch, fields, fields]` product masked to
`f < g`. Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`); the output is the logit y(x) `[batch]` (float32). The
sigmoid belongs to the loss.

Optional side inputs are more fields of both sums, each with its own
field-aware vectors against every field: a multi-hot field (`multi_ids`,
e.g. a movie's genres) adds the mean (or sum) of its ids' weights and
vectors, a numeric field (`dense`) `w x` and `v x` for its value `x`.

Differences from pytorch-fm (torchfm 0.7.0,
`FieldAwareFactorizationMachineModel`):
  * The linear weights start at zero. pytorch-fm keeps `nn.Embedding`'s
    N(0, 1) initialisation, which adds a large random per-id bias that the
    optimiser must first unlearn (it holds ml-latest-small's test AUC near
    0.55 for several epochs).
  * The `fields` tables of `[ids, dim]` are stored as one array
    `[ids, fields, dim]` so that one gather fetches every field-aware vector
    of an id; each `[ids, dim]` slice is xavier-uniform as pytorch-fm's
    tables are (`FieldAwareEmbedding` below). The math is the same.
  * The model returns logits; pytorch-fm returns probabilities.

Differences from the paper, shared with pytorch-fm: the paper's eq. (4) is the
pairwise term alone, while both add the linear term `w_0 + sum_f w_{x_f}`
(zero at initialisation here, so training starts from the paper's model); the
paper draws the factors from U(0, 1/sqrt(dim)) and trains with AdaGrad and
instance-wise normalisation, while both use xavier-uniform factors and the
trainer's optimiser.

This file is self-contained on purpose: it imports only jax, flax and numpy,
so it can be copied alone into another project.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def field_offsets(field_dims: Sequence[int]) -> np.ndarray:
  """Start row of each field in the shared table: `[fields]` int32."""
  return np.concatenate([[0], np.cumsum(field_dims)[:-1]]).astype(np.int32)


def one_hot_rows(field_dims: Sequence[int]) -> int:
  """Rows of the one-hot fields' table: `sum(field_dims)`.

  Raises:
    ValueError: `field_dims` is empty. Multi-hot and numeric fields join the
      one-hot fields; they cannot replace them.
  """
  if not len(field_dims):
    raise ValueError(
      'field_dims is empty: the model needs at least one one-hot'
      ' (categorical) field; multi-hot and numeric fields cannot replace it.'
    )
  return sum(field_dims)


def side_init(rows: int, dim: int) -> Callable[..., jnp.ndarray]:
  """Initialiser of the multi-hot and numeric tables, for any shape.

  Draws U(-b, b) with b = sqrt(6 / (rows + dim)), xavier-uniform's bound for
  the one-hot table `[rows, dim]`: a side field's rows start as the one-hot
  fields' rows do. Xavier over a side table's own few rows would draw them
  several times larger (13 numeric fields of 16 dimensions: b = 0.45), and
  the products of many such fields would swamp the first logits.

  Args:
    rows: rows of the one-hot table, `one_hot_rows(field_dims)`.
    dim: the embedding size.
  """
  bound = float(np.sqrt(6.0 / (rows + dim)))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def take_rows(
  table: jnp.ndarray,
  rows: jnp.ndarray,
  module: nn.Module | None = None,
  name: str = '',
  apart: bool = False,
) -> jnp.ndarray:
  """`table[rows]` `[*rows.shape, ...]`, declared as a table of `module`.

  A trainer may then update only the rows a batch reads (e.g. lazy Adam):
  when the 'table_rows' collection is mutable the rows are sown there under
  `name`, the table's parameter name, and when a 'perturbations' collection
  is passed its zeros of the result's shape are added (`Module.perturb`), so
  that their gradient is the gradient of the gathered rows and the
  table-sized gradient need not be formed. Plain `apply` and `init` do
  neither.

  With `apart`, a trainer's program (the 'table_rows' collection mutable)
  compiled for CPU runs the gather as an operation of its own: XLA:CPU fuses
  a gather into a reshape that flattens its rows (`[B, F, D]` into an MLP's
  `[B, F * D]`) and then emits it one element at a time, several times
  slower than the gather alone. A branch on a runtime value, both of whose
  sides are the same gather, keeps the two apart, from 8 fields (the last
  axis of `rows`; below, compiling the branch costs more than it saves).
  Other programs (export, prediction) keep the plain gather: jax2onnx has
  no platform switch.

  Args:
    table: `[rows, ...]`.
    rows: int rows to read, below the table's size (a larger one reads the
      last row, and its gradient goes there with every optimizer: the
      gather clips, so XLA adds no mask over its result); negative ones are
      padding, read as row 0 (the caller masks them) and reported as no
      row of the table.
    module: the module that owns `table`; None: a plain gather.
    name: the parameter name of `table` in `module`.
    apart: run the gather apart from what reads it (above); for rows that
      only a flattening reshape reads.

  Returns:
    `[*rows.shape, ...]`.
  """

  def gather(table, rows):
    return jnp.take(table, jnp.maximum(rows, 0), axis=0, mode='clip')

  def branched(table, rows):
    return jax.lax.cond(rows.reshape(-1)[0] > 0, gather, gather, table, rows)

  if module is None or module.is_initializing():
    return gather(table, rows)
  module.sow('table_rows', name, rows)
  if (
    apart
    and rows.size
    and rows.shape[-1] >= 8
    and module.is_mutable_collection('table_rows')
  ):
    x = jax.lax.platform_dependent(table, rows, cpu=branched, default=gather)
  else:
    x = gather(table, rows)
  return module.perturb(name, x)


def pool_multi_hot(
  table: jnp.ndarray,
  multi_ids: jnp.ndarray,
  multi_field_dims: Sequence[int],
  pooling: str = 'mean',
  module: nn.Module | None = None,
  name: str = '',
) -> jnp.ndarray:
  """Pools the rows of each multi-hot field's ids into one row per field.

  Field `m`'s ids index `table` from row `field_offsets(multi_field_dims)[m]`,
  as one-hot fields index theirs. Padding (-1) is skipped: 'mean' divides the
  sum by the number of ids present, 'sum' keeps it; a field without ids pools
  to zeros.

  Args:
    table: rows of every multi-hot field, `[sum(multi_field_dims), ...]`.
    multi_ids: ids `[batch, multi_fields, max_len]`, padded with -1.
    multi_field_dims: number of ids of each multi-hot field.
    pooling: 'mean' or 'sum'.
    module: the module that owns `table` (`take_rows`); None: none.
    name: the parameter name of `table` in `module`.

  Returns:
    One row per field, `[batch, multi_fields, ...]`.
  """
  if pooling not in ('mean', 'sum'):
    raise ValueError(f"multi_pooling must be 'mean' or 'sum', got {pooling!r}.")
  present = multi_ids >= 0  # [B, M, L]
  offsets = field_offsets(multi_field_dims)[:, None]  # [M, 1]
  rows = jnp.where(present, multi_ids + offsets, -1)  # [B, M, L]
  trailing = (1,) * (table.ndim - 1)
  mask = present.reshape(present.shape + trailing)  # [B, M, L, 1...]
  x = take_rows(table, rows, module, name)  # [B, M, L, ...]
  x = jnp.where(mask, x, 0)
  pooled = jnp.sum(x, axis=2)  # [B, M, ...]
  if pooling == 'mean':
    count = jnp.sum(present, axis=2).reshape(pooled.shape[:2] + trailing)
    pooled = pooled / jnp.maximum(count, 1).astype(pooled.dtype)
  return pooled


def embed_fields(
  tables: tuple[jnp.ndarray, jnp.ndarray | None, jnp.ndarray | None],
  ids: jnp.ndarray,
  multi_ids: jnp.ndarray | None,
  dense: jnp.ndarray | None,
  field_dims: Sequence[int],
  multi_field_dims: Sequence[int] = (),
  multi_pooling: str = 'mean',
  module: nn.Module | None = None,
  names: tuple[str, str] = ('', ''),
  apart: bool = False,
) -> jnp.ndarray:
  """Rows of every field: one-hot ids, then multi-hot ids, then numbers.

  A one-hot field takes its id's row, a multi-hot field its ids' rows pooled
  (`pool_multi_hot`), a numeric field its value times its own row.

  Args:
    tables: the one-hot table `[sum(field_dims), ...]`, the multi-hot table
      `[sum(multi_field_dims), ...]` (None without multi-hot fields) and the
      numeric table `[dense_fields, ...]` (None without numeric fields).
    ids: `[batch, fields]` int, field `f`'s in `[0, field_dims[f])`.
    multi_ids: `[batch, multi_fields, max_len]` int, padded with -1; None
      without multi-hot fields.
    dense: `[batch, dense_fields]` float; None without numeric fields.
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    multi_pooling: 'mean' or 'sum' (`pool_multi_hot`).
    module: the module that owns the tables (`take_rows`); None: none.
    names: the parameter names of the one-hot and multi-hot tables.
    apart: `take_rows`'s, for the one-hot table when it is the only one.

  Returns:
    `[batch, fields + multi_fields + dense_fields, ...]`.

  Raises:
    ValueError: an input whose shape disagrees with the declared fields.
  """
  table, multi_table, dense_table = tables
  num_dense = 0 if dense_table is None else dense_table.shape[0]
  for name, x, fields, ndim, declared in (
    ('ids', ids, len(field_dims), 2, f'field_dims={tuple(field_dims)}'),
    (
      'multi_ids',
      multi_ids,
      len(multi_field_dims),
      3,
      f'multi_field_dims={tuple(multi_field_dims)}',
    ),
    ('dense', dense, num_dense, 2, f'num_dense={num_dense}'),
  ):
    if x is None and fields == 0:
      continue
    if x is None or x.ndim != ndim or x.shape[:2] != (ids.shape[0], fields):
      batch = 'batch' if name == 'ids' else ids.shape[0]
      want = f'[{batch}, {fields}' + (', max_len]' if ndim == 3 else ']')
      got = 'None' if x is None else f'shape {tuple(x.shape)}'
      raise ValueError(
        f'{name} must be {want} for a model built with {declared}; got {got}.'
      )
  rows = ids + field_offsets(field_dims)  # [B, F]
  # Apart only when nothing is concatenated after it (its fusion again).
  alone = apart and multi_table is None and dense_table is None
  parts = [take_rows(table, rows, module, names[0], alone)]  # [B, F, ...]
  if multi_table is not None:
    parts.append(
      pool_multi_hot(
        multi_table,
        multi_ids,
        multi_field_dims,
        multi_pooling,
        module,
        names[1],
      )
    )  # [B, M, ...]
  if dense_table is not None:
    values = dense.astype(dense_table.dtype)  # [B, N]
    values = values.reshape(values.shape + (1,) * (dense_table.ndim - 1))
    parts.append(values * dense_table)  # [B, N, ...]
  return jnp.concatenate(parts, axis=1)


class FeaturesLinear(nn.Module):
  """Linear term `w_0 + sum_f w_f(x_f)` over every field.

  A one-hot field adds its id's weight, a multi-hot field its ids' weights
  pooled as its embeddings are, a numeric field its weight times its value.

  Attributes:
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    ids: jnp.ndarray,
    multi_ids: jnp.ndarray | None = None,
    dense: jnp.ndarray | None = None,
  ) -> jnp.ndarray:
    """Maps the fields' inputs (`embed_fields`) to the logit term `[batch]`."""
    zeros = nn.initializers.zeros
    weight = self.param('weight', zeros, (one_hot_rows(self.field_dims), 1))
    bias = self.param('bias', zeros, (1,))
    multi_weight = dense_weight = None
    if self.multi_field_dims:
      multi_weight = self.param(
        'multi_weight', zeros, (sum(self.multi_field_dims), 1)
      )
    if self.num_dense:
      dense_weight = self.param('dense_weight', zeros, (self.num_dense, 1))
    w = embed_fields(
      (weight, multi_weight, dense_weight),
      ids,
      multi_ids,
      dense,
      self.field_dims,
      self.multi_field_dims,
      self.multi_pooling,
      module=self,
      names=('weight', 'multi_weight'),
    ).astype(self.dtype)  # [B, T, 1]
    return jnp.sum(w, axis=(1, 2)) + bias.astype(self.dtype)[0]  # [B]


class FieldAwareEmbedding(nn.Module):
  """Field-aware factors `v_{x_f, g}` of every field against every field.

  Each table has one `[dim]` vector per row and field met: one-hot ids
  `[ids, fields, dim]`, multi-hot ids likewise (pooled per field), numeric
  fields `[dense_fields, fields, dim]` (scaled by the value), where `fields`
  counts every field. Each `[:, g]` slice of the one-hot table is
  xavier-uniform initialised as one `[rows, dim]` table; the side tables
  are drawn alike (`side_init`).

  Attributes:
    field_dims: number of ids of each one-hot field.
    embed_dim: size k of each factor.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    dtype: dtype of the returned factors.
  """

  field_dims: Sequence[int]
  embed_dim: int
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    ids: jnp.ndarray,
    multi_ids: jnp.ndarray | None = None,
    dense: jnp.ndarray | None = None,
  ) -> jnp.ndarray:
    """Maps the fields' inputs (`embed_fields`) to `[batch, T, T, dim]`.

    `T` counts every field: one-hot, then multi-hot, then numeric. Entry
    `[b, f, g]` is `v_{x_f, g}`: the vector of field `f` used against
    field `g`.
    """
    init = nn.initializers.xavier_uniform(
      in_axis=0, out_axis=2, batch_axis=(1,)
    )
    fields = len(self.field_dims) + len(self.multi_field_dims) + self.num_dense
    row = (fields, self.embed_dim)
    rows = one_hot_rows(self.field_dims)
    table = self.param('embedding', init, (rows,) + row)
    side = side_init(rows, self.embed_dim)
    multi_table = dense_table = None
    if self.multi_field_dims:
      multi_table = self.param(
        'multi_embedding', side, (sum(self.multi_field_dims),) + row
      )
    if self.num_dense:
      dense_table = self.param('dense_embedding', side, (self.num_dense,) + row)
    return embed_fields(
      (table, multi_table, dense_table),
      ids,
      multi_ids,
      dense,
      self.field_dims,
      self.multi_field_dims,
      self.multi_pooling,
      module=self,
      names=('embedding', 'multi_embedding'),
    ).astype(self.dtype)  # [B, T, T, D]


class FieldAwareFactorizationMachine(nn.Module):
  """Pairwise term `sum_{f < g} <v_{x_f, g}, v_{x_g, f}>` (paper eq. 4)."""

  @nn.compact
  def __call__(self, v: jnp.ndarray) -> jnp.ndarray:
    """Maps field-aware factors `[batch, fields, fields, dim]` to `[batch]`."""
    # Entry [b, f, g] is <v_{x_f, g}, v_{x_g, f}>: symmetric in f and g.
    dots = jnp.sum(v * jnp.swapaxes(v, 1, 2), axis=-1)  # [B, F, F]
    upper = np.triu(np.ones(dots.shape[1:], dtype=bool), k=1)  # [F, F]
    return jnp.sum(jnp.where(upper, dots, 0.0), axis=(1, 2))  # [B]


class FieldAwareFactorizationMachineModel(nn.Module):
  """FFM: `y = w_0 + sum_f w_{x_f} + sum_{f<g} <v_{x_f, g}, v_{x_g, f}>`.

  Multi-hot and numeric fields are more fields f, g of both sums.

  Attributes:
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    embed_dim: size k of each field-aware factor.
    axis_name: unused (FFM has no BatchNorm); kept for the common signature.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  embed_dim: int = 4
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    ids: jnp.ndarray,
    multi_ids: jnp.ndarray | None = None,
    dense: jnp.ndarray | None = None,
    *,
    train: bool = False,
  ) -> jnp.ndarray:
    """Returns logits `[batch]`.

    Args:
      ids: one-hot ids `[batch, fields]` int32, field `f`'s in
        `[0, field_dims[f])`. Nothing checks them (a traced array cannot
        raise): an id outside reads another field's or an edge row.
      multi_ids: multi-hot ids `[batch, multi_fields, max_len]` int32,
        padded with -1; required iff `multi_field_dims`.
      dense: numeric values `[batch, dense_fields]` float32; required iff
        `num_dense`.
      train: unused (FFM has neither dropout nor BatchNorm).
    """
    del train
    inputs = (ids, multi_ids, dense)
    fields = dict(
      multi_field_dims=tuple(self.multi_field_dims),
      num_dense=self.num_dense,
      multi_pooling=self.multi_pooling,
      dtype=self.dtype,
    )
    linear = FeaturesLinear(self.field_dims, **fields)(*inputs)  # [B]
    v = FieldAwareEmbedding(self.field_dims, self.embed_dim, **fields)(
      *inputs
    )  # [B, T, T, D]
    pairwise = FieldAwareFactorizationMachine()(v)  # [B]
    return (linear + pairwise).astype(jnp.float32)


Model = FieldAwareFactorizationMachineModel
