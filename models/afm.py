"""Attentional Factorization Machine (AFM).

Jun Xiao, Hao Ye, Xiangnan He, Hanwang Zhang, Fei Wu, Tat-Seng Chua.
"Attentional Factorization Machines: Learning the Weight of Feature
Interactions via Attention Networks". International Joint Conference on
Artificial Intelligence (IJCAI), 2017. https://arxiv.org/abs/1708.04617

FM whose pairwise interactions are weighted by an attention network. With one
active (one-hot) id `x_f` per field and its embedding `v_f`, the paper's
eq. (4)-(5) read

  y(x)  = w_0 + sum_f w_{x_f} + p^T sum_{f < g} a_{fg} (v_f * v_g),
  a'_fg = h^T ReLU(W (v_f * v_g) + b),    a_fg = softmax_{(f, g)}(a'_fg),

where `*` is the element-wise product, W `[dim, attn]`, b `[attn]`, h
`[attn]` and p `[dim]`. Dropout (section 3.4) applies to the attention
weights `a` and to the pooled vector `sum a (v_f * v_g)` `[batch, dim]`, as
in the authors' code and pytorch-fm; the paper's L2 penalty on the attention
weights, `attn_l2 * ||W||^2`, is sown into the `losses` collection during
training when `attn_l2 > 0` (the trainer adds it to the loss). Inputs are
per-field ids `[batch, fields]` (int32, field `f` in `[0, field_dims[f])`);
the output is the logit `[batch]` (float32). The sigmoid belongs to the loss.

Differences from pytorch-fm (torchfm 0.7.0,
`AttentionalFactorizationMachineModel`):
  * Dropout acts only when `train=True`. pytorch-fm calls `F.dropout`
    without `training=self.training`, so its dropout stays on in `eval()`
    mode and its evaluation outputs are random (the parity fixture records
    two such outputs that differ from each other).
  * The score projection h has no bias, as in the paper: pytorch-fm's bias
    adds the same number to every pair's score, which the softmax cancels, so
    it never gets a gradient. The output projection p has no bias either: it
    would duplicate `w_0`. (The parity test folds pytorch-fm's output bias
    into `w_0` and drops its score bias.)
  * The paper's attention L2 penalty is available (`attn_l2`, off by
    default: the authors tuned it per data set; pytorch-fm has none).
  * The linear weights start at zero. pytorch-fm keeps `nn.Embedding`'s
    N(0, 1) initialisation, a large random per-id bias that the optimiser
    must first unlearn (it holds ml-latest-small's test AUC near 0.55).
  * The model returns logits; pytorch-fm returns probabilities.

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


class AttentionalFactorizationMachine(nn.Module):
  """Attention-pooled pairwise term `p^T sum_{f<g} a_fg (v_f * v_g)`.

  Attributes:
    attn_size: hidden size of the attention network (the paper's t).
    dropouts: dropout rates of the attention weights `a` and of the pooled
      vector.
    attn_l2: weight of the L2 penalty `||W||^2` on the attention network,
      sown as `attention_l2` into the `losses` collection during training;
      0 turns it off.
    dtype: dtype of the computation.
  """

  attn_size: int
  dropouts: Sequence[float] = (0.0, 0.0)
  attn_l2: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, v: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Maps embeddings `[batch, fields, dim]` to the logit term `[batch]`."""
    first, second = np.triu_indices(v.shape[1], k=1)  # [P], P = F(F-1)/2
    pairs = v[:, first] * v[:, second]  # [B, P, D]
    attention = nn.Dense(self.attn_size, dtype=self.dtype, name='attention')
    hidden = nn.relu(attention(pairs))  # [B, P, A]
    scores = nn.Dense(1, use_bias=False, dtype=self.dtype, name='projection')(
      hidden
    )[..., 0]  # [B, P]
    a = nn.softmax(scores, axis=1)  # [B, P]
    a = nn.Dropout(self.dropouts[0], deterministic=not train)(a)
    pooled = jnp.sum(a[..., None] * pairs, axis=1)  # [B, D]
    pooled = nn.Dropout(self.dropouts[1], deterministic=not train)(pooled)
    if train and self.attn_l2 > 0:
      kernel = attention.variables['params']['kernel']
      self.sow('losses', 'attention_l2', self.attn_l2 * jnp.sum(kernel**2))
    return nn.Dense(1, use_bias=False, dtype=self.dtype, name='fc')(pooled)[
      :, 0
    ]  # [B]


class AttentionalFactorizationMachineModel(nn.Module):
  """AFM: `y = w_0 + sum_f w_{x_f} + p^T sum_{f<g} a_fg (v_f * v_g)`.

  Attributes:
    field_dims: number of ids of each field.
    embed_dim: size k of the embeddings v.
    attn_size: hidden size of the attention network.
    dropouts: dropout rates of the attention weights and the pooled vector.
    attn_l2: weight of the paper's L2 penalty on the attention network's W
      (added to the training loss through the `losses` collection); 0 = off.
    axis_name: unused (AFM has no BatchNorm); kept for the common signature.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  embed_dim: int = 16
  attn_size: int = 16
  dropouts: Sequence[float] = (0.2, 0.2)
  attn_l2: float = 0.0
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    linear = FeaturesLinear(self.field_dims, dtype=self.dtype)(ids)  # [B]
    v = FeaturesEmbedding(self.field_dims, self.embed_dim, dtype=self.dtype)(
      ids
    )  # [B, F, D]
    pairwise = AttentionalFactorizationMachine(
      self.attn_size,
      dropouts=tuple(self.dropouts),
      attn_l2=self.attn_l2,
      dtype=self.dtype,
    )(v, train=train)  # [B]
    return (linear + pairwise).astype(jnp.float32)


Model = AttentionalFactorizationMachineModel
