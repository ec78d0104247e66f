"""Prediction speed and peak memory on synthetic Criteo-format files.

python -m benchmarks.predict --lines=100000,1000000

Trains a small FM run (one epoch on `--train_lines` synthetic lines, seed 1)
unless `--workdir` names a finished run, writes a synthetic Criteo file of
each size (benchmarks/synthetic.py, seed 0: mostly unseen values, as new
data is), and scores it with `predict_output.write_predictions` in a fresh
child process: rows/s of the whole file (parsing, encoding, the model, writing
the CSV) and the child's peak resident memory (`ru_maxrss`), which must not
grow with the file. Results go to `<out_dir>/predict.{json,md}` (default
`benchmarks/results/`).
"""

from collections.abc import Sequence
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from benchmarks import common

ROOT = common.ROOT

_TRAIN = """
from configs import fm
import data, encoder, train
config = fm.get_config()
config.dataset.name = 'criteo'
config.dataset.path = {path!r}
config.dataset.cache_dir = {cache!r}
config.num_epochs = 1
config.progress_bar = False
train.train_and_evaluate(config, {workdir!r})
encoder.save({workdir!r}, data.load_dataset(config.dataset), config)
"""

_PREDICT = """
import json, time
import jax
import predict
import predict_output
start = time.perf_counter()
predictor = predict.load({workdir!r})
loaded = time.perf_counter()
rows = predict_output.write_predictions(
  predictor, {path!r}, {output!r}, chunk_rows={chunk_rows}
)
done = time.perf_counter()
print(json.dumps(dict(
  rows=rows, load_seconds=loaded - start, seconds=done - loaded,
  devices=jax.local_device_count(),
)))
"""


def _synthetic(path: str, lines: int, seed: int) -> str:
  if not os.path.exists(path):
    subprocess.run(
      [sys.executable, '-m', 'benchmarks.synthetic', '--format=criteo']
      + [f'--lines={lines}', f'--out={path}', f'--seed={seed}'],
      check=True,
      cwd=ROOT,
    )
  return path


def least_train_lines() -> int:
  """The fewest `--train_lines` whose training split holds one batch.

  The run that `_TRAIN` trains stops on fewer (`common.least_lines`).
  """
  return common.least_lines(common.get_config('fm'))


def run_child(code: str) -> tuple[dict | None, float, float]:
  """Runs `code` in a fresh Python: its last JSON line, peak RSS (MiB) and
  CPU seconds (user + system, all threads).

  Raises:
    utils.UserError: the child stopped on one (its message, one line).
    RuntimeError: the child failed otherwise (its traceback on stderr).
  """
  child = subprocess.Popen(
    [sys.executable, '-c', common.child_script(code)],
    stdout=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  out = child.stdout.read()
  _, status, usage = os.wait4(child.pid, 0)
  child.stdout.close()
  code = os.waitstatus_to_exitcode(status)
  result = common.child_result(code, out, 'child')
  cpu = usage.ru_utime + usage.ru_stime
  return result, usage.ru_maxrss / 1024, cpu  # ru_maxrss: KiB on Linux.


def benchmark(
  workdir: str, lines: int, directory: str, chunk_rows: int, keep: bool
) -> dict:
  path = _synthetic(os.path.join(directory, f'criteo_{lines}.txt'), lines, 0)
  output = os.path.join(directory, f'predictions_{lines}.csv')
  size = os.path.getsize(path)
  load = os.getloadavg()[0]
  try:
    result, rss, cpu = run_child(
      _PREDICT.format(
        workdir=workdir,
        path=path,
        output=output,
        chunk_rows=chunk_rows,
      )
    )
  finally:
    if os.path.exists(output):
      os.remove(output)
    if not keep:
      os.remove(path)
  return dict(
    lines=lines,
    file_mib=round(size / 2**20, 1),
    rows=result['rows'],
    seconds=round(result['seconds'], 1),
    rows_per_sec=round(result['rows'] / result['seconds']),
    load_seconds=round(result['load_seconds'], 1),
    # The whole child's CPU time, start-up included: on a loaded machine
    # rows per CPU second says more than rows per second.
    cpu_seconds=round(cpu, 1),
    rows_per_cpu_sec=round(result['rows'] / cpu),
    peak_rss_mib=round(rss),
    chunk_rows=chunk_rows,
    devices=result['devices'],
    machine=f'{platform.machine()}, {os.cpu_count()} CPUs',
    # Other work on the machine slows the timing (not the memory).
    load_average=round(load, 1),
    python=platform.python_version(),
  )


def write_results(rows: list[dict], out_dir: str, command: str) -> str:
  """Writes `out_dir`/predict.json and predict.md.

  Args:
    rows: one dict per file size (`benchmark`).
    out_dir: where the files go.
    command: the command that ran the benchmark (`common.command_line`).
  """
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'predict.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  lines = [
    '# predict.py on synthetic Criteo files (FM, raw rows to CSV)',
    '',
    f'`{command}`',
    '',
    'Rows/s covers the whole file: parsing, encoding, the model and writing'
    ' the CSV (restoring the run is `load s`, apart). CPU s is the whole'
    " child's CPU time (start-up and threads included); rows per CPU second"
    ' is less sensitive than rows/s to other work on the machine.',
    '',
    '| rows | seconds | rows/s | load s | CPU s | rows/CPU s | peak RSS MiB |'
    ' chunk rows | devices | load average |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    lines.append(
      f'| {r["rows"]:,} | {r["seconds"]:,} | {r["rows_per_sec"]:,} |'
      f' {r["load_seconds"]} | {r["cpu_seconds"]} |'
      f' {r["rows_per_cpu_sec"]:,} | {r["peak_rss_mib"]:,} |'
      f' {r["chunk_rows"]:,} | {r["devices"]} | {r["load_average"]} |'
    )
  lines += ['', f'Machine: {rows[-1]["machine"]}.', '']
  md = os.path.join(out_dir, 'predict.md')
  with open(md, 'w') as f:
    f.write('\n'.join(lines))
  return md


@common.user_errors()
def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.predict', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--lines', default='100000,1000000', help='sizes')
  parser.add_argument('--dir', default='/tmp/flax_fm_predict')
  parser.add_argument('--workdir', default='', help='a finished Criteo run')
  parser.add_argument('--train_lines', type=int, default=200_000)
  parser.add_argument('--chunk_rows', type=int, default=100_000)
  parser.add_argument('--keep', action='store_true', help='keep the files')
  parser.add_argument('--no_write', action='store_true')
  parser.add_argument(
    '--out_dir', default=common.RESULTS, help='default: benchmarks/results/'
  )
  args = parser.parse_args(argv)
  # Bad values stop here, in a line, before any file is written.
  sizes = common.parse_ints(args.lines, '--lines')
  common.check_least(args, {'train_lines': 1, 'chunk_rows': 1})
  if args.workdir and not os.path.isdir(os.path.join(args.workdir, 'encoder')):
    raise SystemExit(
      f'--workdir={args.workdir}: not a finished run (no encoder/); give the'
      ' workdir of a finished Criteo run, or none to train one.'
    )
  workdir = args.workdir or os.path.join(args.dir, 'run')
  trains = not os.path.isdir(os.path.join(workdir, 'encoder'))
  if trains:  # Fewer lines than a batch of training: the run would stop.
    common.check_least(args, {'train_lines': least_train_lines()})
  common.check_dir(args.dir, '--dir')
  common.check_dir(args.out_dir, '--out_dir')
  os.makedirs(args.dir, exist_ok=True)
  if trains:
    shutil.rmtree(workdir, ignore_errors=True)
    train = _synthetic(
      os.path.join(args.dir, 'train.txt'), args.train_lines, seed=1
    )
    start = time.perf_counter()
    run_child(
      _TRAIN.format(
        path=train,
        cache=os.path.join(args.dir, 'cache'),
        workdir=workdir,
      )
    )
    print(f'trained {workdir} in {time.perf_counter() - start:.0f} s')
  rows = []
  for lines in sizes:
    row = benchmark(workdir, lines, args.dir, args.chunk_rows, args.keep)
    print(json.dumps(row), flush=True)
    rows.append(row)
  if not args.no_write:
    command = common.command_line('predict', argv)
    print(write_results(rows, args.out_dir, command), file=sys.stderr)
  return rows


if __name__ == '__main__':
  common.run(main)
