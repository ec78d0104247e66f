"""Peak memory and time of pass 1's counting (`encode.Counts`).

python -m benchmarks.counts --chunks=300 --chunk_keys=100000

Pass 1 counts every field's keys; on a long-tailed field (Criteo's) the
distinct keys, not the lines, decide its memory. This feeds one `Counts`
`--chunks` chunks of `--chunk_keys` int64 keys: half from a Zipf law (the
frequent values), half drawn from 2**40 (values seen once), seeded. It
reports the distinct keys, the totals' final size and the peak of the
memory numpy allocated while counting (tracemalloc), and the seconds.
"""

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import encode  # noqa: E402  pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--chunks', type=int, default=300)
  parser.add_argument('--chunk_keys', type=int, default=100_000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  n = args.chunk_keys
  chunks = [
    np.where(
      rng.random(n) < 0.5, rng.zipf(1.1, n), rng.integers(0, 1 << 40, n)
    ).astype(np.int64)
    for _ in range(args.chunks)
  ]
  tracemalloc.start()
  base = tracemalloc.get_traced_memory()[0]
  start = time.perf_counter()
  counts = encode.Counts()
  for keys in chunks:
    counts.add(keys)
  counts.kept(10)
  seconds = time.perf_counter() - start
  current, peak = tracemalloc.get_traced_memory()
  print(
    f'{args.chunks * n:,} keys, {len(counts.keys):,} distinct: totals'
    f' {(current - base) / 2**20:,.0f} MiB, peak {(peak - base) / 2**20:,.0f}'
    f' MiB, {seconds:.1f} s'
  )


if __name__ == '__main__':
  main()
