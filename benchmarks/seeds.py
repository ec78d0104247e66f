"""Test AUC across seeds: flax-fm against torchfm, mean and spread.

One seed moves a test AUC on ml-latest-small by up to 0.004, more than most
differences between two models or two libraries, so a comparison of one
seed each says little. For each model and seed this trains, on the same
seeded 8:1:1 split of the embedded data (`dataset.seed` 0, or
`--split_seed`; the seed moves initialisation, shuffling and dropout):

- `flax`: `train.train_and_evaluate` with configs/<model>.py, the `--set`
  overrides (e.g. `--set=model.linear_init=torch`, a run directory of their
  own) and `config.seed = seed`, as `python main.py --config.seed=<seed>`;
  torchfm takes the `dataset.*` ones among them (the same data);
- `torchfm`: torchfm's examples/main.py loop on our dense ids
  (`benchmarks.quality.train_torchfm`, `torch.manual_seed(seed)`), for the
  models torchfm has.

It reports each side's mean, sample standard deviation and every seed's test
AUC (of the best-validation state), the difference of the means with its
standard error, and each side's mean best validation AUC (what a config is
chosen on). A run whose workdir already holds its test result is read,
not trained again: an interrupted benchmark goes on where it stopped
(`--tiny`'s smoke runs have directories of their own).

  python -m benchmarks.seeds --models=fm,ipnn,opnn --seeds=0-9 \
    --workdir=/tmp/flax_fm_seeds

Results: benchmarks/results/<out_name>.{json,csv,md} (default seeds).
"""

import argparse
import ast
from collections.abc import Sequence
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks import quality

RUNS = ('flax', 'torchfm')


def parse_seeds(value: str) -> list[int]:
  """'0-9' or '0,1,2' (or a mix: '0-2,5') -> sorted distinct seeds."""
  seeds = set()
  for part in value.split(','):
    part = part.strip()
    if not part:
      continue
    first, _, last = part.partition('-')
    try:
      seeds.update(range(int(first), int(last or first) + 1))
    except ValueError:
      raise SystemExit(
        f'--seeds: {part!r} is not a seed or a range like 0-9.'
      ) from None
  if not seeds:
    raise SystemExit('--seeds: give at least one seed, e.g. 0-2.')
  return sorted(seeds)


def finished_aucs(workdir: str) -> tuple[float, float] | None:
  """(test AUC, best validation AUC) of a finished run in `workdir`, or None."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  records = quality.read_metrics(path)
  tests = [r['auc'] for r in records if r['split'] == 'test']
  valids = [r['auc'] for r in records if r['split'] == 'valid']
  return (tests[-1], max(valids)) if tests and valids else None


def run_overrides(run: str, overrides: dict) -> dict:
  """The `--set` overrides `run` trains with.

  flax-fm takes them all; torchfm keeps pytorch-fm's recipe but reads the
  same data, so it takes the `dataset.*` ones.
  """
  if run == 'flax':
    return overrides
  return {k: v for k, v in overrides.items() if k.startswith('dataset.')}


def resolved(config: Any, overrides: dict) -> dict:
  """The values `config` holds at the keys of `overrides`, canonical.

  Equal values, however typed, are equal here: a comma-separated string
  for a tuple is that tuple (`genres` and `('genres',)`), an integer for a
  float is that float (`1` and `1.0`), a list is a tuple.

  Args:
    config: the config with `overrides` applied (`common.get_config`).
    overrides: `{dotted.key: value}`, as `--set` gave them.
  """

  def canonical(value):
    if hasattr(value, 'to_dict'):  # A ConfigDict: a group of keys.
      value = value.to_dict()
    if isinstance(value, dict):
      return {k: canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
      return tuple(canonical(v) for v in value)
    return value

  values = {}
  for key in overrides:
    node = config
    for part in key.split('.'):
      node = node[part]
    values[key] = canonical(node)
  return values


# The characters of a run directory's name.
_NAME_CHARACTERS = r'A-Za-z0-9_.=,+-'


def _text(value: Any) -> str:
  """`value` as a run directory's name writes it: a string as itself, a
  tuple as its items separated by commas (`genres,` for one), else repr."""
  if isinstance(value, str):
    return value
  if isinstance(value, tuple):
    items = ','.join(_text(v) for v in value)
    return items + ',' if len(value) == 1 else items
  return repr(value)


def _read(text: str) -> Any:
  """The value that `_text` wrote as `text`, if it is one of its names.

  As `--set` reads a value (`common.parse_overrides`), a Python literal or
  else the string itself; with a comma, the tuple of such values.
  """
  if ',' in text:
    return tuple(_read(t) for t in text.removesuffix(',').split(','))
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _names(value: Any) -> bool:
  """Whether `_text(value)`, kept whole in a name, is read back as `value`.

  Only then can no other value share the name: its text has no character
  that a name drops, no `=` (the text of each `key=value` ends where the
  next `-key=` starts) and is read back as `value` itself, of its type
  (`repr`: the string `'1'` is not the integer `1`, nor `1.0` `1`).
  """
  text = _text(value)
  return (
    re.fullmatch(f'[{_NAME_CHARACTERS}]*', text) is not None
    and '=' not in text
    and repr(_read(text)) == repr(value)
  )


def run_dir(run: str, overrides: dict) -> str:
  """`run`, or `run-key=value-...` for a run with config overrides.

  A name that drops characters of a value (`dataset.path=/a/b.csv`:
  `dataset.path=ab.csv`), or that cannot be read back as the values
  otherwise, ends in `-` and a hash of the values, so that different
  values never share a directory, nor a finished result.

  Args:
    run: 'flax' or 'torchfm'.
    overrides: `{dotted.key: value}`, the values as the config holds them
      (`resolved`), so that equal values name one directory.
  """
  overrides = sorted(run_overrides(run, overrides).items())
  if not overrides:
    return run
  name = '-'.join(f'{k}={_text(v)}' for k, v in overrides)
  name = re.sub(f'[^{_NAME_CHARACTERS}]', '', name)
  plain = (
    re.fullmatch(r'[A-Za-z0-9_.]+', k) and _names(v) for k, v in overrides
  )
  if not all(plain):
    name += '-' + hashlib.sha256(repr(overrides).encode()).hexdigest()[:8]
  return f'{run}-{name}'


def run_seed(name: str, run: str, seed: int, args) -> tuple[float, float]:
  """(test, best valid) AUC of `run` of `name` with `seed` (trained if not)."""
  overrides = run_overrides(run, args.overrides)
  config = common.get_config(name, 'smoke' if args.tiny else None, overrides)
  workdir = os.path.join(
    args.workdir,
    name,
    f'split{args.split_seed}_s{seed}' if args.split_seed else f's{seed}',
    # Keyed by the values the config takes, not by how they were typed.
    run_dir(run, resolved(config, overrides))
    + ('-drop_last' if run == 'torchfm' and args.torch_drop_last else '')
    # A smoke run's result is not a finished run of the config.
    + ('-tiny' if args.tiny else ''),
  )
  aucs = finished_aucs(workdir)
  if aucs is not None:
    return aucs
  import data  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top

  config.seed = seed
  config.dataset.seed = args.split_seed  # Both libraries: the same split.
  config.progress_bar = False
  if args.cache_dir:
    config.dataset.cache_dir = args.cache_dir
  if run == 'flax':
    train.train_and_evaluate(config, workdir)
  else:
    dataset = data.load_dataset(config.dataset)
    splits, field_dims = quality.torchfm_data(config, dataset, raw=False)
    steps = 10 if args.tiny else 0
    if args.torch_drop_last:  # Whole batches only, as ours.
      steps = steps or len(splits['train'][0]) // config.batch_size
    quality.train_torchfm(name, config, splits, field_dims, workdir, steps)
  return finished_aucs(workdir)


def summarize(
  name: str,
  aucs: dict[str, list[float]],
  valid_aucs: dict[str, list[float]] | None = None,
) -> dict:
  """Mean, sample std and seeds of each run; difference of the means.

  Args:
    name: the model.
    aucs: test AUCs by run ('flax', 'torchfm'), one per seed.
    valid_aucs: best validation AUCs by run, one per seed (optional).
  """
  record = {'model': name}
  for run, values in (valid_aucs or {}).items():
    record[f'{run}_valid_auc'] = [float(v) for v in values]
    record[f'{run}_valid_mean'] = float(np.mean(values))
  for run, values in aucs.items():
    values = np.asarray(values, np.float64)
    record[f'{run}_test_auc'] = [float(v) for v in values]
    record[f'{run}_mean'] = float(values.mean())
    # One seed has no spread to estimate.
    record[f'{run}_std'] = (
      float(values.std(ddof=1)) if len(values) > 1 else None
    )
  if len(aucs) == 2:
    n = [len(v) for v in aucs.values()]
    record['difference'] = record['flax_mean'] - record['torchfm_mean']
    # Standard error of a difference of two independent means.
    stds = (record['flax_std'], record['torchfm_std'])
    record['difference_se'] = (
      None
      if None in stds
      else float(np.sqrt(stds[0] ** 2 / n[0] + stds[1] ** 2 / n[1]))
    )
  return record


def markdown(records: list[dict], info: dict, command: str) -> str:
  header = [
    'model',
    'seeds',
    'flax-fm test AUC, mean ± std',
    'torchfm (dense ids), mean ± std',
    'flax-fm - torchfm (± s.e.)',
    'best valid AUC, mean: flax-fm / torchfm',
  ]

  def spread(r, run):
    return f'{r[f"{run}_mean"]:.4f} ± {common.fmt(r[f"{run}_std"], ".4f", "-")}'

  rows = []
  for r in records:
    torch = spread(r, 'torchfm') if 'torchfm_mean' in r else '-'
    difference = (
      f'{r["difference"]:+.4f} (± {common.fmt(r["difference_se"], ".4f", "-")})'
      if 'difference' in r
      else '-'
    )
    rows.append(
      [
        r['model'],
        len(r['flax_test_auc']),
        spread(r, 'flax'),
        torch,
        difference,
        ' / '.join(
          common.fmt(r.get(f'{run}_valid_mean'), '.4f', '-') for run in RUNS
        ),
      ]
    )
  seeds = common.markdown_table(
    ['model', 'run', 'test AUC by seed'],
    [
      [r['model'], run, ' '.join(f'{a:.4f}' for a in r[f'{run}_test_auc'])]
      for r in records
      for run in RUNS
      if f'{run}_test_auc' in r
    ],
  )
  note = (
    "The config's data (ml-latest-small unless `--set=dataset.*` names"
    ' another), the same seeded split for every run; the seed moves'
    ' initialisation, shuffling and dropout. Test AUC of the'
    ' best-validation state; std: sample standard deviation over the seeds;'
    ' s.e.: standard error of the difference of the two means.'
  )
  return '\n\n'.join(
    [
      f'`{command}`',
      common.markdown_table(header, rows),
      seeds,
      note,
      common.machine_line(info),
    ]
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.seeds', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--models', default='all', help='all or a,b,c')
  parser.add_argument('--seeds', default='0-2', help="e.g. '0-9' or '0,3'")
  parser.add_argument(
    '--torch_seeds', default='', help="torchfm's seeds (default: --seeds)"
  )
  parser.add_argument(
    '--workdir',
    default='',
    help='runs; finished ones are reused (default: a new temp dir)',
  )
  parser.add_argument('--cache_dir', default='', help='dataset cache')
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    help="key=value for flax-fm's config (dotted keys); torchfm's is kept",
  )
  parser.add_argument(
    '--split_seed',
    type=int,
    default=0,
    help='dataset.seed: another 8:1:1 split, for both libraries',
  )
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument(
    '--torch_drop_last',
    action='store_true',
    help="torchfm without its last partial batch (DataLoader's drop_last)",
  )
  parser.add_argument('--tiny', action='store_true', help='smoke config')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument(
    '--out_name', default='seeds', help='results file name (no suffix)'
  )
  args = parser.parse_args(argv)
  args.overrides = common.parse_overrides(args.set, '--set')
  if 'dataset.seed' in args.overrides:
    raise SystemExit('--set=dataset.seed: give --split_seed instead.')
  args.seeds = parse_seeds(args.seeds)
  args.torch_seeds = (
    parse_seeds(args.torch_seeds) if args.torch_seeds else args.seeds
  )
  if args.out_dir is None:
    args.out_dir = os.path.join(common.RESULTS, 'tmp' if args.tiny else '')
  common.check_dir(args.out_dir, '--out_dir')
  common.check_dir(args.workdir, '--workdir')
  return args


@common.user_errors('--set', common.CACHE_DIR_FLAG)
def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  with common.workdir_or_temp(args.workdir, 'flax_fm_seeds-') as workdir:
    args.workdir = workdir
    return run_all(args, argv)


def run_all(args: argparse.Namespace, argv: Sequence[str] | None) -> list[dict]:
  """Runs every model of `args`; writes the results after each."""
  models = common.parse_models(args.models)
  for name in models:  # A bad --set stops the run before any training.
    for run in RUNS:
      common.get_config(name, None, run_overrides(run, args.overrides))
  with_torch = not args.no_torch and common.torch_available()
  if not with_torch:
    print('torchfm runs skipped (--no_torch, or torch/torchfm missing).')
  info = common.machine_info()
  command = common.command_line('seeds', argv)
  records = []
  for name in models:
    runs = [
      r
      for r in RUNS
      if r == 'flax' or (with_torch and common.has_torchfm(name))
    ]
    pairs = {
      run: [
        run_seed(name, run, seed, args)
        for seed in (args.seeds if run == 'flax' else args.torch_seeds)
      ]
      for run in runs
    }
    aucs = {run: [test for test, _ in p] for run, p in pairs.items()}
    valid = {run: [v for _, v in p] for run, p in pairs.items()}
    records.append(summarize(name, aucs, valid))
    print(json.dumps(records[-1]), flush=True)
    common.write_results(
      args.out_dir, args.out_name, records, info, markdown, command
    )
  return records


if __name__ == '__main__':
  common.run(main)
