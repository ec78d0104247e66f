"""Peak memory and time of pass 1's counting (`encode.Counts`).

python -m benchmarks.counts --chunks=300 --chunk_keys=100000

Pass 1 counts every field's keys; on a long-tailed field (Criteo's) the
distinct keys, not the lines, decide its memory. This feeds one `Counts`
`--chunks` chunks of `--chunk_keys` int64 keys: half from a Zipf law (the
frequent values), half drawn from 2**40 (values seen once), seeded. It
reports the distinct keys, the totals' final size and the peak of the
memory numpy allocated while counting (tracemalloc), and the seconds.
"""

import time
import tracemalloc

import numpy as np

from benchmarks import common
from datasets import encode


def key_chunks(chunks: int, chunk_keys: int, seed: int) -> list[np.ndarray]:
  """`chunks` int64 arrays `[chunk_keys]`: half Zipf, half from 2**40."""
  rng = np.random.default_rng(seed)
  n = chunk_keys
  return [
    np.where(
      rng.random(n) < 0.5, rng.zipf(1.1, n), rng.integers(0, 1 << 40, n)
    ).astype(np.int64)
    for _ in range(chunks)
  ]


def measure(chunks: list[np.ndarray]) -> dict:
  """Counts `chunks` with one `encode.Counts`: distinct keys, MiB, seconds."""
  tracemalloc.start()
  try:
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    counts = encode.Counts()
    for keys in chunks:
      counts.add(keys)
    counts.kept(10)
    seconds = time.perf_counter() - start
    current, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  return dict(
    keys=sum(len(c) for c in chunks),
    distinct=len(counts.keys),
    totals_mib=(current - base) / 2**20,
    peak_mib=(peak - base) / 2**20,
    seconds=seconds,
  )


def main() -> None:
  parser = common.ArgumentParser(
    prog='python -m benchmarks.counts', description=__doc__.splitlines()[0]
  )
  parser.add_argument('--chunks', type=int, default=300)
  parser.add_argument('--chunk_keys', type=int, default=100_000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  r = measure(key_chunks(args.chunks, args.chunk_keys, args.seed))
  print(
    f'{r["keys"]:,} keys, {r["distinct"]:,} distinct: totals'
    f' {r["totals_mib"]:,.0f} MiB, peak {r["peak_mib"]:,.0f} MiB,'
    f' {r["seconds"]:.1f} s'
  )


if __name__ == '__main__':
  common.run(main)
