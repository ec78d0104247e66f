"""Checks data.py's Criteo/Avazu encoding against torchfm 0.7.0's own code.

python tools/check_torchfm_encoding.py --format=criteo \
  --path=../shared/data/criteo-sample/train.csv
python tools/check_torchfm_encoding.py --format=avazu \
  --path=../shared/data/avazu-sample/train.csv

Runs torchfm's `CriteoDataset` / `AvazuDataset` feature-mapper passes (its
`__get_feat_mapper` and `__yield_buffer`, without writing its lmdb cache) and
data.py's preprocessing (pytorch-fm's options: `hour_features=False` for
Avazu, every line in the training split) on the same file, and checks that
both give the same field_dims and labels, and ids that correspond one to one
in every field with the out-of-vocabulary id last in both (torchfm numbers
kept values in set order, data.py by key). Dev-only: exits 0 with a message
where torchfm is not installed.
"""

import argparse
from collections.abc import Sequence
import os
import sys
import tempfile
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _torchfm_encoding(fmt: str, path: str):
  """torchfm's ids `[n, fields]`, labels `[n]` and field_dims of `path`."""
  # torchfm's dataset modules import lmdb (for their cache) and tqdm at the
  # top; the passes used here need neither, so stand-ins do when missing.
  for name in ('lmdb', 'tqdm'):
    try:
      __import__(name)
    except ImportError:
      stub = types.ModuleType(name)

      class _Bar:
        def __init__(self, iterable, **_):
          self.iterable = iterable

        def __iter__(self):
          return iter(self.iterable)

        def set_description(self, _):
          pass

      stub.tqdm = _Bar
      sys.modules[name] = stub
  if fmt == 'criteo':
    from torchfm.dataset.criteo import CriteoDataset as cls  # noqa: N813

    dataset = cls.__new__(cls)
    dataset.NUM_FEATS, dataset.NUM_INT_FEATS = 39, 13
    dataset.min_threshold = 10
  else:
    from torchfm.dataset.avazu import AvazuDataset as cls  # noqa: N813

    dataset = cls.__new__(cls)
    dataset.NUM_FEATS, dataset.min_threshold = 22, 4
  private = f'_{cls.__name__}__'
  mapper, defaults = getattr(dataset, private + 'get_feat_mapper')(path)
  rows = [
    np.frombuffer(value, np.uint32).astype(np.int64)
    for buffer in getattr(dataset, private + 'yield_buffer')(
      path, mapper, defaults
    )
    for _, value in buffer
  ]
  rows = np.stack(rows)
  dims = [len(mapper[i]) + 1 for i in range(1, dataset.NUM_FEATS + 1)]
  return rows[:, 1:], rows[:, 0].astype(np.float32), tuple(dims)


def compare(fmt: str, path: str) -> list[str]:
  """The differences between torchfm's encoding and data.py's (none: [])."""
  from configs import default  # pylint: disable=g-import-not-at-top
  import data  # pylint: disable=g-import-not-at-top

  if fmt == 'avazu':
    with open(path) as f:
      if not f.readline().startswith('id,'):
        return [
          f'{path} has no header line, and torchfm always skips the first'
          ' line of an Avazu file (data.py reads it as data): compare a'
          ' file with the header.'
        ]
  theirs, their_labels, their_dims = _torchfm_encoding(fmt, path)
  with tempfile.TemporaryDirectory() as cache:
    config = default.get_config().dataset
    config.update(name=fmt, path=path, cache_dir=cache, split=(1.0, 0.0, 0.0))
    if fmt == 'avazu':
      config.avazu.hour_features = False
    dataset = data.load_dataset(config)
    ours = np.array(dataset.train.ids)
    labels = np.array(dataset.train.labels)
    dims = dataset.field_dims
  problems = []
  if ours.shape != theirs.shape:
    return [f'shapes differ: ours {ours.shape}, torchfm {theirs.shape}']
  if dims != their_dims:
    problems.append(f'field_dims differ: ours {dims}, torchfm {their_dims}')
  if not np.array_equal(labels, their_labels):
    problems.append('labels differ')
  for f, name in enumerate(dataset.field_names):
    pairs = set(zip(ours[:, f].tolist(), theirs[:, f].tolist(), strict=True))
    if (
      not len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    ):
      problems.append(f'{name}: ids do not correspond one to one')
    if any((a == dims[f] - 1) != (b == their_dims[f] - 1) for a, b in pairs):
      problems.append(f'{name}: out-of-vocabulary ids differ')
  return problems


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--format', choices=('criteo', 'avazu'), required=True)
  parser.add_argument('--path', required=True)
  args = parser.parse_args(argv)
  try:
    import torchfm  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('torchfm is not installed: nothing to compare.')
    return 0
  problems = compare(args.format, os.path.abspath(args.path))
  for problem in problems:
    print(problem)
  if not problems:
    print(f'{args.path}: same encoding as torchfm ({args.format}).')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
