"""AutoInt: feature interactions learnt by multi-head self-attention.

Weiping Song, Chence Shi, Zhiping Xiao, Zhijian Duan, Yewen Xu, Ming Zhang
and Jian Tang. "AutoInt: Automatic Feature Interaction Learning via
Self-Attentive Neural Networks". ACM International Conference on Information
and Knowledge Management (CIKM), 2019. https://arxiv.org/abs/1810.11921

Each field's embedding `e_m` attends to every field's (the paper's
eq. (5)-(7)); for each head h of H, with `d' = A / H` the head size,

  alpha^h_{m,k} = softmax_k(<W^h_Q e_m, W^h_K e_k> / sqrt(d')),
  e~^h_m        = sum_k alpha^h_{m,k} W^h_V e_k,
  e~_m          = W_O [e~^1_m; ...; e~^H_m] + b_O,

and a residual connection and a ReLU follow (eq. (8)),
`e^Res_m = ReLU(e~_m + W_Res e_m)`. The output unit (eq. (9)) reads the
concatenation `[e^Res_1; ...; e^Res_F]` `[batch, fields * A]`; as
pytorch-fm's model (the paper's AutoInt+, "jointly trained with a DNN"), a
linear term and an MLP on the concatenated embeddings are added:

  y = w_0 + sum_f w_{x_f} + w_att^T [e^Res_1; ...; e^Res_F] + b_att
      + MLP([e_1; ...; e_F]).

Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`); the output is the logit y `[batch]` (float32). The
paper's sigmoid belongs to the loss.

Optional side inputs are more fields that attend and are attended to: a
multi-hot field (`multi_ids`, e.g. a movie's genres) adds the mean (or sum)
of its ids' weights and embeddings, a numeric field (`dense`) `w x` and
`v x` for its value `x`, as the paper's embedding layer does for
multi-valued and numerical fields.

The architecture is pytorch-fm's (torchfm 0.7.0,
`AutomaticFeatureInteractionModel`, whose weights map one to one, with
`torch.nn.MultiheadAttention`'s `in_proj` split into the query, key and
value layers), which differs from the paper's eq. (5)-(8) in ways this file
keeps:
  * The embeddings `[batch, fields, embed_dim]` are first projected by one
    Dense layer to `[batch, fields, atten_embed_dim]`, and the attention
    layers work in that width A.
  * The attention layer is torch's `MultiheadAttention`: query, key and
    value projections with biases, scores scaled by `1 / sqrt(d')`, and an
    output projection `W_O, b_O` after the heads are concatenated.
  * With several attention layers, the residual connection and the ReLU
    come once, after the last layer (eq. (8) has them in every layer), and
    `has_residual=False` removes the residual connection.
  * Dropout (`dropouts[0]`) acts on the attention weights alpha, as torch's
    `MultiheadAttention(dropout=...)`; `dropouts[1]` is the MLP's.

Differences from pytorch-fm:
  * The linear weights start at zero instead of `nn.Embedding`'s N(0, 1),
    a large random per-id bias that the optimiser must first unlearn.
  * The model returns logits; pytorch-fm returns probabilities.
  * The hidden layers' Linear has no bias, which the BatchNorm after it
    cancels (`MultiLayerPerceptron`); pytorch-fm's weights load with that
    bias folded into the running mean.
  * The dense layers use Flax's default initialisers (LeCun normal kernels,
    zero biases), not torch's (xavier-uniform attention projections,
    uniform Linear layers; `linear_init='torch'` gives the MLP torch's).
  * Consecutive linear maps are composed before they are applied: the
    embedding projection with the first layer's query, key and value
    projections, and each layer's output projection with the next layer's.
    The parameters and the function are pytorch-fm's (equal up to
    rounding), for fewer operations.

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
    return jnp.sum(w, axis=(1, 2)) + bias.astype(self.dtype)[0]


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
    ).astype(self.dtype)


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


class DenseParams(nn.Module):
  """An `nn.Dense` layer's parameters, returned instead of applied.

  The same names (`kernel [in, out]`, `bias [out]`), shapes and initialisers
  as `nn.Dense(features)`, so that a model can compose two linear maps
  before applying them.

  Attributes:
    features: the layer's output width.
  """

  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns the kernel `[in_features, features]` and the bias."""
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), (in_features, self.features)
    )
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return kernel, bias


Affine = tuple[jnp.ndarray, jnp.ndarray]  # A linear map: kernel, bias.


class MultiHeadSelfAttention(nn.Module):
  """Self-attention across fields with H heads (torch's MultiheadAttention).

  Its input and output carry linear maps not yet applied: the layer reads
  `x W_in + b_in` and returns the heads' output before its projection
  `W_O, b_O`, with that projection. The query, key and value projections
  compose with `W_in` into one matrix `[in, 3 A]`, and the caller composes
  `W_O` with whatever reads it next. Between layers (`in = A`) and on the
  first layer's `[embed_dim]` rows that is fewer operations than applying
  each map in turn, for the same function; an input wider than `1.5 A` goes
  through `W_in` first instead.

  Attributes:
    num_heads: number of heads H; must divide the width A.
    width: the width A of the queries, keys, values and output.
    dropout: dropout rate on the attention weights alpha.
    dtype: dtype of the computation.
  """

  num_heads: int
  width: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, pre: Affine, *, train: bool
  ) -> tuple[jnp.ndarray, Affine]:
    """Attends over `x W_in + b_in`.

    Args:
      x: `[batch, fields, in]`.
      pre: `(W_in [in, A], b_in [A])`, the map that `x` is still to go
        through.
      train: dropout in training mode.

    Returns:
      The heads' concatenated output `[batch, fields, A]` and the output
      projection `(W_O [A, A], b_O [A])` that it is still to go through.
    """
    batch, fields, _ = x.shape
    width, heads = self.width, self.num_heads
    head_dim = width // heads
    w_in, b_in = pre
    maps = [
      DenseParams(width, name=n)(width) for n in ('query', 'key', 'value')
    ]
    w = jnp.concatenate([k for k, _ in maps], axis=1)  # [A, 3 A]
    b = jnp.concatenate([b for _, b in maps])  # [3 A]
    # Rows `[B * F, in]` and heads laid out `[B, H, F, d']`: XLA:CPU runs
    # both faster than `[B, F, in]` inputs and `[B, F, H, d']` heads (a
    # kernel's gradient is then one matrix product, not a contraction over
    # two axes).
    rows = jax.lax.collapse(x, 0, 2).astype(self.dtype)
    if 2 * w_in.shape[0] > 3 * width:  # Composing would cost more.
      rows = rows @ w_in.astype(self.dtype) + b_in.astype(self.dtype)
    else:
      w, b = w_in @ w, b_in @ w + b  # [in, 3 A], [3 A]
    qkv = rows @ w.astype(self.dtype) + b.astype(self.dtype)  # [B * F, 3 A]
    qkv = qkv.reshape(batch, fields, 3, heads, head_dim)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # Each [B, H, F, d'].
    scores = jnp.einsum('bhmd,bhkd->bhmk', q, k) / math.sqrt(head_dim)
    # scores: [B, H, F, F]
    alpha = nn.softmax(scores, axis=-1)  # [B, H, F, F]
    alpha = nn.Dropout(self.dropout, deterministic=not train)(alpha)
    out = jnp.einsum('bhmk,bhkd->bhmd', alpha, v)  # [B, H, F, d']
    out = out.transpose(0, 2, 1, 3).reshape(batch, fields, width)
    return out, DenseParams(width, name='out')(width)


class AutomaticFeatureInteractionModel(nn.Module):
  """AutoInt+: `y = w_0 + sum_f w_{x_f} + w_att^T [e^Res] + MLP([e_f])`.

  Attributes:
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    embed_dim: size of the field embeddings e, read by the MLP.
    atten_embed_dim: width A of the attention layers.
    num_heads: number of attention heads H; must divide `atten_embed_dim`.
    num_layers: number of stacked attention layers.
    mlp_dims: widths of the hidden layers of the MLP.
    dropouts: dropout rates of the attention weights and of the MLP's
      hidden layers.
    has_residual: add `W_Res e_m` to the last attention layer's output.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    linear_init: initialisers of the MLP's Dense layers, 'lecun' (Flax's
      default) or 'torch' (torch.nn.Linear's).
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  embed_dim: int = 16
  atten_embed_dim: int = 64
  num_heads: int = 2
  num_layers: int = 3
  mlp_dims: Sequence[int] = (400, 400)
  dropouts: Sequence[float] = (0.0, 0.0)
  has_residual: bool = True
  axis_name: str | None = None
  linear_init: str = 'lecun'
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if self.num_heads <= 0 or self.atten_embed_dim % self.num_heads:
      raise ValueError(
        'config.model.num_heads must divide config.model.atten_embed_dim; '
        f'got num_heads={self.num_heads!r}, '
        f'atten_embed_dim={self.atten_embed_dim!r}.'
      )
    if len(self.dropouts) != 2:
      raise ValueError(
        'config.model.dropouts: give two rates (attention weights, MLP); '
        f'got {tuple(self.dropouts)!r}.'
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
    linear = FeaturesLinear(self.field_dims, **fields)(*inputs)  # [B]
    e = FeaturesEmbedding(self.field_dims, self.embed_dim, **fields)(
      *inputs
    )  # [B, T, D]
    batch, num_fields, _ = e.shape

    def apply(x: jnp.ndarray, affine: Affine) -> jnp.ndarray:
      w, b = (p.astype(self.dtype) for p in affine)
      y = jax.lax.collapse(x, 0, 2) @ w + b  # Rows: [B * T, A].
      return y.reshape(batch, num_fields, y.shape[-1])

    width = self.atten_embed_dim
    # Each attention layer applies the linear map before it (the embedding
    # projection, or the previous layer's output projection) composed with
    # its own projections.
    a, pending = e, DenseParams(width, name='atten_embedding')(e.shape[-1])
    for i in range(self.num_layers):
      a, pending = MultiHeadSelfAttention(
        self.num_heads,
        width,
        dropout=self.dropouts[0],
        dtype=self.dtype,
        name=f'self_attn_{i}',
      )(a, pending, train=train)  # [B, T, A]
    a = apply(a, pending)  # [B, T, A]
    if self.has_residual:
      res = DenseParams(width, name='res_embedding')(e.shape[-1])
      a = a + apply(e, res)  # [B, T, A]
    r = jax.lax.collapse(nn.relu(a), 1)  # [B, T * A]
    attn = nn.Dense(1, dtype=self.dtype, name='attn_fc')(r)[:, 0]  # [B]
    deep = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=self.dropouts[1],
      axis_name=self.axis_name,
      linear_init=self.linear_init,
      dtype=self.dtype,
    )(jax.lax.collapse(e, 1), train=train)  # [B, T * D] -> [B]
    return (linear + attn + deep).astype(jnp.float32)


Model = AutomaticFeatureInteractionModel
