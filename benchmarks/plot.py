"""Plots runs' metrics.jsonl: validation AUC and training loss per epoch/time.

  python -m benchmarks.plot WORKDIR [WORKDIR ...] --out=runs.png

Each WORKDIR is a training run's directory (or its metrics.jsonl), written by
`main.py` or by `benchmarks.quality` (which also writes torchfm's runs in the
same format). The figure has four panels: validation AUC and training loss,
against epoch and against wall time (`wall_time`, seconds since training
started; runs without it are left out of the time panels). A run's label is
`--labels` or its last two path components.

Needs matplotlib (`pip install matplotlib`), an optional dependency used by
this script only.
"""

from collections.abc import Sequence
import json
import math
import os

from benchmarks import common


def read_run(path: str) -> list[dict]:
  """The records of `path` (a workdir or a metrics.jsonl file).

  Raises:
    SystemExit: the file is missing or a line is not JSON (naming both).
  """
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise SystemExit(f'{path}: no such metrics file')
  records = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise SystemExit(f'{path}:{number}: not a JSON line ({e})') from e
  return records


def series(records: list[dict], split: str, key: str, x: str):
  """(xs, ys) of `key` on `split` lines against `x` (epoch or wall_time)."""
  points = [
    (r[x], r[key])
    for r in records
    if r.get('split') == split
    and isinstance(r.get(x), (int, float))
    and isinstance(r.get(key), (int, float))
    and math.isfinite(r[key])
  ]
  points.sort()
  return [p[0] for p in points], [p[1] for p in points]


def default_label(path: str) -> str:
  path = os.path.normpath(os.path.abspath(path))
  if os.path.basename(path) == 'metrics.jsonl':
    path = os.path.dirname(path)
  parent, name = os.path.split(path)
  return f'{os.path.basename(parent)}/{name}'


def plot(
  paths: Sequence[str],
  out: str,
  labels: Sequence[str] | None = None,
  title: str = '',
) -> str:
  """Draws the four panels for the runs in `paths` into the PNG `out`."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
      'benchmarks.plot needs matplotlib: pip install matplotlib'
    ) from e
  labels = list(labels or [default_label(p) for p in paths])
  if len(labels) != len(paths):
    raise SystemExit(
      f'--labels: {len(labels)} labels for {len(paths)} runs; give one per run.'
    )
  runs = [read_run(p) for p in paths]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  panels = [
    (axes[0, 0], 'valid', 'auc', 'epoch', 'validation AUC'),
    (axes[0, 1], 'valid', 'auc', 'wall_time', 'validation AUC'),
    (axes[1, 0], 'train', 'loss', 'epoch', 'training loss'),
    (axes[1, 1], 'train', 'loss', 'wall_time', 'training loss'),
  ]
  for ax, split, key, x, ylabel in panels:
    for label, records in zip(labels, runs, strict=True):
      xs, ys = series(records, split, key, x)
      if xs:
        ax.plot(xs, ys, marker='o', markersize=3, label=label)
    ax.set_xlabel('epoch' if x == 'epoch' else 'wall time (s)')
    ax.set_ylabel(ylabel)
    if x == 'wall_time':
      ax.set_xscale('log')
    else:
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize='small')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, out)
  return out


def main(argv: Sequence[str] | None = None) -> str:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.plot', description=__doc__.split('\n')[0]
  )
  parser.add_argument('workdirs', nargs='+', help='runs or metrics.jsonl')
  parser.add_argument('--out', default='runs.png', help='PNG to write')
  parser.add_argument(
    '--labels', default='', help='comma-separated, one per run'
  )
  parser.add_argument('--title', default='')
  args = parser.parse_args(argv)
  labels = [s.strip() for s in args.labels.split(',')] if args.labels else None
  out = plot(args.workdirs, args.out, labels, args.title)
  print(f'wrote {out}')
  return out


if __name__ == '__main__':
  common.run(main)
