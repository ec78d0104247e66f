"""Neural Factorization Machine (NFM).

Xiangnan He and Tat-Seng Chua. "Neural Factorization Machines for Sparse
Predictive Analytics". ACM SIGIR Conference on Research and Development in
Information Retrieval (SIGIR), 2017. https://arxiv.org/abs/1708.05027

With one active (one-hot) feature per field and `v_f` the embedding of the id
that field `f` takes, the model of the paper's section 3.1 reads

  y(x)      = w_0 + sum_f w_{x_f} + MLP(f_BI(V_x)),
  f_BI(V_x) = sum_{f < g} v_f * v_g
            = 1/2 [(sum_f v_f)^2 - sum_f v_f^2]   (elementwise, `[dim]`),

where the Bi-Interaction pooling f_BI is computed in O(fields * dim) with the
paper's rewriting on the second line, and MLP is the tower of hidden layers
followed by the prediction layer `h`. As in the paper (section 3.3) and its
authors' code, f_BI is followed by BatchNorm and dropout, and every hidden
layer is Linear -> BatchNorm -> ReLU -> Dropout.

Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`); the output is the logit y(x) `[batch]` (float32). The
sigmoid belongs to the loss.

Differences from pytorch-fm (torchfm 0.7.0, `NeuralFactorizationMachineModel`,
whose architecture this file matches layer for layer):
  * The linear weights start at zero instead of `nn.Embedding`'s N(0, 1),
    a large random per-id bias that the optimiser must first unlearn.
  * The model returns logits; pytorch-fm returns probabilities.
  * The hidden layers use Flax's default initialisers (LeCun normal kernels,
    zero biases), not torch's uniform ones.

Differences from the paper, kept from pytorch-fm: the prediction layer `h`
has a bias of its own next to `w_0` (the same function class; it keeps the
weights of a pytorch-fm model loadable one to one). The paper's optional
pre-training with FM embeddings is available through the trainer's warm
start: the embedding and linear term are named as in models/fm.py, so
`config.init_from=<workdir of an FM run with the same embed_dim>` copies them.

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


class FactorizationMachine(nn.Module):
  """Pairwise term `sum_{f<g} v_f * v_g` in O(fields * dim) (Rendle, 3.1).

  Attributes:
    reduce_sum: sum over the embedding dimension (`[batch]` out) or keep it
      (`[batch, dim]` out, the bi-interaction pooling of NFM).
  """

  reduce_sum: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps embeddings `[batch, fields, dim]` to `[batch]` or `[batch, dim]`."""
    square_of_sum = jnp.square(jnp.sum(x, axis=1))  # [B, D]
    sum_of_square = jnp.sum(jnp.square(x), axis=1)  # [B, D]
    interaction = 0.5 * (square_of_sum - sum_of_square)  # [B, D]
    if self.reduce_sum:
      return jnp.sum(interaction, axis=1)  # [B]
    return interaction


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


class NeuralFactorizationMachine(nn.Module):
  """NFM: `y = w_0 + sum_f w_{x_f} + MLP(Dropout(BN(f_BI(V_x))))`.

  Attributes:
    field_dims: number of ids of each field.
    embed_dim: size k of the embeddings v (and of f_BI).
    mlp_dims: widths of the hidden layers above the Bi-Interaction layer.
    dropouts: dropout rates after the Bi-Interaction layer and after each
      hidden layer.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  embed_dim: int = 64
  mlp_dims: Sequence[int] = (64,)
  dropouts: Sequence[float] = (0.2, 0.2)
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    bi_dropout, mlp_dropout = self.dropouts
    linear = FeaturesLinear(self.field_dims, dtype=self.dtype)(ids)  # [B]
    v = FeaturesEmbedding(self.field_dims, self.embed_dim, dtype=self.dtype)(
      ids
    )  # [B, F, D]
    bi = FactorizationMachine(reduce_sum=False)(v)  # [B, D]
    bi = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )(bi)
    bi = nn.Dropout(bi_dropout, deterministic=not train)(bi)
    deep = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=mlp_dropout,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )(bi, train=train)  # [B]
    return (linear + deep).astype(jnp.float32)


Model = NeuralFactorizationMachine
