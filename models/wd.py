"""Wide & Deep.

Heng-Tze Cheng, Levent Koc, Jeremiah Harmsen, Tal Shaked, Tushar Chandra,
Hrishi Aradhye, Glen Anderson, Greg Corrado, Wei Chai, Mustafa Ispir, Rohan
Anil, Zakaria Haque, Lichan Hong, Vihan Jain, Xiaobing Liu, Hemal Shah. "Wide &
Deep Learning for Recommender Systems". Workshop on Deep Learning for
Recommender Systems (DLRS), 2016. https://arxiv.org/abs/1606.07792

A linear model over the raw features and their cross products (wide) and an
MLP over the concatenated embeddings (deep), trained jointly; the paper's
eq. (3) is

  P(y = 1 | x) = sigmoid(w_wide^T [x, phi(x)] + w_deep^T a^(l_f) + b).

With one active (one-hot) id `x_f` per field, the wide part is
`w_0 + sum_f w_{x_f} + sum_{(f, g) in crosses} w_{(x_f, x_g)}`: a cross
product `phi` of two one-hot fields (the paper's eq. 2 with two factors) is
one-hot over the pairs of their ids, so it is one more weight table. The deep
part is `MLP(concat_f e_{x_f})`. Inputs are per-field ids `[batch, fields]`
(int32, field `f` in `[0, field_dims[f])`); the output is the logit
`[batch]` (float32). The sigmoid belongs to the loss.

Optional side inputs are more fields of both parts: a multi-hot field
(`multi_ids`, e.g. a movie's genres) adds the mean (or sum) of its ids'
weights to the wide part and of their embeddings to the deep part's input, a
numeric field (`dense`) `w x` and `e x` for its value `x`.

Differences from pytorch-fm (torchfm 0.7.0, `WideAndDeepModel`):
  * The paper's cross-product features are available: `cross_fields` lists
    pairs of field indices, each adding the weight of the active id pair to
    the wide part. A pair `(f, g)` gets `min(field_dims[f] * field_dims[g],
    cross_buckets)` weights. When all pairs fit, each has its own weight, at
    `x_f * field_dims[g] + x_g`; beyond, the pair goes to bucket
    `MurmurHash3_x86_32(x_f, x_g) mod cross_buckets` (the hash of the two ids
    as little-endian uint32 words, seed 0), so both ids decide the bucket and
    distinct pairs collide as often as random ones. pytorch-fm has no
    crosses; the default `cross_fields=()` reproduces it exactly (the parity
    test uses it). On MovieLens (user, movie) the only cross is user x
    movie, whose pairs each occur once: a test pair's weight was never
    trained (or, hashed, belongs to other pairs), so the config keeps
    crosses off.
  * The linear weights start at zero. pytorch-fm keeps `nn.Embedding`'s
    N(0, 1) initialisation, a large random per-id bias that the optimiser
    must first unlearn.
  * The model returns logits; pytorch-fm returns probabilities.
  * The hidden layers' Linear has no bias, which the BatchNorm after it
    cancels (`MultiLayerPerceptron`); pytorch-fm's weights load with that
    bias folded into the running mean.
  * The hidden layers use Flax's default initialisers (LeCun normal kernels,
    zero biases), not torch's uniform ones (`linear_init='torch'` gives
    those).

Differences from the paper, shared with pytorch-fm: only pairwise crosses
(the paper allows any conjunction); one optimiser for both parts (the paper
trains the wide part with FTRL and L1, the deep part with AdaGrad); the deep
part is the shared Linear -> BatchNorm -> ReLU -> Dropout block with
pytorch-fm's sizes (the paper: 32-dim embeddings, ReLU layers 1024-512-256,
no BatchNorm).

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


def cross_sizes(
  field_dims: Sequence[int],
  cross_fields: Sequence[tuple[int, int]],
  num_buckets: int,
) -> np.ndarray:
  """Number of weights of each cross: `[crosses]` int64."""
  return np.array(
    [min(field_dims[f] * field_dims[g], num_buckets) for f, g in cross_fields],
    dtype=np.int64,
  )


def murmur3_pair(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """MurmurHash3_x86_32, seed 0, of the 8 bytes of two uint32 words `a, b`.

  Computed in uint32 (multiplications wrap mod 2**32), so it is exact and the
  same on every backend. For a fixed `b` it is a bijection of `a`, and the
  reverse: neither id is lost before the modulo.
  """

  def rotl(x, r):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))

  h = jnp.zeros_like(a)
  for k in (a, b):
    k = rotl(k * np.uint32(0xCC9E2D51), 15) * np.uint32(0x1B873593)
    h = rotl(h ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64)
  h = h ^ np.uint32(8)  # the key length in bytes
  h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
  h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


class CrossProductLinear(nn.Module):
  """Wide weights of pairwise cross products `sum_c w_{(x_f, x_g)}`.

  Attributes:
    field_dims: number of ids of each field.
    cross_fields: pairs `(f, g)` of field indices to cross.
    num_buckets: most weights per cross; bigger crosses are hashed into it.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  cross_fields: Sequence[tuple[int, int]]
  num_buckets: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    """Maps ids `[batch, fields]` to the cross-product logit `[batch]`."""
    num_fields = len(self.field_dims)
    for f, g in self.cross_fields:
      if not (0 <= f < num_fields and 0 <= g < num_fields and f != g):
        raise ValueError(
          f'cross_fields entry {(f, g)} must name two different fields in '
          f'[0, {num_fields}).'
        )
    if not 0 < self.num_buckets < 2**31:
      raise ValueError(f'num_buckets must be in [1, 2**31): {self.num_buckets}')
    sizes = cross_sizes(self.field_dims, self.cross_fields, self.num_buckets)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    first = np.array([f for f, _ in self.cross_fields])  # [C]
    second = np.array([g for _, g in self.cross_fields])  # [C]
    second_dims = np.array(self.field_dims, dtype=np.uint32)[second]  # [C]
    exact = np.array(
      [
        self.field_dims[f] * self.field_dims[g] <= self.num_buckets
        for f, g in self.cross_fields
      ]
    )  # [C]
    weight = self.param('weight', nn.initializers.zeros, (int(sizes.sum()), 1))
    ids = jnp.asarray(ids)
    x_f = ids[:, first].astype(jnp.uint32)  # [B, C]
    x_g = ids[:, second].astype(jnp.uint32)  # [B, C]
    # The exact index is below num_buckets < 2**31 wherever it is used.
    buckets = jnp.where(
      exact,
      x_f * second_dims + x_g,
      murmur3_pair(x_f, x_g) % sizes.astype(np.uint32),
    ).astype(jnp.int32)  # [B, C]
    rows = buckets + starts  # [B, C]
    w = take_rows(weight, rows, self, 'weight')  # [B, C, 1]
    w = w.astype(self.dtype)
    return jnp.sum(w, axis=(1, 2))  # [B]


class WideAndDeep(nn.Module):
  """Wide & Deep: `y = w_0 + sum_f w_{x_f} [+ crosses] + MLP(concat_f e_f)`.

  Multi-hot and numeric fields are more fields f of the linear term and of
  the MLP input; crosses pair one-hot fields only.

  Attributes:
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    embed_dim: size of the deep part's embeddings.
    mlp_dims: widths of the hidden layers of the deep part.
    dropout: dropout rate after each hidden layer.
    cross_fields: pairs `(f, g)` of one-hot field indices whose cross
      product joins the wide part; empty (the default) as pytorch-fm.
    cross_buckets: most weights per cross; bigger crosses are hashed.
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
  mlp_dims: Sequence[int] = (16, 16)
  dropout: float = 0.2
  cross_fields: Sequence[tuple[int, int]] = ()
  cross_buckets: int = 2**17
  axis_name: str | None = None
  linear_init: str = 'lecun'
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    if not 0 < self.cross_buckets < 2**31:  # Named as the user set it.
      raise ValueError(
        'config.model.cross_buckets must be in [1, 2**31); got'
        f' {self.cross_buckets!r}.'
      )
    num_fields = len(self.field_dims)
    # Before the first call, named the same; no fields at all is its own
    # error, at the first call.
    for f, g in self.cross_fields if num_fields else ():
      if not (0 <= f < num_fields and 0 <= g < num_fields and f != g):
        raise ValueError(
          f'config.model.cross_fields entry {(f, g)} must name two different'
          f' one-hot fields, columns of ids in [0, {num_fields}): multi-hot'
          ' and numeric fields are not crossed.'
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
    wide = FeaturesLinear(self.field_dims, **fields)(*inputs)  # [B]
    if self.cross_fields:
      wide = wide + CrossProductLinear(
        self.field_dims,
        tuple(tuple(c) for c in self.cross_fields),
        self.cross_buckets,
        dtype=self.dtype,
      )(ids)  # [B]
    # Its rows feed the MLP alone: gathered apart (take_rows).
    e = FeaturesEmbedding(
      self.field_dims, self.embed_dim, **fields, apart=True
    )(*inputs)  # [B, T, D]
    deep = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=self.dropout,
      axis_name=self.axis_name,
      linear_init=self.linear_init,
      dtype=self.dtype,
    )(jax.lax.collapse(e, 1), train=train)  # [B, T * D] -> [B]
    return (wide + deep).astype(jnp.float32)


Model = WideAndDeep
