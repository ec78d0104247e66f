"""Out-of-core preprocessing speed and peak memory, on synthetic CTR files.

python -m benchmarks.preprocess --format=criteo --lines=1000000,10000000

For each size it writes a synthetic file (benchmarks/synthetic.py, seeded)
under `--dir` unless it is already there, preprocesses it with
`data.load_dataset` in a fresh child process and an empty cache directory,
and reports wall time, lines/s, MiB/s, the child's own peak resident
memory (`VmHWM`) and that of its parsing processes together
(`config.dataset.parse_workers`, sampled from /proc; pages they share are
counted in each). `--parse_workers=0,2 --rounds=2` alternates the
settings, each round in that order. Results go to
`<out_dir>/preprocess_<format>.{json,md}` (default `benchmarks/results/`;
rows of other sizes and settings are kept). The synthetic file and the
cache are deleted afterwards unless `--keep` (10M Criteo lines are about
2.4 GB).
"""

from collections.abc import Sequence
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

from benchmarks import common

ROOT = common.ROOT

# Runs in the child: preprocess, then report what was made as JSON.
_CHILD = """
import json, time
import data
from configs import default
config = default.get_config().dataset
config.update(json.loads({overrides!r}))
start = time.perf_counter()
dataset = data.load_dataset(config)
with open('/proc/self/status') as f:  # Its own peak, not its workers'.
  hwm = next(l for l in f if l.startswith('VmHWM:')).split()[1]
print(json.dumps(dict(
  seconds=time.perf_counter() - start,
  peak_rss_mib=int(hwm) / 1024,
  examples=[len(dataset.train), len(dataset.valid), len(dataset.test)],
  field_dims_sum=int(sum(dataset.field_dims)),
)))
"""


def descendants_rss(pid: int) -> int:
  """Bytes resident in the processes descended from `pid` (not `pid`)."""
  parents, rss = {}, {}
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:  # Gone since the listing.
      continue
    parents[int(entry)] = int(fields[1])
    rss[int(entry)] = int(fields[21]) * os.sysconf('SC_PAGE_SIZE')
  found, frontier = set(), {pid}
  while frontier:
    frontier = {p for p, q in parents.items() if q in frontier} - found
    found |= frontier
  return sum(rss[p] for p in found)


def run_child(overrides: dict) -> dict:
  """Preprocesses in a fresh process; its result and peak RSS in MiB.

  Raises:
    utils.UserError: the child stopped on one (its message, one line).
    RuntimeError: the child failed otherwise (its traceback on stderr).
  """
  code = common.child_script(_CHILD.format(overrides=json.dumps(overrides)))
  start = time.perf_counter()
  child = subprocess.Popen(
    [sys.executable, '-c', code], stdout=subprocess.PIPE, text=True
  )
  peak, done = [0], threading.Event()

  def sample():  # The parsing processes' RSS, every 0.2 s.
    while not done.wait(0.2):
      peak[0] = max(peak[0], descendants_rss(child.pid))

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  out = child.stdout.read()
  child.wait()  # Its own peak RSS comes in `out`: wait4's counts workers.
  wall = time.perf_counter() - start
  done.set()
  sampler.join()
  child.stdout.close()
  result = common.child_result(child.returncode, out, 'preprocessing')
  result.update(
    workers_peak_rss_mib=peak[0] / 2**20,
    process_seconds=wall,
  )
  return result


def benchmark(
  fmt: str,
  lines: int,
  directory: str,
  keep: bool,
  chunk_rows: int,
  parse_workers: int = -1,
) -> dict:
  suffix = 'txt' if fmt == 'criteo' else 'csv'
  path = os.path.join(directory, f'{fmt}_{lines}.{suffix}')
  if not os.path.exists(path):
    # In a child too: a forked child's ru_maxrss starts from its parent's
    # resident size, so this process must stay small.
    subprocess.run(
      [sys.executable, '-m', 'benchmarks.synthetic', f'--format={fmt}']
      + [f'--lines={lines}', f'--out={path}'],
      check=True,
      cwd=ROOT,
    )
  cache = os.path.join(directory, f'cache_{fmt}_{lines}')
  shutil.rmtree(cache, ignore_errors=True)
  size = os.path.getsize(path)
  load = os.getloadavg()[0]
  try:
    result = run_child(
      dict(
        name=fmt,
        path=path,
        cache_dir=cache,
        chunk_rows=chunk_rows,
        parse_workers=parse_workers,
      )
    )
    cache_bytes = sum(
      os.path.getsize(os.path.join(d, f))
      for d, _, files in os.walk(cache)
      for f in files
    )
  finally:
    shutil.rmtree(cache, ignore_errors=True)
    if not keep:
      os.remove(path)
  seconds = result['seconds']
  return dict(
    format=fmt,
    lines=lines,
    file_mib=round(size / 2**20, 1),
    seconds=round(seconds, 1),
    lines_per_sec=round(lines / seconds),
    mib_per_sec=round(size / 2**20 / seconds, 1),
    peak_rss_mib=round(result['peak_rss_mib']),
    workers_peak_rss_mib=round(result['workers_peak_rss_mib']),
    cache_mib=round(cache_bytes / 2**20, 1),
    field_dims_sum=result['field_dims_sum'],
    chunk_rows=chunk_rows,
    parse_workers=parse_workers,
    machine=f'{platform.machine()}, {os.cpu_count()} CPUs',
    # Other work on the machine slows the timing (not the memory).
    load_average=round(load, 1),
    python=platform.python_version(),
  )


def write_results(fmt: str, rows: list[dict], out_dir: str) -> str:
  """Merges `rows` into `out_dir`/preprocess_<fmt>.json, rewrites the .md."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'preprocess_{fmt}.json')
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)

  def key(r):  # Rows older than parse_workers were parsed in one process.
    return r['lines'], r.get('parse_workers', 0)

  runs = {key(r) for r in rows}
  merged = sorted([r for r in old if key(r) not in runs] + rows, key=key)
  with open(path, 'w') as f:
    json.dump(merged, f, indent=1)
  lines = [
    f'# Preprocessing synthetic {fmt} files (two passes, out of core)',
    '',
    f'`python -m benchmarks.preprocess --format={fmt}'
    f' --lines={",".join(str(n) for n in sorted({r["lines"] for r in merged}))}'
    f' --parse_workers={",".join(sorted({str(key(r)[1]) for r in merged}))}`',
    '',
    '| lines | `parse_workers` | file MiB | seconds | lines/s | MiB/s |'
    ' peak RSS MiB | parsing processes: peak RSS MiB | cache MiB |'
    ' sum of field_dims | load average |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in merged:
    lines.append(
      f'| {r["lines"]:,} | {r.get("parse_workers", 0)} | {r["file_mib"]:,} |'
      f' {r["seconds"]:,} | {r["lines_per_sec"]:,} | {r["mib_per_sec"]} |'
      f' {r["peak_rss_mib"]:,} | {r.get("workers_peak_rss_mib", "")} |'
      f' {r["cache_mib"]:,} |'
      f' {r["field_dims_sum"]:,} | {r.get("load_average", "")} |'
    )
  lines += ['', f'Machine: {merged[-1]["machine"]}.', '']
  md = os.path.join(out_dir, f'preprocess_{fmt}.md')
  with open(md, 'w') as f:
    f.write('\n'.join(lines))
  return md


@common.user_errors()
def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.preprocess', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--format', choices=('criteo', 'avazu'), default='criteo')
  parser.add_argument(
    '--lines', default='1000000,10000000', help='comma-separated sizes'
  )
  parser.add_argument('--dir', default='/tmp/flax_fm_preprocess')
  parser.add_argument('--chunk_rows', type=int, default=100_000)
  parser.add_argument(
    '--parse_workers', default='-1', help='comma-separated settings'
  )
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--keep', action='store_true', help='keep the files')
  parser.add_argument(
    '--no_write', action='store_true', help='do not write the results'
  )
  parser.add_argument(
    '--out_dir', default=common.RESULTS, help='default: benchmarks/results/'
  )
  args = parser.parse_args(argv)
  # Bad values stop here, in a line, before any file is written.
  sizes = common.parse_ints(args.lines, '--lines')
  # config.dataset.parse_workers: -1 (by the cores and size), 0 (none), n.
  settings = common.parse_ints(args.parse_workers, '--parse_workers', -1)
  common.check_least(args, {'chunk_rows': 1, 'rounds': 1})
  common.check_dir(args.dir, '--dir')
  common.check_dir(args.out_dir, '--out_dir')
  os.makedirs(args.dir, exist_ok=True)
  rows = []
  for lines in sizes:
    runs = [w for _ in range(args.rounds) for w in settings]
    for i, workers in enumerate(runs):
      keep = args.keep or i < len(runs) - 1  # The file, for the next run.
      row = benchmark(
        args.format, lines, args.dir, keep, args.chunk_rows, workers
      )
      print(json.dumps(row), flush=True)
      rows.append(row)
  if not args.no_write:
    print(write_results(args.format, rows, args.out_dir), file=sys.stderr)
  return rows


if __name__ == '__main__':
  common.run(main)
