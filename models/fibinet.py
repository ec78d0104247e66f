"""FiBiNET: feature importance (SENET) and bilinear feature interaction.

Tongwen Huang, Zhiqi Zhang and Junlin Zhang. "FiBiNET: Combining Feature
Importance and Bilinear feature Interaction for Click-Through Rate
Prediction". ACM Conference on Recommender Systems (RecSys), 2019.
https://arxiv.org/abs/1905.09433

With `e_f` the embedding `[dim]` of field `f` (F fields), a SENET layer
(section 3.3, eq. (1)-(4)) re-weights the fields by learned importances,

  z_f = mean_d e_{f,d},   a = s(W_2 r(W_1 z)),   v_f = a_f e_f,

with W_1 `[F / reduction_ratio, F]`, W_2 `[F, F / reduction_ratio]` (no
biases), r = ReLU and s = sigmoid by default (`excitation='relu'` gives the
paper's s = ReLU, FuxiCTR's default; see below). A bilinear layer (section
3.4, eq. (5)-(7)) crosses every pair of fields `f < g`,

  p_fg = (e_f W) * e_g       ('field_all': one W `[dim, dim]`),
  p_fg = (e_f W_f) * e_g     ('field_each': one W_f per field),
  p_fg = (e_f W_fg) * e_g    ('field_interaction': one W_fg per pair),

(`*` element-wise) on the embeddings (p) and on the SENET output (q, with
its own weights). The output (section 3.5-3.6) is a linear term plus an MLP
(Linear -> ReLU -> Dropout per hidden layer, then Linear to one unit) over
all pairs of both,

  y(x) = w_0 + sum_f w_{x_f} + MLP([p_12; ...; p_{F-1,F}; q_12; ...]).

Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`); the output is the logit y(x) `[batch]` (float32). The
sigmoid belongs to the loss.

Optional side inputs are more fields F of every term: a multi-hot field
(`multi_ids`, e.g. a movie's genres) adds the mean (or sum) of its ids'
weights and embeddings, a numeric field (`dense`) `w x` and `e x` for its
value `x`; SENET weighs and the bilinear layers cross all of them (at least
two fields in all).

pytorch-fm has no FiBiNET; the reference for the details the paper leaves
open is FuxiCTR (`FiBiNET`, `SqueezeExcitation`, `BilinearInteractionV2`):
separate bilinear weights for p and q, a reduced size of
`max(1, int(F / reduction_ratio))`, bilinear weights xavier-normal.
Differences from it:
  * The bilinear weights are xavier-normal per `[dim, dim]` matrix (fans
    dim and dim: std `sqrt(1 / dim)`, a truncated normal). For
    'field_each' and 'field_interaction' FuxiCTR's torch `xavier_normal_`
    takes its fans over the whole `[F, dim, dim]` or `[P, dim, dim]` tensor
    (fan-in `dim^2`, fan-out `F dim` or `P dim`, P pairs): a std smaller by
    `sqrt((dim + F) / 2)` or `sqrt((dim + P) / 2)`. With that smaller
    start and Flax's initialisers elsewhere, the products stayed small and
    the model scored as LR on MovieLens for every seed tried; with this
    one, half of them learned the interactions.
  * 'field_each' keeps F - 1 matrices: the last field's is never used (only
    pairs `f < g` exist), and FuxiCTR's F-th matrix gets no gradient.
  * The excitation s is a sigmoid by default, as in the squeeze-and-
    excitation networks SENET comes from (Hu et al., CVPR 2018); FuxiCTR's
    default is a ReLU. Under a ReLU, a field whose row of W_2 gives a
    negative sum for every example gets a_f = 0 and with it no gradient:
    its pairs in q stay zero, and W_1, W_2 and q's bilinear weights never
    train. On two fields (one squeezed unit, r(W_1 z) >= 0) this happens at
    initialisation whenever an entry of W_2 is negative, 3 times in 4. A
    sigmoid weight stays in (0, 1) and always passes a gradient.
  * The linear term has its bias `w_0`, and the SENET and MLP layers use
    Flax's default initialisers (LeCun normal kernels, zero biases) or,
    with `linear_init='torch'`, torch.nn.Linear's (uniform in
    `±1/sqrt(fan_in)`); FuxiCTR's are xavier-normal, with zero biases.

The MLP has no BatchNorm, as the paper and FuxiCTR's configs, unlike the
other MLPs of this library (pytorch-fm's Linear -> BatchNorm -> ReLU ->
Dropout, the shared `MultiLayerPerceptron`): the bilinear features are
products of two embeddings, whose variance starts far below BatchNorm's
epsilon, so the first layer's running statistics trail the fast-moving batch
statistics and evaluation-mode outputs drift away from training-mode ones
within a few epochs.

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


class DeepNetwork(nn.Module):
  """Linear -> ReLU -> Dropout per hidden layer, then Linear to one unit.

  The shared `MultiLayerPerceptron` of the other model files without its
  BatchNorm (see the module docstring).

  Attributes:
    hidden_dims: widths of the hidden layers.
    dropout: dropout rate after each hidden layer.
    linear_init: initialisers of the Dense layers, 'lecun' (Flax's
      default) or 'torch' (torch.nn.Linear's).
    dtype: dtype of the computation.
  """

  hidden_dims: Sequence[int]
  dropout: float = 0.0
  linear_init: str = 'lecun'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Maps `[batch, features]` to `[batch]`."""
    for width in self.hidden_dims:
      init = linear_initializers(self.linear_init, x.shape[-1])
      x = nn.relu(nn.Dense(width, dtype=self.dtype, **init)(x))  # [B, H]
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    init = linear_initializers(self.linear_init, x.shape[-1])
    return nn.Dense(1, dtype=self.dtype, **init)(x)[:, 0]  # [B]


class SqueezeExcitation(nn.Module):
  """SENET: `v_f = a_f e_f` with `a = s(W_2 ReLU(W_1 mean_d e))`.

  Attributes:
    reduction_ratio: the squeezed width is `max(1, int(fields / ratio))`.
    excitation: the output activation s, 'sigmoid' or 'relu' (the
      paper's; a field can lose its weight for good, see the module
      docstring).
    linear_init: initialisers of W_1 and W_2, 'lecun' (Flax's default) or
      'torch' (torch.nn.Linear's).
    dtype: dtype of the computation.
  """

  reduction_ratio: float = 3.0
  excitation: str = 'sigmoid'
  linear_init: str = 'lecun'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, e: jnp.ndarray) -> jnp.ndarray:
    """Maps embeddings `[batch, fields, dim]` to `[batch, fields, dim]`."""
    if self.excitation not in ('relu', 'sigmoid'):
      raise ValueError(
        f"excitation must be 'relu' or 'sigmoid', got {self.excitation!r}."
      )
    num_fields = e.shape[1]
    reduced = max(1, int(num_fields / self.reduction_ratio))
    z = jnp.mean(e, axis=-1)  # [B, T]
    dense = lambda width, fan_in: nn.Dense(
      width,
      use_bias=False,
      dtype=self.dtype,
      **linear_initializers(self.linear_init, fan_in),
    )
    a = nn.relu(dense(reduced, num_fields)(z))  # [B, T / ratio]
    a = dense(num_fields, reduced)(a)  # [B, T]
    a = nn.relu(a) if self.excitation == 'relu' else nn.sigmoid(a)
    return e * a[:, :, None]


class BilinearInteraction(nn.Module):
  """Pairs `p_fg = (e_f W) * e_g` for all `f < g`.

  Attributes:
    bilinear_type: 'field_all', 'field_each' or 'field_interaction'.
    dtype: dtype of the computation.
  """

  bilinear_type: str = 'field_interaction'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, e: jnp.ndarray) -> jnp.ndarray:
    """Maps embeddings `[batch, fields, dim]` to `[batch, pairs, dim]`."""
    num_fields, dim = e.shape[1], e.shape[2]
    first, second = np.triu_indices(num_fields, k=1)  # [P], P = F(F-1)/2
    # xavier-normal over each [dim, dim] matrix, not FuxiCTR's whole tensor
    # (module docstring).
    init = nn.initializers.xavier_normal(batch_axis=(0,))
    if self.bilinear_type == 'field_all':
      w = self.param('weight', nn.initializers.xavier_normal(), (dim, dim))
      w = jnp.broadcast_to(w, (first.size, dim, dim))  # [P, D, D]
    elif self.bilinear_type == 'field_each':
      w = self.param('weight', init, (num_fields - 1, dim, dim))
      w = w[first]  # [P, D, D]
    elif self.bilinear_type == 'field_interaction':
      w = self.param('weight', init, (first.size, dim, dim))  # [P, D, D]
    else:
      raise ValueError(
        "bilinear_type must be 'field_all', 'field_each' or"
        f" 'field_interaction', got {self.bilinear_type!r}."
      )
    left = jnp.einsum('bpc,pcd->bpd', e[:, first], w.astype(self.dtype))
    return left * e[:, second]  # [B, P, D]


class FiBiNET(nn.Module):
  """FiBiNET: `y = w_0 + sum_f w_{x_f} + MLP([p; q])`, pairs of E and SENET(E).

  Attributes:
    field_dims: number of ids of each one-hot field.
    multi_field_dims: number of ids of each multi-hot field.
    num_dense: number of numeric fields.
    multi_pooling: 'mean' or 'sum' over a multi-hot field's ids.
    embed_dim: embedding size.
    mlp_dims: widths of the hidden layers.
    dropout: dropout rate after each hidden layer.
    reduction_ratio: SENET's reduction ratio.
    excitation: SENET's output activation, 'sigmoid' or 'relu'.
    bilinear_type: 'field_all', 'field_each' or 'field_interaction'.
    axis_name: unused (FiBiNET has no BatchNorm); kept for the common
      signature.
    linear_init: initialisers of the SENET and MLP layers, 'lecun' (Flax's
      default) or 'torch' (torch.nn.Linear's).
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  multi_field_dims: Sequence[int] = ()
  num_dense: int = 0
  multi_pooling: str = 'mean'
  embed_dim: int = 16
  mlp_dims: Sequence[int] = (500, 500, 500)
  dropout: float = 0.0
  reduction_ratio: float = 3.0
  excitation: str = 'sigmoid'
  bilinear_type: str = 'field_interaction'
  axis_name: str | None = None
  linear_init: str = 'lecun'
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
      train: dropout in training mode.
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
    if e.shape[1] < 2:
      raise ValueError('FiBiNET needs at least two fields to cross.')
    v = SqueezeExcitation(
      self.reduction_ratio,
      excitation=self.excitation,
      linear_init=self.linear_init,
      dtype=self.dtype,
    )(e)  # [B, T, D]
    bilinear = lambda: BilinearInteraction(self.bilinear_type, dtype=self.dtype)
    p = bilinear()(e)  # [B, P, D]
    q = bilinear()(v)  # [B, P, D]
    pairs = jnp.concatenate([p, q], axis=1)  # [B, 2P, D]
    deep = DeepNetwork(
      self.mlp_dims,
      dropout=self.dropout,
      linear_init=self.linear_init,
      dtype=self.dtype,
    )(jax.lax.collapse(pairs, 1), train=train)  # [B, 2P * D] -> [B]
    return (linear + deep).astype(jnp.float32)


Model = FiBiNET
