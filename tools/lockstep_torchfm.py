"""Our training loop and torchfm's from the same weights on the same batches.

python tools/lockstep_torchfm.py --model=ipnn --seeds=0-7 --epochs=3

Removes every difference between the two runs but the code: torchfm 0.7.0
builds the model with `torch.manual_seed(seed)` and our model starts from its
weights (converted as the parity tests do); both train with every dropout
rate at 0 (`--dropout`: the config's rates, each library drawing its own
masks), on the training split cut to whole batches, in its stored order
(no shuffle), with pytorch-fm's recipe (configs/<model>.py, early stopping
included; `--set key=value` changes both, e.g. the data set); both
evaluate after each epoch. Prints the validation AUC and training loss of
each epoch, ours and torchfm's, the test AUC of each run's best-validation
state, and the mean differences over the seeds.
Equal training losses with a validation AUC apart point at what evaluation
reads and training does not (BatchNorm's running statistics).

Dev-only: needs `pip install torch==2.13.0 torchfm==0.7.0`. Models: the
ones whose converters tests/ has for their default configs (ipnn, opnn,
dcn).
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'tests')):
  if path not in sys.path:
    sys.path.insert(0, path)


def _converter(name: str, config):
  """torch state dict -> our variables, for `name`'s config."""
  num_hidden = len(config.model.mlp_dims)
  if name == 'dcn':
    from test_model_dcn import _from_torch  # pylint: disable=g-import-not-at-top

    return lambda w: _from_torch(w, config.model.num_layers, num_hidden)
  from test_model_pnn import _from_torch  # pylint: disable=g-import-not-at-top

  return lambda w: _from_torch(w, config.model.method, num_hidden)


def run_seed(
  name: str,
  seed: int,
  epochs: int,
  workdir: str,
  dropout: bool = False,
  overrides: dict | None = None,
) -> dict:
  """`{run: (valid AUCs by epoch, losses by epoch, best state's test AUC)}`.

  For run 'flax' and run 'torchfm'.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  import batching  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import quality  # pylint: disable=g-import-not-at-top
  import data  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top

  overrides = dict(overrides or {})
  if not dropout:
    overrides['model.dropout'] = 0.0
  # torchfm's update on tables of any size ('auto' is 'lazy_adam' on large).
  overrides.setdefault('optimizer', 'adam')
  config = common.get_config(name, None, overrides)
  config.seed = seed
  config.progress_bar = False
  config.num_epochs = epochs  # Early stopping as both recipes (patience 2).
  dataset = data.load_dataset(config.dataset)
  splits, field_dims = quality.torchfm_data(config, dataset, raw=False)
  size = len(splits['train'][0]) // config.batch_size * config.batch_size
  splits['train'] = tuple(a[:size] for a in splits['train'])

  torch.manual_seed(seed)
  weights = common.torchfm_model(name, config.model, field_dims).state_dict()
  variables = _converter(name, config)(
    {k: v.detach().numpy().astype(np.float32) for k, v in weights.items()}
  )
  model_class = type(train.create_model(config, field_dims))
  own_init = model_class.init

  def torch_init(self, *args, **kwargs):
    shapes = own_init(self, *args, **kwargs)
    return jax.tree.map(
      lambda s, w: np.asarray(w, np.float32).reshape(np.shape(s)),
      shapes,
      variables,
    )

  def in_order(split, batch_size, **kwargs):
    del split, kwargs
    for step in range(size // batch_size):
      yield np.arange(
        step * batch_size, (step + 1) * batch_size, dtype=np.int32
      )

  own_rows = batching.train_rows
  model_class.init, batching.train_rows = torch_init, in_order
  try:
    train.train_and_evaluate(config, os.path.join(workdir, 'flax'))
  finally:
    model_class.init, batching.train_rows = own_init, own_rows
  quality.train_torchfm(
    name, config, splits, field_dims, os.path.join(workdir, 'torchfm')
  )
  out = {}
  for run in ('flax', 'torchfm'):
    records = quality.read_metrics(os.path.join(workdir, run, 'metrics.jsonl'))
    out[run] = (
      [r['auc'] for r in records if r['split'] == 'valid'],
      [r['loss'] for r in records if r['split'] == 'train'],
      [r['auc'] for r in records if r['split'] == 'test'][-1],
    )
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--model', default='ipnn', choices=('ipnn', 'opnn', 'dcn')
  )
  parser.add_argument('--seeds', default='0-3', help="e.g. '0-7' or '0,3'")
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--workdir', default='')
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    help='key=value for both runs, e.g. dataset.name=ml-20m',
  )
  parser.add_argument(
    '--dropout',
    action='store_true',
    help="keep the config's dropout (masks differ between the libraries)",
  )
  args = parser.parse_args(argv)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import seeds  # pylint: disable=g-import-not-at-top

  with common.workdir_or_temp(args.workdir, 'lockstep-') as workdir:
    diffs, tests = [], []
    for seed in seeds.parse_seeds(args.seeds):
      runs = run_seed(
        args.model,
        seed,
        args.epochs,
        os.path.join(workdir, f's{seed}'),
        args.dropout,
        common.parse_overrides(args.set, '--set'),
      )
      for run, (aucs, losses, test) in runs.items():
        print(
          f'seed {seed} {run:8s} valid AUC',
          ' '.join(f'{a:.5f}' for a in aucs),
          '| train loss',
          ' '.join(f'{x:.5f}' for x in losses),
          f'| test AUC (best valid) {test:.5f}',
        )
      n = min(len(runs['flax'][0]), len(runs['torchfm'][0]))
      diffs.append(np.subtract(runs['flax'][0][:n], runs['torchfm'][0][:n]))
      tests.append(runs['flax'][2] - runs['torchfm'][2])
  n = min(map(len, diffs))
  mean = np.mean([d[:n] for d in diffs], axis=0)
  print('flax - torchfm, valid AUC by epoch, mean over the seeds:')
  print(' '.join(f'{d:+.5f}' for d in mean))
  print(
    'flax - torchfm, test AUC of the best-validation state:',
    f'{np.mean(tests):+.5f}',
    f'(± {np.std(tests, ddof=1) / np.sqrt(len(tests)):.5f} s.e.)'
    if len(tests) > 1
    else '',
  )


if __name__ == '__main__':
  main()
