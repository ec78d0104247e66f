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


# Model name (as in models/) -> builder of the reference module. Hyper-
# parameters here must match tests/test_parity.py.
BUILDERS = {
  'lr': _lr,
  'fm': _fm,
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
