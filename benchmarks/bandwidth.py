"""How far a training step is from the machine's memory bandwidth and FLOPs.

A CTR step on big tables is bound by memory traffic, not arithmetic: it
gathers the rows of the batch, writes their gradients, and updates the
optimizer's state. `copy_bandwidth` measures what this machine moves (a
numpy copy, read and write counted), `step_bytes` counts what a step must
touch at the least with each optimizer, and their ratio is the fastest step
the memory allows.

A step with large dense layers (AutoInt's attention) can be bound by
arithmetic instead: `matmul_rate` measures the floating-point operations
per second of XLA's fastest kind of work, a large square f32 matrix
product, and `compiled_cost` counts those of a compiled step (XLA's cost
analysis); their ratio is the fastest step the arithmetic allows. The same
analysis counts the bytes the compiled step moves, intermediates included,
which bound a step that crosses every pair of fields as XLA compiles it.

  python -m benchmarks.bandwidth      # prints both rates
"""

from collections.abc import Callable, Mapping, Sequence
import statistics
import time

import numpy as np

from benchmarks import common

# The clock of `_median_seconds`. A test replaces this one, not the time
# module's, which anything running meanwhile (a gc callback) may read.
_clock = time.perf_counter


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
  """The median wall time of `repeats` calls of `run`, after one untimed."""
  run()
  times = []
  for _ in range(repeats):
    start = _clock()
    run()
    times.append(_clock() - start)
  return statistics.median(times)


def copy_bandwidth(mib: int = 256, repeats: int = 7) -> float:
  """Bytes per second that `np.copyto` moves: the median of `repeats`.

  A copy of `mib` MiB reads and writes it; both count. The arrays are larger
  than any cache, and touched once before timing.
  """
  src = np.ones(mib * 2**20 // 8, np.float64)
  dst = np.empty_like(src)
  seconds = _median_seconds(lambda: np.copyto(dst, src), repeats)
  return 2 * src.nbytes / seconds


def step_bytes(
  leaves: Mapping[str, dict], optimizer: str, itemsize: int = 4
) -> dict[str, float]:
  """The least memory traffic of one training step, in bytes.

  Counted per parameter leaf, each read or write of a float once:
  - a dense leaf (any optimizer: Adam): its gradient, the parameter and
    two moments read, the parameter and moments written, `7 x size`;
  - a table's lookups: the gathered rows read and their gradients written,
    `2 x lookups x row`, plus, for the row-wise optimizers, the gradients
    read again and summed into one per distinct row;
  - a table's update: 'adam' forms the dense gradient (zeros, then the
    lookups added) and updates every row, `8 x size`; 'lazy_adam' reads and
    writes the distinct rows of the table and of both moments, `6 x rows
    read x row`; 'rowwise_adagrad' the rows of the table and one
    accumulator each, `2 x rows read x (row + 1 float)`.

  Args:
    leaves: by parameter path, `{'size': elements, 'rows': table rows (0:
      not a table), 'lookups': lookups per step, 'unique': distinct rows
      read per step}`.
    optimizer: 'adam', 'lazy_adam' or 'rowwise_adagrad'.
    itemsize: bytes per parameter.

  Returns:
    `{'dense': ..., 'lookups': ..., 'update': ..., 'total': ...}` bytes.
  """
  out = {'dense': 0.0, 'lookups': 0.0, 'update': 0.0}
  for leaf in leaves.values():
    size = leaf['size'] * itemsize
    if not leaf.get('rows'):
      out['dense'] += 7 * size
      continue
    row = size / leaf['rows']
    lookups, unique = leaf['lookups'] * row, leaf['unique'] * row
    out['lookups'] += 2 * lookups
    if optimizer == 'adam':
      out['update'] += 8 * size
    elif optimizer == 'lazy_adam':
      out['lookups'] += lookups + unique
      out['update'] += 6 * unique
    elif optimizer == 'rowwise_adagrad':
      out['lookups'] += lookups + unique
      out['update'] += 2 * (unique + leaf['unique'] * itemsize)
    else:
      raise ValueError(f'unknown optimizer {optimizer!r}')
  out['total'] = sum(out.values())
  return out


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of XLA's f32 `[size, size] @ [size, size]` on the default device.

  The median of `repeats` products after a warm-up, counted as
  `2 size^3` operations each. JAX is imported here, so that a process that
  only measures bandwidth does not load it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jnp.ones((size, size), jnp.float32)
  product = jax.jit(jnp.dot)
  seconds = _median_seconds(lambda: product(a, a).block_until_ready(), repeats)
  return 2 * size**3 / seconds


def compiled_cost(fn, *args) -> dict[str, float]:
  """Operations and memory traffic of `jax.jit(fn)(*args)`, by XLA.

  XLA's cost analysis of the compiled program: `flops` counts each matrix
  product's multiply-adds as two operations and each element of an
  elementwise operation as one (gathers and scatters count none); `bytes`
  counts every operand read and every result written by each (fused)
  operation, as if no cache held them: the traffic of the program as
  compiled, intermediates included, not the least a step must move. A
  loop's body is counted once, so `fn` should be one step. A `fn` already
  jitted is analysed as it is, donations included, and its compilation is
  shared with its calls.
  """
  import jax  # pylint: disable=g-import-not-at-top

  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0]
  return {
    'flops': float(cost.get('flops', 0.0)),
    'bytes': float(cost.get('bytes accessed', 0.0)),
  }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  """Prints and returns both rates; takes no flags but --help."""
  common.ArgumentParser(
    prog='python -m benchmarks.bandwidth', description=__doc__.split('\n')[0]
  ).parse_args(argv)
  copy = copy_bandwidth()
  print(f'copy bandwidth: {copy / 1e9:.1f} GB/s')
  matmul = matmul_rate()
  print(f'XLA f32 matmul: {matmul / 1e9:.1f} GFLOP/s')
  return {'copy_bytes_per_s': copy, 'matmul_flops_per_s': matmul}


if __name__ == '__main__':
  common.run(main)
