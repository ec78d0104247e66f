"""FinalMLP: two MLP streams with feature selection and bilinear fusion.

Kelong Mao, Jieming Zhu, Liangcai Su, Guohao Cai, Yuru Li and Zhenhua Dong.
"FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction". AAAI
Conference on Artificial Intelligence (AAAI), 2023.
https://arxiv.org/abs/2304.00902

The embeddings of all fields, concatenated, form `e` `[batch, fields * dim]`.
Each of two streams k = 1, 2 sees `e` through its own feature-selection gate
(the paper's eq. (3)-(4)),

  g_k = 2 sigmoid(MLP_k^gate(x_k)),    h_k = g_k * e,

where `x_k` is the concatenated embeddings of the stream's context fields
(`fs1_context`, `fs2_context`, from their own embedding table) and the gate
MLP is Linear -> ReLU per hidden layer, then Linear to `fields * dim` units;
a stream without context fields (FuxiCTR's default) has the same gate for
every example, `g_k = 2 sigmoid(b_k)` with a learned `b_k` `[fields * dim]`.
Each stream is an MLP (Linear -> [BatchNorm] -> ReLU -> Dropout) with outputs
`o_1` `[batch, d_1]` and `o_2` `[batch, d_2]`, fused by multi-head bilinear
aggregation (eq. (5)-(6)): both are split into `num_heads` chunks `o_k^h`,

  y = b + w_1^T o_1 + w_2^T o_2 + sum_h o_1^h^T W_h o_2^h,

with W_h `[d_1 / heads, d_2 / heads]`. Inputs are per-field ids `[batch,
fields]` (int32, field `f` in `[0, field_dims[f])`); the output is the
logit y `[batch]` (float32). The sigmoid belongs to the loss.

Optional side inputs are more fields of `e`: a multi-hot field (`multi_ids`,
e.g. a movie's genres) adds the mean (or sum) of its ids' embeddings, a
numeric field (`dense`) `e x` for its value `x`, so `e` has `(fields +
multi_fields + dense_fields) * dim` entries, all gated. Context fields are
one-hot fields.

pytorch-fm has no FinalMLP; the reference for the details the paper leaves
open is FuxiCTR (`FinalMLP`, `FeatureSelection`, `InteractionAggregation`).
Differences from it:
  * By default the stream MLPs carry BatchNorm (as every MLP of this
    library, after pytorch-fm), and their Linear layers no bias (BatchNorm
    cancels it); `batch_norm=False` drops it and keeps the biases, as
    FuxiCTR's published FinalMLP configs (its `mlp1_batch_norm` and
    `mlp2_batch_norm`, one flag here). The gate MLPs have none, as
    FuxiCTR's.
  * One bias `b` where FuxiCTR's two Linear layers `w_1`, `w_2` have one each
    (their sum is one parameter). W starts xavier-normal over its
    `[heads * d_1/heads * d_2/heads, 1]` view, as FuxiCTR; the other layers
    use Flax's default initialisers (LeCun normal kernels, zero biases;
    `linear_init='torch'` gives the MLPs torch's), FuxiCTR xavier-normal
    ones.
  * Without context fields FuxiCTR feeds its gate MLP a learned input
    that starts at zero: the hidden units start at ReLU(0) = 0, where the
    ReLU passes no gradient, so the input, the hidden layers and the output
    kernel never train and only the output bias learns. This file keeps
    that bias alone, `g_k = 2 sigmoid(b_k)` with `b_k` starting at zero:
    the same gate at every step of training, without the parameters that
    never change.

This file is self-contained on purpose: it imports only jax, flax and numpy,
so it can be copied alone into another project.
"""

from collections.abc import Callable, Sequence
import math

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


class FeatureGate(nn.Module):
  """Gate `2 sigmoid(MLP(x))`: Linear -> ReLU per hidden layer, no BatchNorm.

  Attributes:
    hidden_dims: widths of the hidden layers.
    features: number of gated features (the output width).
    dtype: dtype of the computation.
  """

  hidden_dims: Sequence[int]
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps the context `[batch, c]` to gates in (0, 2) `[batch, features]`."""
    for width in self.hidden_dims:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))  # [B, H]
    return 2.0 * nn.sigmoid(nn.Dense(self.features, dtype=self.dtype)(x))


class InteractionAggregation(nn.Module):
  """Multi-head bilinear fusion `b + w_1^T o_1 + w_2^T o_2 + sum_h ...`.

  Attributes:
    num_heads: number of heads; both inputs' widths must divide by it.
    dtype: dtype of the computation.
  """

  num_heads: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, o1: jnp.ndarray, o2: jnp.ndarray) -> jnp.ndarray:
    """Maps `[batch, d_1]` and `[batch, d_2]` to the logit `[batch]`."""
    heads = self.num_heads
    if o1.shape[-1] % heads or o2.shape[-1] % heads:
      raise ValueError(
        f'num_heads={heads} must divide both stream widths, got'
        f' {o1.shape[-1]} and {o2.shape[-1]}.'
      )
    h1, h2 = o1.shape[-1] // heads, o2.shape[-1] // heads

    def xavier_flat(key, shape):
      std = math.sqrt(2.0 / (math.prod(shape) + 1))
      return std * nn.initializers.normal(1.0)(key, shape)

    w = self.param('w_xy', xavier_flat, (heads, h1, h2)).astype(self.dtype)
    y = nn.Dense(1, dtype=self.dtype, name='w_x')(o1)[:, 0]  # [B]
    y += nn.Dense(1, use_bias=False, dtype=self.dtype, name='w_y')(o2)[:, 0]
    o1 = o1.reshape(o1.shape[0], heads, h1)  # [B, heads, h1]
    o2 = o2.reshape(o2.shape[0], heads, h2)  # [B, heads, h2]
    return y + jnp.einsum('bhi,hij,bhj->b', o1, w, o2)  # [B]


class FinalMLP(nn.Module):
  """FinalMLP: two gated MLP streams fused by bilinear aggregation.

  Attributes:
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    embed_dim: embedding size.
    mlp1_dims: widths of the hidden layers of stream 1.
    mlp2_dims: widths of the hidden layers of stream 2.
    dropouts: dropout rates after each hidden layer of stream 1 and 2.
    use_fs: gate the streams' inputs (feature selection); False feeds `e`.
    fs_dims: widths of the hidden layers of each gate MLP.
    fs1_context: one-hot fields (indices into `field_dims`, taken in
      increasing order) whose embeddings are gate 1's input; () for a
      learned gate, the same for every example.
    fs2_context: the same for gate 2.
    num_heads: heads of the bilinear fusion.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    linear_init: initialisers of the MLP's Dense layers, 'lecun' (Flax's
      default) or 'torch' (torch.nn.Linear's).
    batch_norm: BatchNorm in the stream MLPs (pytorch-fm's MLP); False,
      FuxiCTR's published configs: Linear (with its bias) -> ReLU ->
      Dropout.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  embed_dim: int = 16
  mlp1_dims: Sequence[int] = (1024, 512)
  mlp2_dims: Sequence[int] = (1024, 512, 256)
  dropouts: Sequence[float] = (0.0, 0.0)
  use_fs: bool = True
  fs_dims: Sequence[int] = (1024, 512)
  fs1_context: Sequence[int] = ()
  fs2_context: Sequence[int] = ()
  num_heads: int = 2
  axis_name: str | None = None
  linear_init: str = 'lecun'
  batch_norm: bool = True
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if len(self.dropouts) != 2:
      raise ValueError(
        'config.model.dropouts: give two rates (stream 1, stream 2); '
        f'got {tuple(self.dropouts)!r}.'
      )
    if self.num_heads < 1:
      raise ValueError(
        f'config.model.num_heads must be >= 1; got {self.num_heads!r}.'
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
    v = FeaturesEmbedding(self.field_dims, self.embed_dim, **fields)(
      *inputs
    )  # [B, T, D]
    e = jax.lax.collapse(v, 1)  # [B, T * D]
    streams = []
    for k, context in ((1, self.fs1_context), (2, self.fs2_context)):
      h = e
      if self.use_fs:
        if context:
          fields = sorted(set(context))
          if fields[0] < 0 or fields[-1] >= len(self.field_dims):
            raise ValueError(
              f'config.model.fs{k}_context={tuple(context)}: one-hot field'
              f' indices must be in [0, {len(self.field_dims)}).'
            )
          x = FeaturesEmbedding(
            [self.field_dims[f] for f in fields],
            self.embed_dim,
            dtype=self.dtype,
            name=f'fs{k}_context_embedding',
          )(ids[:, fields])  # [B, C, D]
          x = jax.lax.collapse(x, 1)  # [B, C * D]
          gate = FeatureGate(
            self.fs_dims, e.shape[-1], dtype=self.dtype, name=f'fs{k}_gate'
          )(x)  # [B, T * D]
        else:
          bias = self.param(
            f'fs{k}_gate_bias', nn.initializers.zeros, (e.shape[-1],)
          )
          gate = 2.0 * nn.sigmoid(bias.astype(self.dtype))  # [T * D]
        h = gate * e
      mlp = MultiLayerPerceptron(
        self.mlp1_dims if k == 1 else self.mlp2_dims,
        dropout=self.dropouts[k - 1],
        output_layer=False,
        axis_name=self.axis_name,
        linear_init=self.linear_init,
        batch_norm=self.batch_norm,
        dtype=self.dtype,
        name=f'mlp{k}',
      )
      streams.append(mlp(h, train=train))  # [B, d_k]
    y = InteractionAggregation(self.num_heads, dtype=self.dtype)(*streams)
    return y.astype(jnp.float32)


Model = FinalMLP
