"""Logistic regression (LR) over one-hot fields.

The baseline of CTR prediction, e.g. H. Brendan McMahan et al. "Ad Click
Prediction: a View from the Trenches". KDD 2013.
https://doi.org/10.1145/2487575.2488200

With one active feature per field,

  y(x) = w_0 + sum_f w_{x_f},

where `w_{x_f}` is the weight of the id that field `f` takes. Inputs are
per-field ids `[batch, fields]` (int32); the output is the logit `[batch]`
(float32). The sigmoid belongs to the loss.

Differences from pytorch-fm (torchfm 0.7.0, `LogisticRegressionModel`):
  * The weights start at zero instead of `nn.Embedding`'s N(0, 1), which
    holds pytorch-fm's LR near AUC 0.52 on ml-latest-small for several
    epochs.
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


class LogisticRegression(nn.Module):
  """LR: `y = w_0 + sum_f w_{x_f}`.

  Attributes:
    field_dims: number of ids of each field.
    axis_name: unused (LR has no BatchNorm); kept for the common signature.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    del train  # LR has neither dropout nor BatchNorm.
    return FeaturesLinear(self.field_dims, dtype=self.dtype)(ids).astype(
      jnp.float32
    )


Model = LogisticRegression
