"""Field-aware Neural Factorization Machine (FNFM).

Li Zhang, Weichen Shen, Shijian Li and Gang Pan. "Field-aware Neural
Factorization Machine for Click-Through Rate Prediction". IEEE Access, 2019.
https://arxiv.org/abs/1902.09096

NFM (He & Chua, SIGIR 2017) with the field-aware factors of FFM (Juan et al.,
RecSys 2016) and the sum pooling of its Bi-Interaction layer replaced by a
concatenation, so that no pair's information is pooled away. Every id has one
vector per field it can meet: `v_{x_f, g}` is the vector of the id of field
`f` used against field `g`. With one active (one-hot) feature per field the
model reads

  y(x) = w_0 + sum_f w_{x_f} + MLP(Dropout(BN(z))),
  z    = [v_{x_1, 2} * v_{x_2, 1}; v_{x_1, 3} * v_{x_3, 1}; ...;
          v_{x_{F-1}, F} * v_{x_F, F-1}],

the "Bi-Interaction Concatenation" layer z `[fields (fields - 1) / 2 * dim]`
(elementwise products of every field pair f < g, in that order), followed by
the paper's normalisation layer (BatchNorm), dropout, and a tower of hidden
layers (Linear -> BatchNorm -> ReLU -> Dropout) ending in a Linear layer to
one unit.

Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`, at least two fields); the output is the logit y(x)
`[batch]` (float32). The sigmoid belongs to the loss.

Differences from pytorch-fm (torchfm 0.7.0,
`FieldAwareNeuralFactorizationMachineModel`, whose architecture this file
matches layer for layer):
  * The linear weights start at zero instead of `nn.Embedding`'s N(0, 1),
    a large random per-id bias that the optimiser must first unlearn.
  * pytorch-fm keeps `fields` tables of `[ids, dim]`; they are stored here as
    one array `[ids, fields, dim]` (`FieldAwareEmbedding`, the same block as
    models/ffm.py's), each `[ids, dim]` slice xavier-uniform as pytorch-fm's
    tables are. The math is the same, and an FFM run with the same
    `embed_dim` can warm-start this model through `config.init_from`.
  * The model returns logits; pytorch-fm returns probabilities.
  * The hidden layers use Flax's default initialisers (LeCun normal kernels,
    zero biases), not torch's uniform ones.

Like pytorch-fm, the model keeps NFM's linear term `w_0 + sum_f w_{x_f}` and
its dropout after the normalised interaction layer. The shape bug reported
against pytorch-fm's FNFM (its GitHub issue 9: outputs of shape
`[batch, batch]`) was fixed before torchfm 0.7.0; tests/test_parity.py checks
this file against 0.7.0's eval-mode outputs, and tests/test_models_b.py the
interaction layer against a loop over field pairs.

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
    return jnp.sum(w, axis=(1, 2)) + bias.astype(self.dtype)[0]


class FieldAwareEmbedding(nn.Module):
  """Field-aware factors `v_{x_f, g}` of every id against every field.

  The table is `[ids, fields, dim]`; its slice `[:, g]` is the vectors used
  against field `g`, xavier-uniform initialised as one `[ids, dim]` table.

  Attributes:
    field_dims: number of ids of each field.
    embed_dim: size k of each factor.
    dtype: dtype of the returned factors.
  """

  field_dims: Sequence[int]
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    """Maps ids `[batch, fields]` to `[batch, fields, fields, dim]`.

    Entry `[b, f, g]` is `v_{x_f, g}`: the vector of the id of field `f`
    used against field `g`.
    """
    num_fields = len(self.field_dims)
    table = self.param(
      'embedding',
      nn.initializers.xavier_uniform(in_axis=0, out_axis=2, batch_axis=(1,)),
      (sum(self.field_dims), num_fields, self.embed_dim),
    )
    rows = ids + field_offsets(self.field_dims)  # [B, F]
    return jnp.take(table, rows, axis=0).astype(self.dtype)


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


class FieldAwareBiInteraction(nn.Module):
  """Bi-Interaction Concatenation: `[v_{x_f, g} * v_{x_g, f}]` over `f < g`."""

  @nn.compact
  def __call__(self, v: jnp.ndarray) -> jnp.ndarray:
    """Maps `[batch, fields, fields, dim]` to `[batch, pairs * dim]`.

    Args:
      v: field-aware factors; entry `[b, f, g]` is `v_{x_f, g}`.

    Returns:
      The products of the field pairs `f < g` in row-major order, each
      `[dim]`, concatenated.
    """
    f, g = np.triu_indices(v.shape[1], k=1)  # [P], [P]
    products = v[:, f, g] * v[:, g, f]  # [B, P, D]
    return products.reshape(v.shape[0], -1)  # [B, P * D]


class FieldAwareNeuralFactorizationMachine(nn.Module):
  """FNFM: `y = w_0 + sum_f w_{x_f} + MLP(Dropout(BN(z)))`.

  Attributes:
    field_dims: number of ids of each field (at least two fields).
    embed_dim: size k of each field-aware factor.
    mlp_dims: widths of the hidden layers above the interaction layer.
    dropouts: dropout rates after the interaction layer and after each
      hidden layer.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  embed_dim: int = 4
  mlp_dims: Sequence[int] = (64,)
  dropouts: Sequence[float] = (0.2, 0.2)
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    if len(self.field_dims) < 2:
      raise ValueError(
        'FNFM interacts pairs of fields and needs at least two fields; got '
        f'field_dims={tuple(self.field_dims)}.'
      )
    pair_dropout, mlp_dropout = self.dropouts
    linear = FeaturesLinear(self.field_dims, dtype=self.dtype)(ids)  # [B]
    v = FieldAwareEmbedding(self.field_dims, self.embed_dim, dtype=self.dtype)(
      ids
    )  # [B, F, F, D]
    z = FieldAwareBiInteraction()(v)  # [B, P * D]
    z = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )(z)
    z = nn.Dropout(pair_dropout, deterministic=not train)(z)
    deep = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=mlp_dropout,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )(z, train=train)  # [B]
    return (linear + deep).astype(jnp.float32)


Model = FieldAwareNeuralFactorizationMachine
