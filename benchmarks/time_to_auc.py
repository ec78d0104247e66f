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

A file too small for one batch of training stops before any run
(`check_rows`); a user error of the data, of main.py or of the torchfm
process stops in one line that names this tool's flags (`in_tool_terms`).

Results: benchmarks/results/time_to_auc.{json,csv,md}.
"""

import argparse
from collections.abc import Sequence
import json
import os
import re
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


def data_source(name: str, args) -> str:
  """Data set `name` as this tool's user gives it, for messages."""
  if name in FILE_DATA:
    return f'--{name}={getattr(args, name)}'
  return 'the embedded ml-latest-small'


def count_rows(path: str, header: bool, stop: int) -> int:
  """The examples of data file `path`, counted up to `stop`.

  Its non-blank lines (`.gz` read decompressed), but a first line that is
  a header (`header`: one that starts with no digit).
  """
  from datasets import streaming  # pylint: disable=g-import-not-at-top

  rows = 0
  for number, line in enumerate(streaming.text_lines(path)):
    if not line.strip() or (header and not number and not line[:1].isdigit()):
      continue
    rows += 1
    if rows >= stop:
      break
  return rows


def check_rows(name: str, path: str, models: Sequence[str]) -> None:
  """Stops, before any run, on a file too small for the runs of `models`.

  Each run splits the file's rows by its config's `dataset.split`, and one
  whose training split is smaller than its `batch_size` stops (main.py), at
  the earliest after torchfm's whole run; the file is counted up to the
  most rows any of `models` needs (`common.least_lines`).

  Raises:
    SystemExit: the file holds fewer rows, naming its flag, the least and
      the config that needs them.
    utils.UserError: the file cannot be read.
  """
  least, model = max(
    (common.least_lines(common.get_config(m)), m) for m in models
  )
  import utils  # pylint: disable=g-import-not-at-top

  try:
    rows = count_rows(path, header=name == 'ml20m', stop=least)
  except utils.UserError as e:  # E.g. a truncated `.gz`.
    raise utils.UserError(in_tool_terms(str(e), name)) from e
  if rows < least:
    config = common.get_config(model)
    raise SystemExit(
      f'--{name}={path}: {rows} rows; give at least {least}, so that the'
      f' training split ({config.dataset.split[0]:.0%} of the rows) holds one'
      f' batch of configs/{model}.py ({config.batch_size} rows).'
    )


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


def check_splits(splits: dict, spec: dict) -> None:
  """Refuses, before torchfm trains, splits it cannot train or score.

  Args:
    splits: `{split: (ids, labels)}`, as `torch_worker` reads them.
    spec: the worker's spec: `source`, the data as this tool's user gave
      it (`--criteo=FILE`), `model` and `config`.

  Raises:
    utils.UserError: the training split is smaller than one batch, or the
      validation or test split lacks a class (its AUC is undefined): naming
      `source`, the fixed values and what to change.
  """
  import utils  # pylint: disable=g-import-not-at-top

  batch = spec['config']['batch_size']
  fractions = spec['config']['dataset']['split']
  train = len(splits['train'][1])
  if train < batch:
    raise utils.UserError(
      f'{spec["source"]}: its training split ({fractions[0]:.0%} of the'
      f' rows) holds {train} rows, fewer than one batch of'
      f' configs/{spec["model"]}.py ({batch}); give a larger file.'
    )
  for name, split, fraction in (
    ('validation', 'valid', fractions[1]),
    ('test', 'test', fractions[2]),
  ):
    labels = splits[split][1]
    positives = int(np.count_nonzero(np.asarray(labels) > 0.5))
    negatives = len(labels) - positives
    if not (positives and negatives):
      raise utils.UserError(
        f'{spec["source"]}: its {name} split ({fraction:.0%} of the rows) has'
        f' {positives} positive and {negatives} negative examples, and its'
        ' AUC is undefined without both classes; give a file with more rows'
        ' of each label.'
      )


def torch_worker(spec_path: str) -> None:
  """The torchfm process: reads the split, trains, writes metrics.jsonl.

  Raises:
    utils.UserError: the split cannot train or be scored (`check_splits`).
  """
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
  check_splits(splits, spec)
  with open(os.path.join(spec['data'], 'field_dims.json')) as f:
    field_dims = tuple(json.load(f))
  config = ml_collections.ConfigDict(spec['config'])
  quality.train_torchfm(
    spec['model'], config, splits, field_dims, spec['workdir']
  )


def worker_argv(spec_path: str) -> list[str]:
  """`python`'s arguments of the torchfm process of `spec_path`.

  A `common.child_script`: a user error that stops it comes back to
  `launch` as one (`common.child_result`), not as a traceback.
  """
  code = (
    'from benchmarks import time_to_auc\n'
    f'time_to_auc.torch_worker({spec_path!r})\n'
  )
  return ['-c', common.child_script(code)]


def launch(
  argv: list[str],
  workdir: str,
  env: dict | None = None,
  what: str | None = None,
) -> dict:
  """Runs `python argv` from the repository root; its launch time and lines.

  Args:
    argv: `python`'s arguments.
    workdir: where the process writes its `metrics.jsonl`.
    env: variables added to this process's environment.
    what: the process, for the message of a failure (default: `argv`).

  Raises:
    utils.UserError: `main.py` stopped on a user error (status 2 and its
      one line, `main.py: error: <message>`), or a `common.child_script`
      (`worker_argv`) on one: the message, which `common.user_errors` shows
      as one line.
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
  if result.returncode and argv[:1] == ['-c']:
    try:  # A child script's user error: raised; any other failure: below.
      common.child_result(result.returncode, result.stdout, '')
    except RuntimeError:
      pass
  if result.returncode:
    tail = '\n'.join(result.stderr.splitlines()[-15:])
    raise RuntimeError(f'{what or " ".join(argv)} failed:\n{tail}')
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
    'source': data_source(data_name, args),
    'data': split_dir,
    'workdir': os.path.join(root, 'torchfm'),
    'config': config.to_dict(),
  }
  os.makedirs(root, exist_ok=True)
  spec_path = os.path.join(root, 'spec.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f, default=list)
  torch = launch(
    worker_argv(spec_path), spec['workdir'], what='the torchfm process'
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
  parser = common.ArgumentParser(
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
  for name in FILE_DATA:  # Before torchfm's run, not after it.
    if name in args.data:
      check_rows(name, getattr(args, name), models)
  with common.workdir_or_temp(args.workdir, 'flax_fm_time_to_auc-') as workdir:
    args.workdir = workdir
    return run_all(models, args, argv)


def run_all(
  models: Sequence[str], args: argparse.Namespace, argv: Sequence[str] | None
) -> list[dict]:
  """Times every model on every dataset; writes the results after each.

  A user error, of the data read here or of a run of main.py or torchfm,
  names the flags of this tool, not config keys (`in_tool_terms`).
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
      raise utils.UserError(in_tool_terms(str(e), data_name)) from e
  return records


def in_tool_terms(message: str, data_name: str) -> str:
  """A user error of data set `data_name` as this tool's user can act on it.

  The config keys that flags of this tool set are named as those flags
  (`data_keys`); any other key it names, which no flag of this tool sets,
  is said to be the config's, fixed here.
  """
  message = common.with_flags(message, data_keys(data_name))
  keys = re.findall(r'(?<![\w.-])(?:--)?config((?:\.\w+)+)', message)
  if not keys:
    return message
  named = ', '.join(dict.fromkeys(f'config{k}' for k in keys))
  return (
    f'{message} (No flag of this tool sets {named}: it runs each'
    ' configs/<model>.py as it is; its flags change the data: --data,'
    ' --criteo, --ml20m, --cache_dir.)'
  )


if __name__ == '__main__':
  common.run(main)
