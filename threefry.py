"""Threefry-2x32 without a loop on XLA:CPU: the same bits, shorter steps.

JAX draws its random bits (initialisers, `fold_in`, dropout masks) from the
Threefry-2x32 hash (Salmon et al., "Parallel random numbers: as easy as 1, 2,
3", SC 2011): 20 rounds of add, rotate and xor on two 32-bit words, with the
key injected after every fourth round. On CPU, JAX lowers the 20 rounds as a
loop of five iterations, so each dropout layer's mask runs as a while loop
of small kernels in every training step; on other platforms it writes the
rounds out. `unroll_on_cpu` registers the written-out rounds for CPU too:
XLA then fuses a mask into one elementwise kernel. The hash is the same, so
every initial weight and every mask keeps its bits.
"""

import jax
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir
import numpy as np

# The rotation distances of the even and odd groups of four rounds.
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Threefry's key-schedule parity constant.
PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
  return (x << np.uint32(distance)) | (x >> np.uint32(32 - distance))


def threefry2x32(
  key1: jax.Array, key2: jax.Array, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds of the counter words `(x1, x2)`.

  Args:
    key1: the key's first word, uint32, broadcastable against `x1`.
    key2: the key's second word, uint32.
    x1: the counters' first words, uint32 `[...]`.
    x2: the counters' second words, uint32 `[...]`.

  Returns:
    The two hashed words, uint32 `[...]` each.
  """
  keys = (key1, key2, key1 ^ key2 ^ PARITY)
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for group in range(5):
    for distance in ROTATIONS[group % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, distance)
    # Key injection s = group + 1: words s and s + 1 of the schedule, and s.
    x1 = x1 + keys[(group + 1) % 3]
    x2 = x2 + keys[(group + 2) % 3] + np.uint32(group + 1)
  return x1, x2


def unroll_on_cpu() -> None:
  """Lowers JAX's `threefry2x32` primitive on CPU without a loop.

  Takes effect for the programs compiled afterwards; calling it again
  changes nothing.
  """
  mlir.register_lowering(
    threefry2x32_p,
    mlir.lower_fun(threefry2x32, multiple_results=True),
    platform='cpu',
  )
