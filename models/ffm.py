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
    return jnp.take(table, rows, axis=0).astype(self.dtype)  # [B, F, F, D]


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

  Attributes:
    field_dims: number of ids of each field.
    embed_dim: size k of each field-aware factor.
    axis_name: unused (FFM has no BatchNorm); kept for the common signature.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  embed_dim: int = 4
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    del train  # FFM has neither dropout nor BatchNorm.
    linear = FeaturesLinear(self.field_dims, dtype=self.dtype)(ids)  # [B]
    v = FieldAwareEmbedding(self.field_dims, self.embed_dim, dtype=self.dtype)(
      ids
    )  # [B, F, F, D]
    pairwise = FieldAwareFactorizationMachine()(v)  # [B]
    return (linear + pairwise).astype(jnp.float32)


Model = FieldAwareFactorizationMachineModel
