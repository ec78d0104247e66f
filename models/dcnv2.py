"""Deep & Cross Network V2 (DCN-V2).

Ruoxi Wang, Rakesh Shivanna, Derek Z. Cheng, Sagar Jain, Dong Lin, Lichan
Hong and Ed H. Chi. "DCN V2: Improved Deep & Cross Network and Practical
Lessons for Web-scale Learning to Rank Systems". The Web Conference (WWW),
2021. https://arxiv.org/abs/2008.13535

The embeddings of all fields, concatenated, form `x_0` `[batch, fields *
dim]`. A cross network of `num_cross_layers` layers builds explicit feature
crosses of growing order; the full-rank cross layer is the paper's eq. (1),

  x_{l+1} = x_0 * (W_l x_l + b_l) + x_l,            W_l `[n, n]`,

(`*` element-wise), and its mixture of `num_experts` low-rank experts is
eq. (4) (with `low_rank` r set),

  x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l,
  E_i(x_l) = x_0 * (U_l^i g(C_l^i g(V_l^i^T x_l)) + b_l),

with U, V `[n, r]`, C `[r, r]`, g = tanh and the gates `G(x_l) =
softmax_i(g_i^T x_l)`. A deep network (hidden layers Linear -> BatchNorm ->
ReLU -> Dropout) either follows the cross network (structure 'stacked',
Figure 1 left: `h = MLP(x_L)`) or runs beside it on `x_0` (structure
'parallel', Figure 1 right: `h = [x_L; MLP(x_0)]`); a Linear layer maps `h`
to the logit. 'stacked' with no hidden layers (`mlp_dims=()`) is the cross
network alone.

Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`); the output is the logit `[batch]` (float32). The
sigmoid belongs to the loss. Optional side inputs are more fields of `x_0`:
a multi-hot field (`multi_ids`, e.g. a movie's genres) adds the mean (or
sum) of its ids' embeddings, a numeric field (`dense`) `e x` for its value
`x`, so `x_0` has `(fields + multi_fields + dense_fields) * dim` entries.

pytorch-fm has no DCN-V2; the reference for the details the paper leaves
open is FuxiCTR (`CrossNetV2`, `CrossNetMix`, `DCNv2`):
  * The gates `g_i` are shared by all cross layers, as in the paper's
    eq. (4) (G_i has no layer index) and FuxiCTR; each layer has its own U,
    V, C and b.
  * U and V `[experts, n, r]` and C `[experts, r, r]` start as FuxiCTR's:
    torch's xavier-normal over the whole tensor (fan-in `n r` and fan-out
    `experts r` for U and V, `r^2` and `experts r` for C), b at zero.

Differences from FuxiCTR: by default the hidden layers carry BatchNorm (as
every MLP of this library, after pytorch-fm) and their Linear has no bias
(BatchNorm cancels it); `batch_norm=False` drops it and keeps the biases,
as FuxiCTR's published DCN-V2 configs. The full-rank cross layers, the
gates and the hidden layers use Flax's default initialisers (LeCun normal
kernels, zero biases; with `linear_init='torch'` the hidden layers use
torch's), FuxiCTR xavier-normal ones. FuxiCTR's fourth structure
'stacked_parallel' is left out.


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


class FeaturesEmbedding(nn.Module):
  """Embeddings of every field, drawn as xavier-uniform draws the one-hot table.

  One-hot fields share one table, multi-hot fields another (pooled per
  field), numeric fields have one vector each, scaled by the value.

  Attributes:
    field_dims: number of ids of each one-hot field.
    embed_dim: embedding size.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    dtype: dtype of the returned embeddings.
    apart: `take_rows`'s, for the one-hot table: for embeddings that only a
      flattening reshape reads.
  """

  field_dims: Sequence[int]
  embed_dim: int
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  dtype: jnp.dtype = jnp.float32
  apart: bool = False

  @nn.compact
  def __call__(
    self,
    ids: jnp.ndarray,
    multi_ids: jnp.ndarray | None = None,
    dense: jnp.ndarray | None = None,
  ) -> jnp.ndarray:
    """Maps the fields' inputs (`embed_fields`) to `[batch, fields, dim]`.

    `fields` counts every field: one-hot, then multi-hot, then numeric.
    """
    init = nn.initializers.xavier_uniform()
    dim = self.embed_dim
    rows = one_hot_rows(self.field_dims)
    table = self.param('embedding', init, (rows, dim))
    side = side_init(rows, dim)
    multi_table = dense_table = None
    if self.multi_field_dims:
      multi_table = self.param(
        'multi_embedding', side, (sum(self.multi_field_dims), dim)
      )
    if self.num_dense:
      dense_table = self.param('dense_embedding', side, (self.num_dense, dim))
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
      apart=self.apart,
    ).astype(self.dtype)  # [B, T, D]


def linear_initializers(kind: str, fan_in: int) -> dict:
  """`nn.Dense` initialiser arguments for a layer reading `fan_in` features.

  Args:
    kind: 'lecun', Flax's default (LeCun-normal kernel, zero bias); or
      'torch', torch.nn.Linear's (kernel and bias both uniform in
      `[-1/sqrt(fan_in), 1/sqrt(fan_in))`).
    fan_in: number of input features.
  """
  if kind == 'lecun':
    return {}
  if kind != 'torch':
    raise ValueError(f"linear_init must be 'lecun' or 'torch', got {kind!r}.")
  bound = 1.0 / np.sqrt(fan_in)

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return dict(kernel_init=uniform, bias_init=uniform)


class MultiLayerPerceptron(nn.Module):
  """Linear -> BatchNorm -> ReLU -> Dropout per hidden layer, then Linear.

  A hidden Linear layer has no bias: the BatchNorm after it subtracts the
  batch mean, so such a bias would get no gradient from the loss, only
  from weight decay, which Adam scales up to full-size steps; it would then
  drift every step and the running mean that evaluation subtracts would
  trail it. BatchNorm's own bias takes its place (torch.nn.Linear's bias
  there folds into the running mean: `mean - bias`). Without BatchNorm
  (`batch_norm=False`: Linear -> ReLU -> Dropout, FuxiCTR's `MLP_Block`
  with `batch_norm=False`) the hidden layers keep their biases.

  Attributes:
    hidden_dims: widths of the hidden layers.
    dropout: dropout rate after each hidden layer.
    output_layer: end with a Linear layer to one unit (`[batch]` out);
      otherwise return the last hidden layer `[batch, hidden_dims[-1]]`.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    linear_init: initialisers of the Dense layers, 'lecun' (Flax's
      default) or 'torch' (torch.nn.Linear's).
    batch_norm: BatchNorm after each hidden Linear layer.
    dtype: dtype of the computation.
  """

  hidden_dims: Sequence[int]
  dropout: float = 0.0
  output_layer: bool = True
  axis_name: str | None = None
  linear_init: str = 'lecun'
  batch_norm: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Maps `[batch, features]` to `[batch]` (or `[batch, hidden]`)."""
    for width in self.hidden_dims:
      init = linear_initializers(self.linear_init, x.shape[-1])
      x = nn.Dense(
        width, use_bias=not self.batch_norm, dtype=self.dtype, **init
      )(x)  # [B, H]
      if self.batch_norm:
        x = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          epsilon=1e-5,
          axis_name=self.axis_name,
          dtype=self.dtype,
        )(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.output_layer:
      init = linear_initializers(self.linear_init, x.shape[-1])
      x = nn.Dense(1, dtype=self.dtype, **init)(x)[:, 0]  # [B]
    return x


class CrossNetworkV2(nn.Module):
  """Full-rank (eq. 1) or mixture of low-rank (eq. 4) cross layers.

  Attributes:
    num_layers: number of cross layers L.
    low_rank: rank r of each expert; None for full-rank layers.
    num_experts: number of low-rank experts (only with `low_rank`).
    dtype: dtype of the computation.
  """

  num_layers: int
  low_rank: int | None = None
  num_experts: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jnp.ndarray) -> jnp.ndarray:
    """Maps `x_0` `[batch, n]` to `x_L` `[batch, n]`."""
    n = x0.shape[-1]
    x = x0
    if self.low_rank is None:
      for i in range(self.num_layers):
        w_x = nn.Dense(n, dtype=self.dtype, name=f'cross_{i}')(x)  # [B, n]
        x = x0 * w_x + x
      return x
    # torch's xavier_normal_ on [experts, n, r] and [experts, r, r], as
    # FuxiCTR: fans over the whole tensor (fan_in n * r, fan_out experts *
    # r; r * r and experts * r for C), an untruncated normal.
    init = nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'normal', in_axis=1, out_axis=0
    )
    experts, r = self.num_experts, self.low_rank
    gating = nn.Dense(experts, use_bias=False, dtype=self.dtype, name='gating')
    for i in range(self.num_layers):
      u = self.param(f'U_{i}', init, (experts, n, r)).astype(self.dtype)
      v = self.param(f'V_{i}', init, (experts, n, r)).astype(self.dtype)
      c = self.param(f'C_{i}', init, (experts, r, r)).astype(self.dtype)
      b = self.param(f'b_{i}', nn.initializers.zeros, (n,)).astype(self.dtype)
      h = jnp.tanh(jnp.einsum('bn,enr->ber', x, v))  # [B, E, r]
      h = jnp.tanh(jnp.einsum('ers,bes->ber', c, h))  # [B, E, r]
      e = x0[:, None, :] * (jnp.einsum('enr,ber->ben', u, h) + b)  # [B, E, n]
      g = nn.softmax(gating(x), axis=-1)  # [B, E]
      x = jnp.einsum('be,ben->bn', g, e) + x  # [B, n]
    return x


class DeepCrossNetworkV2(nn.Module):
  """DCN-V2: cross network and deep network, stacked or in parallel.

  Attributes:
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    embed_dim: embedding size; `x_0` has `fields * embed_dim` entries.
    num_cross_layers: number of cross layers.
    mlp_dims: widths of the hidden layers of the deep network.
    dropout: dropout rate after each hidden layer.
    structure: 'parallel' or 'stacked'.
    low_rank: rank of the mixture's experts; None for full-rank layers.
    num_experts: number of low-rank experts (only with `low_rank`).
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    linear_init: initialisers of the MLP's Dense layers, 'lecun' (Flax's
      default) or 'torch' (torch.nn.Linear's).
    batch_norm: BatchNorm in the deep network's hidden layers (pytorch-fm's
      MLP); False, FuxiCTR's: Linear (with its bias) -> ReLU -> Dropout.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  embed_dim: int = 16
  num_cross_layers: int = 3
  mlp_dims: Sequence[int] = (500, 500, 500)
  dropout: float = 0.0
  structure: str = 'parallel'
  low_rank: int | None = None
  num_experts: int = 4
  axis_name: str | None = None
  linear_init: str = 'lecun'
  batch_norm: bool = True
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.low_rank is not None and self.low_rank < 1:
      raise ValueError(
        'config.model.low_rank must be >= 1, or None for full-rank cross'
        f' layers; got {self.low_rank!r}.'
      )
    if self.num_experts < 1:
      raise ValueError(
        f'config.model.num_experts must be >= 1; got {self.num_experts!r}.'
      )
    super().__post_init__()

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
      train: dropout and BatchNorm in training mode.
    """
    inputs = (ids, multi_ids, dense)
    fields = dict(
      multi_field_dims=tuple(self.multi_field_dims),
      num_dense=self.num_dense,
      multi_pooling=self.multi_pooling,
      dtype=self.dtype,
    )
    if self.structure not in ('parallel', 'stacked'):
      raise ValueError(
        f"structure must be 'parallel' or 'stacked', got {self.structure!r}."
      )
    v = FeaturesEmbedding(self.field_dims, self.embed_dim, **fields)(
      *inputs
    )  # [B, T, D]
    x0 = jax.lax.collapse(v, 1)  # [B, T * D]
    cross = CrossNetworkV2(
      self.num_cross_layers,
      low_rank=self.low_rank,
      num_experts=self.num_experts,
      dtype=self.dtype,
    )(x0)  # [B, T * D]
    deep = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=self.dropout,
      output_layer=False,
      axis_name=self.axis_name,
      linear_init=self.linear_init,
      batch_norm=self.batch_norm,
      dtype=self.dtype,
    )
    if self.structure == 'stacked':
      h = deep(cross, train=train)  # [B, H]
    else:
      h = jnp.concatenate([cross, deep(x0, train=train)], axis=-1)  # [B, n + H]
    logit = nn.Dense(1, dtype=self.dtype, name='logit')(h)[:, 0]  # [B]
    return logit.astype(jnp.float32)


Model = DeepCrossNetworkV2
