"""Time to torchfm's best validation AUC, from process launch.

For each model and data set, launches pytorch-fm (torchfm 0.7.0) and then
`python main.py` as a user runs them, each in a fresh process, and times
each from its launch to the end of the first validation whose AUC reaches
torchfm's best: imports, data loading, compilation, evaluation and
checkpoints included.

- torchfm: its examples/main.py loop (benchmarks/quality.py's
  `train_torchfm`: Adam lr 1e-3 + L2 1e-6, batch 2048 in a fixed order,
  early stopping after 2 epochs without a better validation AUC) on our
  encoded split in its order (`quality.random_split_rows`: one file's
  random split is read in a random order, as torch's `random_split`), read
  from `.npy` files: the process imports torch, torchfm and numpy, not
  JAX.
- flax: `python main.py --config=configs/<model>.py` with each of
  `--optimizers` (default: `config`, each config's own: `auto` but for
  LR's and FiBiNET's `adam`; another name is passed as
  `--config.optimizer`); `cold` with an empty
  JAX compilation cache (a first run), `warm` again with the cache the cold
  run filled (every later run of the config, as main.py keeps the cache
  under the dataset cache).

Data (`--data`): `embedded` (ml-latest-small, the default config),
`criteo` with `--criteo=FILE`, a Criteo-format file, and `ml20m` with
`--ml20m=FILE`, a MovieLens-20M `ratings.csv` (e.g. the 2M lines of
`python -m benchmarks.synthetic --format=criteo --lines=2000000
--out=FILE`, or of `--format=movielens`: ML-20M's users and movies).

  python -m benchmarks.time_to_auc --models=fm,deepfm
  python -m benchmarks.time_to_auc --models=fm --criteo=/tmp/criteo_2m.txt \
    --data=criteo --optimizers=adam,rowwise_adagrad

Results: benchmarks/results/time_to_auc.{json,csv,md}.
"""

import argparse
from collections.abc import Sequence
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmarks import common
from benchmarks import quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ('embedded', 'criteo', 'ml20m')
# The data sets read from a file: `config.dataset.name`, the file's flag.
FILE_DATA = {'criteo': 'criteo', 'ml20m': 'ml-20m'}


def data_flags(name: str, args) -> list[str]:
  """main.py's flags that select data set `name`."""
  flags = ['--config.progress_bar=False']
  if args.cache_dir:
    flags.append(f'--config.dataset.cache_dir={args.cache_dir}')
  if name in FILE_DATA:
    flags += [
      f'--config.dataset.name={FILE_DATA[name]}',
      f'--config.dataset.path={getattr(args, name)}',
    ]
  return flags


def data_keys(name: str) -> dict[str, str]:
  """`{config key: flag}` of the config values that flags set for `name`.

  For `common.with_flags`: an error of the data, ours or main.py's, names
  the flags a user of this tool gives, `--cache_dir` and, for a data set
  read from a file, its flag (`--criteo`, `--ml20m`), not the config keys
  they set.
  """
  keys = dict(common.CACHE_DIR_FLAG)
  if name in FILE_DATA:
    keys['config.dataset.path'] = f'--{name}'
  return keys


def write_split(name: str, args, out: str) -> None:
  """Our encoded split of data set `name` as `.npy` files for torchfm."""
  import data  # pylint: disable=g-import-not-at-top

  config = common.get_config('fm')
  if args.cache_dir:
    config.dataset.cache_dir = args.cache_dir
  if name in FILE_DATA:
    config.dataset.name = FILE_DATA[name]
    config.dataset.path = getattr(args, name)
  dataset = data.load_dataset(config.dataset)
  os.makedirs(out, exist_ok=True)
  for split in ('train', 'valid', 'test'):
    part = getattr(dataset, split)
    ids, labels = np.asarray(part.ids), np.asarray(part.labels)
    if split == 'train':  # In pytorch-fm's order.
      order = quality.random_split_rows(config, len(ids))
      if order is not None:
        ids, labels = ids[order], labels[order]
    np.save(os.path.join(out, f'{split}_ids.npy'), ids)
    np.save(os.path.join(out, f'{split}_labels.npy'), labels)
  with open(os.path.join(out, 'field_dims.json'), 'w') as f:
    json.dump([int(d) for d in dataset.field_dims], f)


def torch_worker(spec_path: str) -> None:
  """The torchfm process: reads the split, trains, writes metrics.jsonl."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  with open(spec_path) as f:
    spec = json.load(f)
  splits = {
    split: (
      np.load(os.path.join(spec['data'], f'{split}_ids.npy')).astype(np.int64),
      np.load(os.path.join(spec['data'], f'{split}_labels.npy')),
    )
    for split in ('train', 'valid', 'test')
  }
  with open(os.path.join(spec['data'], 'field_dims.json')) as f:
    field_dims = tuple(json.load(f))
  config = ml_collections.ConfigDict(spec['config'])
  quality.train_torchfm(
    spec['model'], config, splits, field_dims, spec['workdir']
  )


def launch(argv: list[str], workdir: str, env: dict | None = None) -> dict:
  """Runs `python argv` from the repository root; its launch time and lines.

  Raises:
    utils.UserError: `main.py` stopped on a user error (status 2 and its
      one line, `main.py: error: <message>`): the message, which
      `common.user_errors` shows as one line.
    RuntimeError: the process failed otherwise (its last output lines).
  """
  start = time.time()
  result = subprocess.run(
    [sys.executable, *argv],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, **(env or {})},
  )
  end = time.time()
  if result.returncode == 2 and argv[:1] == ['main.py']:
    prefix = 'main.py: error: '
    errors = [
      line for line in result.stderr.splitlines() if line.startswith(prefix)
    ]
    if errors:
      import utils  # pylint: disable=g-import-not-at-top

      raise utils.UserError(errors[-1].removeprefix(prefix))
  if result.returncode:
    tail = '\n'.join(result.stderr.splitlines()[-15:])
    raise RuntimeError(f'{" ".join(argv)} failed:\n{tail}')
  lines = quality.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return {'start': start, 'end': end, 'lines': lines}


def time_to(run: dict, target: float) -> float | None:
  """Seconds from launch to the first validation with AUC >= `target`."""
  reached = quality.time_to_reach(run['lines'], target, clock='time')
  return None if reached is None else reached - run['start']


def summary(run: dict, target: float) -> dict:
  valid = [r for r in run['lines'] if r['split'] == 'valid']
  test = [r for r in run['lines'] if r['split'] == 'test']
  return {
    'best_valid_auc': max(
      (r['auc'] for r in valid if r['auc'] is not None), default=None
    ),
    'test_auc': test[-1]['auc'] if test else None,
    'epochs': max(r['epoch'] for r in valid),
    'seconds_to_target': time_to(run, target),
    'seconds_total': run['end'] - run['start'],
  }


def run_one(name: str, data_name: str, args, split_dir: str) -> list[dict]:
  """torchfm, then ours with each optimizer cold and warm: one record each."""
  config = common.get_config(name)
  root = os.path.join(args.workdir, data_name, name)
  shutil.rmtree(root, ignore_errors=True)
  spec = {
    'model': name,
    'data': split_dir,
    'workdir': os.path.join(root, 'torchfm'),
    'config': config.to_dict(),
  }
  os.makedirs(root, exist_ok=True)
  spec_path = os.path.join(root, 'spec.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f, default=list)
  torch = launch(
    ['-m', 'benchmarks.time_to_auc', f'--torch_worker={spec_path}'],
    spec['workdir'],
  )
  base = summary(torch, float('inf'))
  target = base['best_valid_auc']
  base['seconds_to_target'] = time_to(torch, target)
  records = [dict(model=name, data=data_name, run='torchfm', **base)]
  for optimizer in args.optimizers:
    jit_cache = os.path.join(root, f'jax_cache_{optimizer}')
    for when in ('cold', 'warm'):
      workdir = os.path.join(root, f'flax_{optimizer}_{when}')
      argv = main_argv(name, optimizer, workdir, data_flags(data_name, args))
      run = launch(argv, workdir, {'JAX_COMPILATION_CACHE_DIR': jit_cache})
      record = dict(
        model=name, data=data_name, run=f'{optimizer} {when}'
      ) | summary(run, target)
      ours, theirs = record['seconds_to_target'], base['seconds_to_target']
      record['speedup'] = theirs / ours if ours and theirs else None
      records.append(record)
      print(json.dumps(record), flush=True)
  return records


def markdown(records: list[dict], info: dict, command: str) -> str:
  header = [
    'model',
    'data',
    'run',
    'best valid AUC',
    'test AUC',
    'epochs',
    's to torchfm best',
    'speedup',
    's in all',
  ]
  rows = [
    [
      r['model'],
      r['data'],
      r['run'],
      common.fmt(r['best_valid_auc'], '.4f'),
      common.fmt(r['test_auc'], '.4f'),
      r['epochs'],
      common.fmt(r['seconds_to_target'], '.1f', 'never'),
      common.fmt(
        r.get('speedup'), '.2f', '-' if r['run'] == 'torchfm' else 'n/a'
      ),
      common.fmt(r['seconds_total'], '.1f'),
    ]
    for r in records
  ]
  note = (
    'Seconds from the launch of each process to the end of the first'
    " validation whose AUC reaches torchfm's best (imports, data loading,"
    " compilation, evaluation and checkpoints included); speedup: torchfm's"
    ' seconds / ours. cold: empty JAX compilation cache; warm: the cache the'
    ' cold run filled.'
  )
  return '\n\n'.join(
    [
      f'`{command}`',
      common.markdown_table(header, rows),
      note,
      common.machine_line(info),
    ]
  )


def main_argv(
  name: str, optimizer: str, workdir: str, flags: Sequence[str]
) -> list[str]:
  """`main.py`'s arguments for config `name` with `optimizer` ('config':
  the config's own, no flag)."""
  chosen = [] if optimizer == 'config' else [f'--config.optimizer={optimizer}']
  return [
    'main.py',
    f'--config=configs/{name}.py',
    f'--workdir={workdir}',
    *chosen,
    *flags,
  ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog='python -m benchmarks.time_to_auc',
    description=__doc__.split('\n')[0],
  )
  parser.add_argument(
    '--models', default='fm', help="a,b,c, or all (torchfm's models)"
  )
  parser.add_argument('--data', default='embedded', help=','.join(DATA))
  parser.add_argument('--criteo', default='', help='a Criteo-format file')
  parser.add_argument('--ml20m', default='', help='an ML-20M ratings.csv')
  parser.add_argument(
    '--optimizers',
    default='config',
    help="a,b: 'config' (each config's own) or optim.NAMES",
  )
  parser.add_argument('--workdir', default='', help='runs (default: temp)')
  parser.add_argument('--cache_dir', default='', help='dataset cache')
  parser.add_argument('--out_dir', default=common.RESULTS)
  parser.add_argument('--out_name', default='time_to_auc')
  parser.add_argument('--torch_worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.data = args.data.split(',')
  args.optimizers = args.optimizers.split(',')
  for name in args.data:
    if name not in DATA:
      parser.error(f'--data: {name!r} is not one of {", ".join(DATA)}')
  for name in FILE_DATA:
    path = getattr(args, name)
    if name in args.data and not path:
      parser.error(f'--data={name} needs --{name}=FILE')
    if path and name not in args.data:  # Else silently not measured.
      parser.error(f'--{name} is read with --data={name} only; add it')
  import config_check  # pylint: disable=g-import-not-at-top

  known = ('config', *config_check.OPTIMIZERS)  # optim.NAMES, without JAX.
  for name in args.optimizers:
    if name not in known:
      parser.error(f'--optimizers: {name!r} is not one of {", ".join(known)}')
  common.check_dir(args.out_dir, '--out_dir')
  common.check_dir(args.workdir, '--workdir')
  return args


@common.user_errors()
def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  if args.torch_worker:
    torch_worker(args.torch_worker)
    return []
  for name in FILE_DATA:
    path = getattr(args, name)
    if path and not os.path.isfile(path):
      raise SystemExit(f'--{name}={path}: no such file.')
  if not common.torch_available():
    raise SystemExit(
      'torch and torchfm are needed: pip install torch==2.13.0 torchfm==0.7.0'
    )
  models = common.parse_models(args.models)
  if args.models == 'all':  # The models torchfm has.
    models = [m for m in models if common.has_torchfm(m)]
  missing = [m for m in models if not common.has_torchfm(m)]
  if missing:
    raise SystemExit(f'torchfm has no {", ".join(missing)}')
  with common.workdir_or_temp(args.workdir, 'flax_fm_time_to_auc-') as workdir:
    args.workdir = workdir
    return run_all(models, args, argv)


def run_all(
  models: Sequence[str], args: argparse.Namespace, argv: Sequence[str] | None
) -> list[dict]:
  """Times every model on every dataset; writes the results after each.

  A user error, of the data read here or of a run of main.py, names the
  flags of this tool that set the config values it names (`data_keys`).
  """
  import utils  # pylint: disable=g-import-not-at-top

  info = common.machine_info()
  command = common.command_line('time_to_auc', argv)
  records = []
  for data_name in args.data:
    split_dir = os.path.join(args.workdir, data_name, 'split')
    try:
      write_split(data_name, args, split_dir)
      for name in models:
        records += run_one(name, data_name, args, split_dir)
        common.write_results(
          args.out_dir, args.out_name, records, info, markdown, command
        )
    except utils.UserError as e:
      message = common.with_flags(str(e), data_keys(data_name))
      raise utils.UserError(message) from e
  return records


if __name__ == '__main__':
  main()
