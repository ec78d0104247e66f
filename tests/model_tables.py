"""Per-model tables for the model tests: every file in models/ needs an entry.

A new model file adds one line to each table below; the contract tests
(tests/test_model_contract.py) fail for a model without its entries.
"""

import importlib

import jax
import numpy as np

import models

MODEL_NAMES = models.names()

FIELD_DIMS = (7, 11, 5)
BATCH = 6

# Constructor arguments used by the contract tests: small, but every layer
# (dropout, BatchNorm, attention) present.
TEST_KWARGS = {
  'lr': {},
  'fm': {'embed_dim': 4},
  'ffm': {'embed_dim': 4},
  'fnn': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropout': 0.2},
  'wd': {
    'embed_dim': 4,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
    'cross_fields': ((0, 1),),
    'cross_buckets': 50,
  },
  'afm': {'embed_dim': 4, 'attn_size': 3, 'dropouts': (0.2, 0.2)},
  'nfm': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropouts': (0.2, 0.2)},
  'ncf': {
    'user_field_idx': 0,
    'item_field_idx': 1,
    'embed_dim': 4,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
  },
  'fnfm': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropouts': (0.2, 0.2)},
  'deepfm': {'embed_dim': 4, 'mlp_dims': (8, 6), 'dropout': 0.2},
  'dcn': {'embed_dim': 4, 'num_layers': 2, 'mlp_dims': (8, 6), 'dropout': 0.2},
  'xdeepfm': {
    'embed_dim': 4,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
    'cross_layer_sizes': (4, 2),
    'split_half': True,
  },
  'autoint': {
    'embed_dim': 4,
    'atten_embed_dim': 6,
    'num_heads': 2,
    'num_layers': 2,
    'mlp_dims': (8, 6),
    'dropouts': (0.2, 0.2),
  },
}

# Number of parameters with FIELD_DIMS and TEST_KWARGS.
PARAM_COUNTS = {
  'lr': 23 + 1,  # one weight per id + bias
  'fm': 23 + 1 + 23 * 4,  # linear + factors
  # linear + one [23, 4] table per field (3 fields)
  'ffm': 23 + 1 + 23 * 3 * 4,
  # factors + per-id FM weights (no bias) + MLP on 3 * (1 + 4) = 15 inputs:
  # Dense 15->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'fnn': 23 * 4 + 23 + (15 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + (6 + 1),
  # linear + cross 0x1 (7 * 11 = 77 pairs hashed into 50) + embeddings +
  # MLP on 3 * 4 = 12 inputs: Dense 12->8, BN(8), Dense 8->6, BN(6), 6->1
  'wd': 23 + 1 + 50 + 23 * 4 + (12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7,
  # linear + embeddings + attention W [4, 3], b [3] + h [3] + p [4]
  'afm': 23 + 1 + 23 * 4 + (4 * 3 + 3) + 3 + 4,
  # linear + embeddings + BN(4) on f_BI + MLP on the 4 dims of f_BI:
  # Dense 4->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'nfm': (
    23 + 1 + 23 * 4 + 2 * 4 + (4 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7
  ),
  # MLP embeddings [23, 4] + GMF embeddings of user and item [7 + 11, 4] +
  # MLP tower on 3 * 4 = 12 inputs: Dense 12->8, BN(8), Dense 8->6, BN(6) +
  # prediction Dense on [GMF 4; MLP 6] -> 1
  'ncf': 23 * 4 + 18 * 4 + (12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 11,
  # linear + field-aware factors [23, 3, 4] + BN on 3 pairs * 4 = 12 + MLP:
  # Dense 12->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'fnfm': (
    (23 + 1 + 23 * 3 * 4 + 2 * 12)
    + ((12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7)
  ),
  # linear + embeddings + MLP on 3 * 4 = 12 inputs: Dense 12->8, BN(8),
  # Dense 8->6, BN(6), Dense 6->1
  'deepfm': 23 + 1 + 23 * 4 + (12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 7,
  # embeddings + 2 cross layers (w [12], b [12]) + MLP on 12: Dense 12->8,
  # BN(8), Dense 8->6, BN(6) + output Dense [12 + 6] -> 1
  'dcn': (
    23 * 4 + 2 * (12 + 12) + (12 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + 19
  ),
  # linear + embeddings + CIN: conv 3*3->4, split 2|2, conv 3*2->2,
  # fc [2 + 2]->1 + MLP 12->8->6->1 with BN
  'xdeepfm': (
    23
    + 1
    + 23 * 4
    + (9 * 4 + 4)
    + (6 * 2 + 2)
    + (4 + 1)
    + (12 * 8 + 8)
    + 2 * 8
    + (8 * 6 + 6)
    + 2 * 6
    + 7
  ),
  # linear + embeddings + atten_embedding 4->6 + 2 layers x (q, k, v, out
  # 6->6) + res 4->6 + attn_fc 3*6->1 + MLP 12->8->6->1 with BN
  'autoint': (
    23
    + 1
    + 23 * 4
    + (4 * 6 + 6)
    + 2 * 4 * (6 * 6 + 6)
    + (4 * 6 + 6)
    + (18 + 1)
    + (12 * 8 + 8)
    + 2 * 8
    + (8 * 6 + 6)
    + 2 * 6
    + 7
  ),
}

# Every dropout of each model: site name -> the constructor argument that
# sets its rate, as `(name, None)` for a float argument or `(name, i)` for
# entry `i` of a tuple argument. `{}` for a model without dropout. The
# training tests set one site at a time and the others to 0.
DROPOUT_SITES = {
  'lr': {},
  'fm': {},
  'ffm': {},
  'fnn': {'mlp': ('dropout', None)},
  'wd': {'mlp': ('dropout', None)},
  'afm': {'attention': ('dropouts', 0), 'pooled': ('dropouts', 1)},
  'nfm': {'interaction': ('dropouts', 0), 'mlp': ('dropouts', 1)},
  'ncf': {'mlp': ('dropout', None)},
  'fnfm': {'interaction': ('dropouts', 0), 'mlp': ('dropouts', 1)},
  'deepfm': {'mlp': ('dropout', None)},
  'dcn': {'mlp': ('dropout', None)},
  'xdeepfm': {'mlp': ('dropout', None)},
  'autoint': {'attention': ('dropouts', 0), 'mlp': ('dropouts', 1)},
}

# Where each model is checked against pytorch-fm (torchfm 0.7.0): the test
# file that loads its fixture, or why there is no reference to compare with.
TORCHFM_PARITY = dict.fromkeys(
  ('lr', 'fm', 'ffm', 'fnn', 'wd', 'afm', 'nfm', 'ncf', 'fnfm', 'deepfm'),
  'tests/test_model_parity.py',
)
TORCHFM_PARITY.update(
  {
    name: f'tests/test_model_{name}.py'
    for name in ('dcn', 'xdeepfm', 'autoint')
  }
)


def module(name):
  """The model file `models/<name>.py`."""
  return importlib.import_module(f'models.{name}')


def dropout_kwargs(name, rates=None, base=None):
  """Constructor arguments with every dropout site at `rates.get(site, 0)`.

  Args:
    name: the model.
    rates: dropout rate by site name (DROPOUT_SITES); unnamed sites get 0.
    base: the other arguments; TEST_KWARGS[name] by default.
  """
  kwargs = dict(TEST_KWARGS.get(name, {}) if base is None else base)
  rates = rates or {}
  for site, (arg, index) in DROPOUT_SITES.get(name, {}).items():
    rate = float(rates.get(site, 0.0))
    if index is None:
      kwargs[arg] = rate
    else:
      values = list(kwargs.get(arg, getattr(module(name).Model, arg)))
      values[index] = rate
      kwargs[arg] = tuple(values)
  return kwargs


def build(name, field_dims=FIELD_DIMS, **overrides):
  """`Model(field_dims, **TEST_KWARGS[name], **overrides)`."""
  kwargs = {**TEST_KWARGS.get(name, {}), **overrides}
  return module(name).Model(field_dims=field_dims, **kwargs)


def random_ids(batch=BATCH, field_dims=FIELD_DIMS, seed=0):
  """Uniform ids `[batch, fields]` int32."""
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.integers(0, d, size=batch) for d in field_dims], axis=1
  ).astype(np.int32)


def init(model, ids):
  """The model's variables, initialised in eval mode."""
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return model.init(rngs, ids, train=False)


def randomize(variables, seed=1):
  """Random parameters (N(0, 0.5^2)) and BatchNorm statistics everywhere.

  Zero-initialised leaves (the linear term) would otherwise hide the effect
  of whatever follows them; running variances are drawn from [0.5, 1.5].
  """
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, size=np.shape(x)).astype(np.float32)
    return (0.5 * rng.normal(size=np.shape(x))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, variables)
