"""Neural Collaborative Filtering: NeuMF, the fusion of GMF and MLP.

Xiangnan He, Lizi Liao, Hanwang Zhang, Liqiang Nie, Xia Hu and Tat-Seng Chua.
"Neural Collaborative Filtering". International World Wide Web Conference
(WWW), 2017. https://arxiv.org/abs/1708.05031

Two towers read the same user and item. Generalized Matrix Factorization
(GMF, the paper's section 3.2) multiplies the user and item embeddings
elementwise; the MLP tower (section 3.3) runs hidden layers over the
concatenated embeddings. NeuMF (section 3.4) gives each tower its own
embeddings and joins them in one prediction layer:

  phi_GMF = p_u * q_i                                  `[dim]`,
  phi_MLP = MLP([e_1; e_2; ...; e_F])                  `[mlp_dims[-1]]`,
  y(x)    = h^T [phi_GMF; phi_MLP] + b,

where `p_u`, `q_i` are the GMF embeddings of the ids of the user and item
fields (`user_field_idx`, `item_field_idx`), `e_f` the MLP embedding of the id
of field `f` (on MovieLens, user and item: the paper's `[p_u^M; q_i^M]`), and
each hidden layer is Linear -> BatchNorm -> ReLU -> Dropout.

Inputs are per-field ids `[batch, fields]` (int32, field `f` in
`[0, field_dims[f])`); the output is the logit y(x) `[batch]` (float32). The
sigmoid belongs to the loss. The user and item field indices are
hyper-parameters (`config.model.user_field_idx`, `config.model.item_field_idx`;
0 and 1 on MovieLens): a dataset without such fields cannot run NCF, and
indices that do not name two different fields raise an error naming those
keys.

Differences from pytorch-fm (torchfm 0.7.0, `NeuralCollaborativeFiltering`):
  * GMF and MLP learn separate embeddings, as the paper's NeuMF does ("we
    allow GMF and MLP to learn separate embeddings", section 3.4): sharing
    one table forces both towers to one embedding size and, the paper
    argues, limits the fused model. pytorch-fm feeds both towers from one
    table; `shared_embedding=True` reproduces that (tests/test_parity.py
    checks it against pytorch-fm). The GMF table holds only the user and
    item fields, the only ones GMF reads.
  * The field indices are ints, checked at construction, instead of index
    arrays read without a check.
  * The model returns logits; pytorch-fm returns probabilities.
  * The hidden layers use Flax's default initialisers (LeCun normal kernels,
    zero biases), not torch's uniform ones.

Differences from the paper, kept from pytorch-fm: the MLP tower carries
BatchNorm and dropout (the paper's is plain ReLU), reads the embeddings of
every field (the paper has only user and item), and the prediction layer has
a bias; embeddings are xavier-uniform instead of N(0, 0.01); training is
pointwise log loss on the dataset's labels (MovieLens: rating > 3) instead of
the paper's implicit feedback with sampled negatives; and there is no
pre-training of the towers as separate GMF and MLP models (the paper's
section 3.4.1; it reports NeuMF without pre-training too).

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


class NeuralCollaborativeFiltering(nn.Module):
  """NeuMF: `y = h^T [p_u * q_i; MLP([e_1; ...; e_F])] + b`.

  Attributes:
    field_dims: number of ids of each field.
    user_field_idx: index of the user field in `field_dims`.
    item_field_idx: index of the item field in `field_dims`.
    embed_dim: size of the GMF and MLP embeddings.
    mlp_dims: widths of the hidden layers of the MLP tower.
    dropout: dropout rate after each hidden layer.
    shared_embedding: feed both towers from one table (pytorch-fm) instead
      of the paper's separate GMF and MLP embeddings.
    axis_name: pmap axis over which BatchNorm statistics are averaged.
    dtype: dtype of the computation.
  """

  field_dims: Sequence[int]
  user_field_idx: int | None = None
  item_field_idx: int | None = None
  embed_dim: int = 16
  mlp_dims: Sequence[int] = (16, 16)
  dropout: float = 0.2
  shared_embedding: bool = False
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    num_fields = len(self.field_dims)
    indices = (self.user_field_idx, self.item_field_idx)
    valid = all(
      isinstance(i, (int, np.integer))
      and not isinstance(i, bool)
      and 0 <= i < num_fields
      for i in indices
    )
    if not valid or indices[0] == indices[1]:
      raise ValueError(
        'NCF needs a user field and an item field: set '
        'config.model.user_field_idx and config.model.item_field_idx to two '
        f'different field indices in [0, {num_fields}) (MovieLens: 0 and 1); '
        f'got user_field_idx={indices[0]!r}, item_field_idx={indices[1]!r} '
        f'for a dataset with {num_fields} fields.'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, ids: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Returns logits `[batch]` for ids `[batch, fields]`."""
    user, item = self.user_field_idx, self.item_field_idx
    e = FeaturesEmbedding(
      self.field_dims, self.embed_dim, dtype=self.dtype, name='embedding'
    )(ids)  # [B, F, D]
    if self.shared_embedding:
      p, q = e[:, user], e[:, item]  # [B, D], [B, D]
    else:
      pq = FeaturesEmbedding(
        (self.field_dims[user], self.field_dims[item]),
        self.embed_dim,
        dtype=self.dtype,
        name='gmf_embedding',
      )(ids[:, np.array([user, item])])  # [B, 2, D]
      p, q = pq[:, 0], pq[:, 1]  # [B, D], [B, D]
    gmf = p * q  # [B, D]
    mlp = MultiLayerPerceptron(
      self.mlp_dims,
      dropout=self.dropout,
      output_layer=False,
      axis_name=self.axis_name,
      dtype=self.dtype,
    )(e.reshape(e.shape[0], -1), train=train)  # [B, F * D] -> [B, H]
    fused = jnp.concatenate([gmf, mlp], axis=-1)  # [B, D + H]
    logits = nn.Dense(1, dtype=self.dtype, name='prediction')(fused)[:, 0]
    return logits.astype(jnp.float32)  # [B]


Model = NeuralCollaborativeFiltering
