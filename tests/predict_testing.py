"""Shared by the predict and export tests: a tiny run trained on raw rows.

`trained_run()` trains FM for one epoch on a small Criteo-format file, once
per process, and returns what the tests compare with: the raw lines of each
split in the cache's order, the dataset, the test metrics and a reference
`model.apply`.
"""

import dataclasses
import functools
import os
import subprocess
import sys
import tempfile

from dataset_testing import criteo_rows
from dataset_testing import write_lines
import jax
import ml_collections
import numpy as np
import script_runs

import best_reader
from configs import fm
import data
import encoder
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run and its raw data.

  Attributes:
    workdir: the run's directory (encoder and checkpoints).
    config: its config.
    dataset: its encoded dataset.
    lines: per split, its raw lines (str, without newline) in the cache's
      row order.
    test_metrics: what `train_and_evaluate` returned.
    probabilities: `ids -> sigmoid(model.apply(best variables, ids))`.
  """

  workdir: str
  config: ml_collections.ConfigDict
  dataset: data.Dataset
  lines: dict[str, list[str]]
  test_metrics: dict
  probabilities: object


def criteo_config(path: str, cache_dir: str) -> ml_collections.ConfigDict:
  """FM's smoke config, shrunk to a few steps on Criteo file `path`."""
  config = fm.get_config('smoke')
  config.model = ml_collections.ConfigDict({'embed_dim': 4})
  config.dataset.name = 'criteo'
  config.dataset.path = path
  config.dataset.cache_dir = cache_dir
  config.dataset.min_count = 2
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 1
  config.log_every_steps = 5
  config.progress_bar = False
  return config


def train_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`train_and_evaluate`, then the encoder if the trainer did not save it."""
  metrics = train.train_and_evaluate(config, workdir)
  if not os.path.exists(os.path.join(workdir, 'encoder', 'encoder.json')):
    encoder.save(workdir, data.load_dataset(config.dataset), config)
  return metrics


def unseen_line(names, mask: np.ndarray) -> str:
  """predict.py's log line for `mask` `[rows, fields]`, True where a value
  was not kept in training, of the fields `names`."""
  per_field = ', '.join(
    f'{name} {n}' for name, n in zip(names, mask.sum(0), strict=True) if n
  )
  return (
    f'{mask.any(1).sum()} of {len(mask)} rows have values that training did'
    f" not keep, scored with the field's out-of-vocabulary id: {per_field}"
  )


def split_lines(lines: list[str], config) -> dict[str, list[str]]:
  """Raw lines of each split of a streamed random split, in cache order."""
  parts = data.split_indices(len(lines), config.dataset.split, 0)
  return {
    split: [lines[i] for i in np.sort(part)]
    for split, part in zip(data.SPLITS, parts, strict=True)
  }


@functools.cache
def trained_run() -> Run:
  """The tiny run of this process (trained on first use)."""
  tmp = tempfile.mkdtemp(prefix='predict_testing_')
  rows = criteo_rows(1500, seed=11)
  path = write_lines(os.path.join(tmp, 'train.txt'), rows, '\t')
  config = criteo_config(path, os.path.join(tmp, 'cache'))
  workdir = os.path.join(tmp, 'run')
  metrics = train_run(config, workdir)
  dataset = data.load_dataset(config.dataset)
  model = train.create_model(config, dataset.field_dims)
  state, _ = best_reader.load_best(workdir)
  variables = {'params': state['params']}

  @jax.jit
  def probabilities(ids):
    return jax.nn.sigmoid(model.apply(variables, ids, train=False))

  return Run(
    workdir=workdir,
    config=config,
    dataset=dataset,
    lines=split_lines(['\t'.join(r) for r in rows], config),
    test_metrics=metrics,
    probabilities=probabilities,
  )


def command_error(
  script: str, cwd: str, *flags: str, real: bool = False
) -> tuple[int, str]:
  """Runs `python <script> <flags>` (predict.py, export.py) as a user would,
  by `script_runs.run` (a fork of a server that imported the project), or
  with `real`, by `subprocess.run` (what a test can wrap: limits).

  Returns:
    The exit status and the last line of stderr; a traceback anywhere in
    stderr fails (ValueError) instead.
  """
  argv = [os.path.join(ROOT, script), *flags]
  if real:
    done = subprocess.run(
      [sys.executable, *argv], cwd=cwd, capture_output=True, text=True
    )
  else:
    done = script_runs.run(argv, cwd=cwd)
  if 'Traceback' in done.stderr:
    raise ValueError(done.stderr[-3000:])
  lines = done.stderr.strip().splitlines()
  return done.returncode, lines[-1] if lines else ''
