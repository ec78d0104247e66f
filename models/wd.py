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

Differences from pytorch-fm (torchfm 0.7.0, `WideAndDeepModel`):
  * The paper's cross-product features are available: `cross_fields` lists
    pairs of field indices, each adding the weight of the active id pair to
    the wide part. A pair `(f, g)` gets `min(field_dims[f] * field_dims[g],
    cross_buckets)` weights and the pair index `x_f * field_dims[g] + x_g`
    (uint32, so wrapping for huge tables) modulo that size: exact when the
    product fits, hashed (colliding) beyond. pytorch-fm has no crosses; the
    default `cross_fields=()` reproduces it exactly (the parity test uses
    it). On MovieLens (user, movie) the only cross is user x movie, whose
    pairs each occur once: a test pair's weight was never trained (or,
    hashed, belongs to other pairs), so the config keeps crosses off.
  * The linear weights start at zero. pytorch-fm keeps `nn.Embedding`'s
    N(0, 1) initialisation, a large random per-id bias that the optimiser
    must first unlearn.
  * The model returns logits; pytorch-fm returns probabilities.

Differences from the paper, shared with pytorch-fm: only pairwise crosses
(the paper allows any conjunction); one optimiser for both parts (the paper
trains the wide part with FTRL and L1, the deep part with AdaGrad); the deep
part is the shared Linear -> BatchNorm -> ReLU -> Dropout block with
pytorch-fm's sizes (the paper: 32-dim embeddings, ReLU layers 1024-512-256,
no BatchNorm).

This file is self-contained on purpose: it imports only jax, flax and numpy,
so it can be copied alone into another project.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def field_offsets(field_dims: Sequence[int]) -> np.ndarray:
  """Start row of each field in the shared table: `[fields]` int32."""
  return np.concatenate([[0], np.cumsum(field_dims)[:-1]]).astype(np.int32)


class FeaturesLinear(nn.Module):
  """Linear term `w_0 + sum_f w_{x_f}` over one-hot fields.

  Attributes:
    field_dims: number of ids of each field.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    """Maps ids `[batch, fields]` to the linear logit `[batch]`."""
    weight = self.param(
      'weight', nn.initializers.zeros, (sum(self.field_dims), 1)
    )
    bias = self.param('bias', nn.initializers.zeros, (1,))
    rows = ids + field_offsets(self.field_dims)  # [B, F]
    w = jnp.take(weight, rows, axis=0).astype(self.dtype)  # [B, F, 1]
    return jnp.sum(w, axis=(1, 2)) + bias.astype(self.dtype)[0]  # [B]


class FeaturesEmbedding(nn.Module):
  """One shared embedding table for all fields, xavier-uniform initialised.

  Attributes:
    field_dims: number of ids of each field.
    embed_dim: embedding size.
    dtype: dtype of the returned embeddings.
  """

  field_dims: Sequence[int]
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    """Maps ids `[batch, fields]` to embeddings `[batch, fields, dim]`."""
    table = self.param(
      'embedding',
      nn.initializers.xavier_uniform(),
      (sum(self.field_dims), self.embed_dim),
    )
    rows = ids + field_offsets(self.field_dims)  # [B, F]
    return jnp.take(table, rows, axis=0).astype(self.dtype)  # [B, F, D]


class MultiLayerPerceptron(nn.Module):
  """Linear -> BatchNorm -> ReLU -> Dropout per hidden layer, then Linear.

  Attributes:
    hidden_dims: widths of the hidden layers.
    dropout: dropout rate after each hidden layer.
    output_layer: end with a Linear layer to one unit (`[batch]` out);
      otherwise return the last hidden layer `[batch, hidden_dims[-1]]`.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    dtype: dtype of the computation.
  """

  hidden_dims: Sequence[int]
  dropout: float = 0.0
  output_layer: bool = True
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Maps `[batch, features]` to `[batch]` (or `[batch, hidden]`)."""
    for width in self.hidden_dims:
      x = nn.Dense(width, dtype=self.dtype)(x)  # [B, H]
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
      x = nn.Dense(1, dtype=self.dtype)(x)[:, 0]  # [B]
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
    weight = self.param('weight', nn.initializers.zeros, (int(sizes.sum()), 1))
    # uint32 arithmetic wraps instead of overflowing for huge fields.
    pair = ids[:, first].astype(jnp.uint32) * second_dims + ids[
      :, second
    ].astype(jnp.uint32)  # [B, C]
    buckets = (pair % sizes.astype(np.uint32)).astype(jnp.int32)  # [B, C]
    rows = buckets + starts  # [B, C]
    w = jnp.take(weight, rows, axis=0).astype(self.dtype)  # [B, C, 1]
    return jnp.sum(w, axis=(1, 2))  # [B]


class WideAndDeep(nn.Module):
  """Wide & Deep: `y = w_0 + sum_f w_{x_f} [+ crosses] + MLP(concat_f e_f)`.

  Attributes:
    field_dims: number of ids of each field.
    embed_dim: size of the deep part's embeddings.
    mlp_dims: widths of the hidden layers of the deep part.
    dropout: dropout rate after each hidden layer.
    cross_fields: pairs `(f, g)` of field indices whose cross product joins
      the wide part; empty (the default) as pytorch-fm.
    cross_buckets: most weights per cross; bigger crosses are hashed.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  embed_dim: int = 16
  mlp_dims: Sequence[int] = (16, 16)
  dropout: float = 0.2
  cross_fields: Sequence[tuple[int, int]] = ()
  cross_buckets: int = 2**17
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    wide = FeaturesLinear(self.field_dims, dtype=self.dtype)(ids)  # [B]
    if self.cross_fields:
      wide = wide + CrossProductLinear(
        self.field_dims,
        tuple(tuple(c) for c in self.cross_fields),
        self.cross_buckets,
        dtype=self.dtype,
      )(ids)  # [B]
    e = FeaturesEmbedding(self.field_dims, self.embed_dim, dtype=self.dtype)(
      ids
    )  # [B, F, D]
    deep = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=self.dropout,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )(e.reshape(e.shape[0], -1), train=train)  # [B]
    return (wide + deep).astype(jnp.float32)


Model = WideAndDeep
