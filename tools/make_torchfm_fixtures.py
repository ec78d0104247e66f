"""Writes tests/fixtures/torchfm_<model>.npz from the reference pytorch-fm.

Dev-only: needs `pip install torch==2.13.0 torchfm==0.7.0`, which the library
itself never imports. Each fixture holds the reference model's weights (keys
`w/<state_dict name>`, float32), a batch of ids `ids` `[batch, fields]` and
the reference's eval-mode output `probs` `[batch]`. tests/test_parity.py loads
the weights into our model and compares.

  python tools/make_torchfm_fixtures.py            # all models
  python tools/make_torchfm_fixtures.py fm lr      # some
"""

import os
import sys

import numpy as np
import torch

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


# Model name (as in models/) -> builder of the reference module. Hyper-
# parameters here must match tests/test_parity.py.
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
}

# Model name -> function(model, ids tensor) returning more arrays to save
# (names without the `w/` prefix), e.g. to record a behaviour we differ from.
EXTRAS = {
  'afm': _afm_extras,
}


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
