"""Per-model tables for the model tests: every file in models/ needs an entry.

A new model file adds one line to each table below; the contract tests
(tests/test_model_contract.py) fail for a model without its entries.
"""

import importlib

from model_testing import random_ids
from model_testing import zero_gradient_leaves

import models

MODEL_NAMES = models.names()

FIELD_DIMS = (7, 11, 5)
BATCH = 6
# Two fields, as the embedded MovieLens data (user, movie): the fewest a pair
# model takes, and where one dead unit can silence every pair.
TWO_FIELD_DIMS = (6, 9)

# Parameters that get no gradient on TWO_FIELD_DIMS by design: AFM attends
# over the one pair, and a softmax of one score is 1 whatever the attention
# parameters.
TWO_FIELD_ZERO_GRADIENTS = {
  'afm': (
    "['AttentionalFactorizationMachine_0']['attention']['bias']",
    "['AttentionalFactorizationMachine_0']['attention']['kernel']",
    "['AttentionalFactorizationMachine_0']['projection']['kernel']",
  ),
}

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
  'hofm': {'order': 3, 'embed_dim': 4},
  'pnn': {
    'embed_dim': 4,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
    'method': 'outer',
  },
  'fwfm': {'embed_dim': 4, 'linear_type': 'filv'},
  # The paper's LNN (clamped log, two BatchNorms): every layer of the file.
  'afn': {
    'embed_dim': 4,
    'lnn_dim': 6,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
    'lnn': 'paper',
  },
  'dcnv2': {
    'embed_dim': 4,
    'num_cross_layers': 2,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
    'structure': 'parallel',
    'low_rank': 2,
    'num_experts': 3,
  },
  'finalmlp': {
    'embed_dim': 4,
    'mlp1_dims': (8,),
    'mlp2_dims': (6, 4),
    'dropouts': (0.2, 0.2),
    'fs_dims': (5,),
    'fs1_context': (0,),
    'fs2_context': (),
    'num_heads': 2,
  },
  'fibinet': {
    'embed_dim': 4,
    'mlp_dims': (8, 6),
    'dropout': 0.2,
    'bilinear_type': 'field_interaction',
  },
}

# Variants of a model that its config builds and TEST_KWARGS does not: case
# name -> (model, arguments over TEST_KWARGS[model]). configs/dcnv2.py and
# configs/finalmlp.py turn BatchNorm off (`batch_norm=False`: each hidden
# layer Linear with bias -> ReLU -> Dropout), where the models' default
# keeps pytorch-fm's BatchNorm. `build`, `module` and PARAM_COUNTS take a
# case name as a model name.
VARIANTS = {
  'dcnv2_no_batch_norm': ('dcnv2', {'batch_norm': False}),
  'finalmlp_no_batch_norm': ('finalmlp', {'batch_norm': False}),
}
# The contract tests' cases: every model, then every variant.
CASE_NAMES = MODEL_NAMES + sorted(VARIANTS)

# Number of parameters with FIELD_DIMS and TEST_KWARGS. A Dense layer before
# a BatchNorm (BN) has no bias.
PARAM_COUNTS = {
  'lr': 23 + 1,  # one weight per id + bias
  'fm': 23 + 1 + 23 * 4,  # linear + factors
  # linear + one [23, 4] table per field (3 fields)
  'ffm': 23 + 1 + 23 * 3 * 4,
  # factors + per-id FM weights (no bias) + MLP on 3 * (1 + 4) = 15 inputs:
  # Dense 15->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'fnn': 23 * 4 + 23 + 15 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + (6 + 1),
  # linear + cross 0x1 (7 * 11 = 77 pairs hashed into 50) + embeddings +
  # MLP on 3 * 4 = 12 inputs: Dense 12->8, BN(8), Dense 8->6, BN(6), 6->1
  'wd': 23 + 1 + 50 + 23 * 4 + 12 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 7,
  # linear + embeddings + attention W [4, 3], b [3] + h [3] + p [4]
  'afm': 23 + 1 + 23 * 4 + (4 * 3 + 3) + 3 + 4,
  # linear + embeddings + BN(4) on f_BI + MLP on the 4 dims of f_BI:
  # Dense 4->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'nfm': 23 + 1 + 23 * 4 + 2 * 4 + 4 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 7,
  # MLP embeddings [23, 4] + GMF embeddings of user and item [7 + 11, 4] +
  # MLP tower on 3 * 4 = 12 inputs: Dense 12->8, BN(8), Dense 8->6, BN(6) +
  # prediction Dense on [GMF 4; MLP 6] -> 1
  'ncf': 23 * 4 + 18 * 4 + 12 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 11,
  # linear + field-aware factors [23, 3, 4] + BN on 3 pairs * 4 = 12 + MLP:
  # Dense 12->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'fnfm': (
    (23 + 1 + 23 * 3 * 4 + 2 * 12) + (12 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 7)
  ),
  # linear + embeddings + MLP on 3 * 4 = 12 inputs: Dense 12->8, BN(8),
  # Dense 8->6, BN(6), Dense 6->1
  'deepfm': 23 + 1 + 23 * 4 + 12 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 7,
  # embeddings + 2 cross layers (w [12], b [12]) + MLP on 12: Dense 12->8,
  # BN(8), Dense 8->6, BN(6) + output Dense [12 + 6] -> 1
  'dcn': 23 * 4 + 2 * (12 + 12) + 12 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 19,
  # linear + embeddings + CIN: conv 3*3->4, split 2|2, conv 3*2->2,
  # fc [2 + 2]->1 + MLP 12->8->6->1 with BN
  'xdeepfm': (
    23
    + 1
    + 23 * 4
    + (9 * 4 + 4)
    + (6 * 2 + 2)
    + (4 + 1)
    + 12 * 8
    + 2 * 8
    + 8 * 6
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
    + 12 * 8
    + 2 * 8
    + 8 * 6
    + 2 * 6
    + 7
  ),
  # linear + one [23, order - 1 = 2, 4] table (orders 2 and 3)
  'hofm': 23 + 1 + 23 * 8,
  # embeddings + outer-product kernel [4, 3 pairs, 4] + MLP on 3 * 4 + 3
  # pairs = 15 inputs: Dense 15->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'pnn': 23 * 4 + 4 * 3 * 4 + 15 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 7,
  # embeddings + FiLV vector per field [3, 4] + bias + 3 pair weights
  'fwfm': 23 * 4 + 3 * 4 + 1 + 3,
  # linear + embeddings + LNN weights [6, 3], BatchNorm over the 3 fields'
  # logarithms and over the 6 neurons + MLP on 6 * 4 = 24 inputs: Dense
  # 24->8, BN(8), Dense 8->6, BN(6), Dense 6->1
  'afn': (
    23 + 1 + 23 * 4 + 6 * 3 + 2 * 3 + 2 * 6 + 24 * 8 + 2 * 8 + 8 * 6 + 2 * 6 + 7
  ),
  # embeddings + gates 12->3 (no bias) + 2 layers x (U, V [3, 12, 2],
  # C [3, 2, 2], b [12]) + MLP 12->8->6 with BN + logit Dense [12 + 6]->1
  'dcnv2': (
    23 * 4
    + 12 * 3
    + 2 * (2 * 3 * 12 * 2 + 3 * 2 * 2 + 12)
    + 12 * 8
    + 2 * 8
    + 8 * 6
    + 2 * 6
    + 19
  ),
  # embeddings + gate 1: context table [7, 4], Dense 4->5, 5->12 + gate 2
  # bias [12] + stream 1: Dense 12->8, BN(8) + stream 2: Dense 12->6, BN(6),
  # Dense 6->4, BN(4) + fusion: W [2 heads, 4, 2], w_1 [8] + b, w_2 [4]
  'finalmlp': (
    23 * 4
    + 7 * 4
    + (4 * 5 + 5)
    + (5 * 12 + 12)
    + 12
    + 12 * 8
    + 2 * 8
    + 12 * 6
    + 2 * 6
    + 6 * 4
    + 2 * 4
    + 2 * 4 * 2
    + (8 + 1)
    + 4
  ),
  # As dcnv2, but the MLP's Dense layers keep their biases and have no BN.
  'dcnv2_no_batch_norm': (
    23 * 4
    + 12 * 3
    + 2 * (2 * 3 * 12 * 2 + 3 * 2 * 2 + 12)
    + (12 * 8 + 8)
    + (8 * 6 + 6)
    + 19
  ),
  # As finalmlp, but the streams' Dense layers keep their biases, no BN.
  'finalmlp_no_batch_norm': (
    23 * 4
    + 7 * 4
    + (4 * 5 + 5)
    + (5 * 12 + 12)
    + 12
    + (12 * 8 + 8)
    + (12 * 6 + 6)
    + (6 * 4 + 4)
    + 2 * 4 * 2
    + (8 + 1)
    + 4
  ),
  # linear + embeddings + SENET 3->1->3 (no biases) + 2 bilinear layers of
  # [3 pairs, 4, 4] + MLP on 2 * 3 pairs * 4 = 24 inputs, no BatchNorm:
  # Dense 24->8, Dense 8->6, Dense 6->1
  'fibinet': (
    23 + 1 + 23 * 4 + (3 + 3) + 2 * 3 * 4 * 4 + (24 * 8 + 8) + (8 * 6 + 6) + 7
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
  'hofm': {},
  'pnn': {'mlp': ('dropout', None)},
  'fwfm': {},
  'afn': {'mlp': ('dropout', None)},
  'dcnv2': {'mlp': ('dropout', None)},
  'finalmlp': {'mlp1': ('dropouts', 0), 'mlp2': ('dropouts', 1)},
  'fibinet': {'mlp': ('dropout', None)},
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
    for name in ('dcn', 'xdeepfm', 'autoint', 'pnn', 'afn')
  }
)
# pytorch-fm's GitHub master, not in torchfm 0.7.0.
TORCHFM_PARITY['hofm'] = 'tests/test_model_hofm.py'
TORCHFM_PARITY.update(
  {
    name: f'none: pytorch-fm has no {paper}; brute force in'
    f' tests/test_model_{name}.py'
    for name, paper in (
      ('fwfm', 'FwFM'),
      ('dcnv2', 'DCN-V2'),
      ('finalmlp', 'FinalMLP'),
      ('fibinet', 'FiBiNET'),
    )
  }
)


def module(name):
  """The model file `models/<name>.py`, or a variant's (VARIANTS)."""
  name = VARIANTS.get(name, (name,))[0]
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
  """`Model(field_dims, **TEST_KWARGS[name], **overrides)`.

  A variant's name (VARIANTS) builds its model with TEST_KWARGS of the
  model and the variant's arguments.
  """
  model, variant = VARIANTS.get(name, (name, {}))
  kwargs = {**TEST_KWARGS.get(model, {}), **variant, **overrides}
  return module(model).Model(field_dims=field_dims, **kwargs)


def initial_zero_gradients(name, seeds=(0, 1, 2)):
  """`zero_gradient_leaves` of `build(name)` on TWO_FIELD_DIMS."""
  model = build(name, field_dims=TWO_FIELD_DIMS)
  ids = random_ids(32, TWO_FIELD_DIMS)
  return zero_gradient_leaves(model, ids, seeds)
