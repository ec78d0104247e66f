"""Factorisation-machine supported Neural Network (FNN).

Weinan Zhang, Tianming Du, Jun Wang. "Deep Learning over Multi-field
Categorical Data: A Case Study on User Response Prediction". European
Conference on Information Retrieval (ECIR), 2016.
https://arxiv.org/abs/1601.02376

An MLP over the per-field FM parameters of the active ids. With one active
(one-hot) id `x_f` per field, the paper's dense layer (eq. 2-3) holds, per
field, the FM linear weight and factor of that id,

  z_f = (w_{x_f}, v_{x_f}) in R^{1 + k},    z = (z_1, ..., z_F),

and the network is `y = MLP(z)` (eq. 1: hidden layers, then one output unit).
The paper initialises `w` and `v` from a trained FM (section 3.1) and then
fine-tunes everything with back-propagation. Here that pre-training is the
trainer's warm start: train `configs/fm.py`, then this model with
`--config.init_from=<fm workdir>`; the parameters `FeaturesEmbedding_0` (v)
and `FeaturesLinear_0` (w) have the names and shapes of models/fm.py when
`embed_dim` matches, so they are copied.

Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`); the output is the logit `[batch]` (float32). The sigmoid
belongs to the loss.

Differences from pytorch-fm (torchfm 0.7.0,
`FactorizationSupportedNeuralNetworkModel`):
  * FM pre-training (above) is available; pytorch-fm has none, so its FNN is
    a plain embedding + MLP network.
  * `fm_linear_inputs=True` (the default) feeds each field's FM linear
    weight `w_{x_f}` next to its factor, as the paper's `z_f`; pytorch-fm
    feeds the factors alone, which `fm_linear_inputs=False` reproduces
    exactly (the parity test uses it).
  * The model returns logits; pytorch-fm returns probabilities.

Differences from the paper, shared with pytorch-fm:
  * The paper's `z` also starts with the FM bias `w_0`. It is the same for
    every example, so its product with the first layer's weights only adds a
    constant that that layer's bias already provides (and BatchNorm removes):
    it is left out.
  * The hidden layers are the shared Linear -> BatchNorm -> ReLU -> Dropout
    block of pytorch-fm instead of the paper's tanh layers without
    BatchNorm; BatchNorm also puts FM-trained inputs of any scale into the
    range the ReLU layers expect.

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


class FieldLinearWeights(nn.Module):
  """FM linear weights `w_{x_f}` of the active ids, one per field.

  Holds the same parameter (`weight`, `[ids, 1]`, zero-initialised) as the
  `FeaturesLinear` block of models/fm.py, so an FM checkpoint fills it, but
  returns the weights per field instead of their sum.

  Attributes:
    field_dims: number of ids of each field.
    dtype: dtype of the returned weights.
  """

  field_dims: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
    """Maps ids `[batch, fields]` to weights `[batch, fields, 1]`."""
    weight = self.param(
      'weight', nn.initializers.zeros, (sum(self.field_dims), 1)
    )
    rows = ids + field_offsets(self.field_dims)  # [B, F]
    return jnp.take(weight, rows, axis=0).astype(self.dtype)  # [B, F, 1]


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


class FactorizationSupportedNeuralNetwork(nn.Module):
  """FNN: `y = MLP(z)`, `z_f = (w_{x_f}, v_{x_f})` from FM parameters.

  Attributes:
    field_dims: number of ids of each field.
    embed_dim: size k of the FM factors v.
    mlp_dims: widths of the hidden layers.
    dropout: dropout rate after each hidden layer.
    fm_linear_inputs: also feed the FM linear weight of each field (the
      paper); False feeds the factors alone (pytorch-fm).
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  embed_dim: int = 16
  mlp_dims: Sequence[int] = (16, 16)
  dropout: float = 0.2
  fm_linear_inputs: bool = True
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    z = FeaturesEmbedding(self.field_dims, self.embed_dim, dtype=self.dtype)(
      ids
    )  # [B, F, D]
    if self.fm_linear_inputs:
      # Named as models/fm.py's linear block, so FM pre-training fills it.
      w = FieldLinearWeights(
        self.field_dims, dtype=self.dtype, name='FeaturesLinear_0'
      )(ids)  # [B, F, 1]
      z = jnp.concatenate([w, z], axis=-1)  # [B, F, 1 + D]
    z = z.reshape(z.shape[0], -1)  # [B, F * (1 + D)] or [B, F * D]
    y = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=self.dropout,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )(z, train=train)  # [B]
    return y.astype(jnp.float32)


Model = FactorizationSupportedNeuralNetwork
