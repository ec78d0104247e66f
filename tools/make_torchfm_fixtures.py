"""Writes tests/fixtures/torchfm_<model>.npz from the reference pytorch-fm.

Dev-only: needs `pip install torch==2.13.0 torchfm==0.7.0`, which the library
itself never imports. Each fixture holds the reference model's weights (keys
`w/<state_dict name>`, float32), a batch of ids `ids` `[batch, fields]` and
the reference's eval-mode output `probs` `[batch]`; then one training step
from the same weights, in train mode with every dropout rate at 0: labels
`train/labels` `[batch]`, outputs `train/probs`, the loss `train/loss` (BCE
of the probabilities, mean over the batch), the gradient of that loss for
each parameter (`grad/<name>`) and the BatchNorm running statistics after the
step (`after/<name>`). tests/test_model_parity.py loads the weights into our
model and compares.

  python tools/make_torchfm_fixtures.py            # all models
  python tools/make_torchfm_fixtures.py fm lr      # some
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from benchmarks import common  # noqa: E402  pylint: disable=g-import-not-at-top

FIELD_DIMS = (5, 7, 4, 6)
BATCH = 16
OUT_DIR = os.path.join(os.path.dirname(__file__), '..', 'tests', 'fixtures')


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Gives every parameter and BatchNorm statistic a random non-zero value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      values = 0.5 * torch.randn(tensor.shape, generator=gen)
      if name.endswith('running_var'):
        values = 0.5 + torch.rand(tensor.shape, generator=gen)
      tensor.copy_(values)


def _lr():
  from torchfm.model.lr import LogisticRegressionModel

  return LogisticRegressionModel(FIELD_DIMS)


def _fm():
  from torchfm.model.fm import FactorizationMachineModel

  return FactorizationMachineModel(FIELD_DIMS, embed_dim=4)


def _ffm():
  from torchfm.model.ffm import FieldAwareFactorizationMachineModel

  return FieldAwareFactorizationMachineModel(FIELD_DIMS, embed_dim=4)


def _fnn():
  from torchfm.model.fnn import FactorizationSupportedNeuralNetworkModel

  return FactorizationSupportedNeuralNetworkModel(
    FIELD_DIMS, embed_dim=4, mlp_dims=(8, 6), dropout=0.2
  )


def _wd():
  from torchfm.model.wd import WideAndDeepModel

  return WideAndDeepModel(FIELD_DIMS, embed_dim=4, mlp_dims=(8, 6), dropout=0.2)


def _afm():
  from torchfm.model.afm import AttentionalFactorizationMachineModel

  # Dropout 0: pytorch-fm's AFM calls F.dropout without `training=`, so it
  # drops in eval mode too; only dropout-free outputs are deterministic.
  # `_afm_extras` records the random ones.
  return AttentionalFactorizationMachineModel(
    FIELD_DIMS, embed_dim=4, attn_size=3, dropouts=(0.0, 0.0)
  )


def _afm_extras(model, ids):
  """Two eval-mode outputs of the same AFM with dropouts (0.2, 0.2)."""
  model.afm.dropouts = (0.2, 0.2)
  with torch.no_grad():
    runs = [model(ids).numpy() for _ in range(2)]
  model.afm.dropouts = (0.0, 0.0)
  return {'eval_dropout_probs': np.stack(runs).astype(np.float32)}


def _nfm():
  from torchfm.model.nfm import NeuralFactorizationMachineModel

  return NeuralFactorizationMachineModel(
    FIELD_DIMS, embed_dim=4, mlp_dims=(8, 6), dropouts=(0.2, 0.2)
  )


def _ncf():
  from torchfm.model.ncf import NeuralCollaborativeFiltering

  # Field indices as torchfm's MovieLens datasets give them (index arrays).
  return NeuralCollaborativeFiltering(
    FIELD_DIMS,
    user_field_idx=np.array((0,), dtype=np.int64),
    item_field_idx=np.array((1,), dtype=np.int64),
    embed_dim=4,
    mlp_dims=(8, 6),
    dropout=0.2,
  )


def _fnfm():
  from torchfm.model.fnfm import FieldAwareNeuralFactorizationMachineModel

  return FieldAwareNeuralFactorizationMachineModel(
    FIELD_DIMS, embed_dim=4, mlp_dims=(8, 6), dropouts=(0.2, 0.2)
  )


def _deepfm():
  from torchfm.model.dfm import DeepFactorizationMachineModel

  return DeepFactorizationMachineModel(
    FIELD_DIMS, embed_dim=4, mlp_dims=(8, 6), dropout=0.2
  )


def _dcn():
  from torchfm.model.dcn import DeepCrossNetworkModel

  return DeepCrossNetworkModel(
    FIELD_DIMS, embed_dim=4, num_layers=2, mlp_dims=(8, 6), dropout=0.2
  )


def _xdeepfm():
  from torchfm.model.xdfm import ExtremeDeepFactorizationMachineModel

  # split_half with an odd last layer: maps 6 -> 3 pooled + 3 forward,
  # 4 -> 2 + 2, then all 3 pooled.
  return ExtremeDeepFactorizationMachineModel(
    FIELD_DIMS,
    embed_dim=4,
    mlp_dims=(8, 6),
    dropout=0.2,
    cross_layer_sizes=(6, 4, 3),
    split_half=True,
  )


def _autoint():
  from torchfm.model.afi import AutomaticFeatureInteractionModel

  # Attention dropout 0: torch's MultiheadAttention keeps its rate in a
  # float, not an nn.Dropout, so the dropout-free training step below would
  # not turn it off.
  return AutomaticFeatureInteractionModel(
    FIELD_DIMS,
    embed_dim=4,
    atten_embed_dim=6,
    num_heads=2,
    num_layers=2,
    mlp_dims=(8, 6),
    dropouts=(0.0, 0.2),
  )


def _variant(prefix, model, ids, seed):
  """Weights (`<prefix>/w/...`) and eval output of a second configuration."""
  _randomize(model, seed=seed)
  model.eval()
  with torch.no_grad():
    probs = model(ids).numpy().astype(np.float32)
  arrays = {
    f'{prefix}/w/{k}': v.numpy().astype(np.float32)
    for k, v in model.state_dict().items()
    if v.is_floating_point()
  }
  arrays[f'{prefix}/probs'] = probs
  return arrays


def _xdeepfm_extras(model, ids):
  """The same model without split_half (pytorch-fm's example setting)."""
  from torchfm.model.xdfm import ExtremeDeepFactorizationMachineModel

  del model
  nosplit = ExtremeDeepFactorizationMachineModel(
    FIELD_DIMS,
    embed_dim=4,
    mlp_dims=(8,),
    dropout=0.2,
    cross_layer_sizes=(5, 3),
    split_half=False,
  )
  return _variant('nosplit', nosplit, ids, seed=4)


def _autoint_extras(model, ids):
  """One attention layer of 3 heads, without the residual connection."""
  from torchfm.model.afi import AutomaticFeatureInteractionModel

  del model
  nores = AutomaticFeatureInteractionModel(
    FIELD_DIMS,
    embed_dim=4,
    atten_embed_dim=6,
    num_heads=3,
    num_layers=1,
    mlp_dims=(8,),
    dropouts=(0.0, 0.2),
    has_residual=False,
  )
  return _variant('nores', nores, ids, seed=5)


def _hofm():
  # Order 4: the ANOVA kernels of orders 3 and 4 both have factors.
  hofm = common.pytorch_fm_master('hofm')
  return hofm.HighOrderFactorizationMachineModel(
    FIELD_DIMS, order=4, embed_dim=3
  )


def _pnn(method):
  from torchfm.model.pnn import ProductNeuralNetworkModel

  model = ProductNeuralNetworkModel(
    FIELD_DIMS, embed_dim=4, mlp_dims=(8, 6), dropout=0.2, method=method
  )
  # Its linear term is never used in forward (no output, no gradient).
  del model.linear
  return model


def _afn():
  from torchfm.model.afn import AdaptiveFactorizationNetwork

  # tests/test_model_afn.py holds the converter (its `lnn='torchfm'` form).
  return AdaptiveFactorizationNetwork(
    FIELD_DIMS, embed_dim=4, LNN_dim=6, mlp_dims=(8, 6), dropouts=(0.2,) * 3
  )


# Model name (as in models/) -> builder of the reference module. Hyper-
# parameters here must match tests/test_model_parity.py.
BUILDERS = {
  'lr': _lr,
  'fm': _fm,
  'ffm': _ffm,
  'fnn': _fnn,
  'wd': _wd,
  'afm': _afm,
  'nfm': _nfm,
  'ncf': _ncf,
  'fnfm': _fnfm,
  'deepfm': _deepfm,
  'dcn': _dcn,
  'xdeepfm': _xdeepfm,
  'autoint': _autoint,
  'hofm': _hofm,
  # models/pnn.py, method 'inner' and 'outer'.
  'ipnn': lambda: _pnn('inner'),
  'opnn': lambda: _pnn('outer'),
  'afn': _afn,
}

# Model name -> function(model, ids tensor) returning more arrays to save
# (names without the `w/` prefix), e.g. to record a behaviour we differ from.
EXTRAS = {
  'afm': _afm_extras,
  'xdeepfm': _xdeepfm_extras,
  'autoint': _autoint_extras,
}


def _train_step(model, ids):
  """One train-mode forward and backward with every dropout rate at 0."""
  for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  if hasattr(model, 'afm'):  # AFM's functional dropouts
    model.afm.dropouts = (0.0, 0.0)
  model.train()
  rng = np.random.default_rng(3)
  labels = (rng.permutation(BATCH) % 2).astype(np.float32)  # both classes
  model.zero_grad()
  probs = model(ids)
  loss = torch.nn.functional.binary_cross_entropy(
    probs, torch.from_numpy(labels)
  )
  loss.backward()
  arrays = {
    'train/labels': labels,
    'train/probs': probs.detach().numpy().astype(np.float32),
    'train/loss': np.float32(loss.item()),
  }
  for k, v in model.named_parameters():
    arrays[f'grad/{k}'] = v.grad.numpy().astype(np.float32)
  for k, v in model.state_dict().items():
    if k.endswith(('running_mean', 'running_var')):
      arrays[f'after/{k}'] = v.numpy().astype(np.float32)
  return arrays


def write_fixture(name: str) -> str:
  torch.manual_seed(0)
  model = BUILDERS[name]()
  _randomize(model, seed=1)
  model.eval()
  rng = np.random.default_rng(2)
  ids = np.stack(
    [rng.integers(0, d, size=BATCH) for d in FIELD_DIMS], axis=1
  ).astype(np.int64)
  with torch.no_grad():
    probs = model(torch.from_numpy(ids)).numpy().astype(np.float32)
  arrays = {
    f'w/{k}': v.numpy().astype(np.float32)
    for k, v in model.state_dict().items()
    if v.is_floating_point()
  }
  if name in EXTRAS:
    arrays.update(EXTRAS[name](model, torch.from_numpy(ids)))
  # Last: it changes the dropout rates and the running statistics.
  arrays.update(_train_step(model, torch.from_numpy(ids)))
  path = os.path.join(OUT_DIR, f'torchfm_{name}.npz')
  np.savez_compressed(
    path,
    ids=ids.astype(np.int32),
    probs=probs,
    field_dims=np.array(FIELD_DIMS),
    **arrays,
  )
  return path


def main(argv):
  names = argv[1:] or sorted(BUILDERS)
  os.makedirs(OUT_DIR, exist_ok=True)
  for name in names:
    print('wrote', write_fixture(name))


if __name__ == '__main__':
  main(sys.argv)
