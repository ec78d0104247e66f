"""Threefry-2x32 in one pass on XLA:CPU: the same bits, fewer kernels.

JAX draws its random bits (initialisers, `fold_in`, dropout masks) from the
Threefry-2x32 hash (Salmon et al., "Parallel random numbers: as easy as 1, 2,
3", SC 2011): 20 rounds of add, rotate and xor on two 32-bit words, with the
key injected after every fourth round. On CPU, JAX lowers the 20 rounds as a
loop of five passes over the whole array, each a few small kernels; on other
platforms it writes them out. `unroll_on_cpu` registers the written-out
rounds for CPU too, so that the hash of an array is one kernel, run in a
loop of one pass whose count XLA cannot see. The loop keeps the hash's
output stored once: written out inline, XLA fuses the hash into every
kernel that reads it, including those that broadcast it. AFM's dropout
mask of its pooled vector `[batch, dim]`, read by a gradient broadcast over
741 pairs of fields, was then hashed 741 times per word (its step on the
Criteo shape 1.7x slower than with JAX's loop).

Initialisers read each random word once, into a weight: there the loop buys
nothing and costs compilation, so `inline()` lowers the hash written out
inline for the programs lowered within it (`train.state_initializer` uses it
for `jit(init)`).

The hash is the same, so every initial weight and every mask keeps its bits.

`key(seed)` is `jax.random.key(seed)`'s key, made without compiling.
"""

from collections.abc import Iterator
import contextlib
import contextvars

import jax
from jax import lax
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir
import jax.numpy as jnp
import numpy as np

# The rotation distances of the even and odd groups of four rounds.
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Threefry's key-schedule parity constant.
PARITY = np.uint32(0x1BD11BDA)
# Whether programs lowered now take the hash inline (`inline()`). A context
# variable: each thread has its own, so the programs that other threads
# lower at the same time keep the loop.
_INLINE = contextvars.ContextVar('threefry_inline', default=False)


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


def _lowering(
  key1: jax.Array, key2: jax.Array, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """`threefry2x32` in one pass of a loop, its output stored once (inline
  within `inline()`)."""
  shape = jnp.broadcast_shapes(key1.shape, key2.shape, x1.shape, x2.shape)
  x = (jnp.broadcast_to(x1, shape), jnp.broadcast_to(x2, shape))
  if 0 in shape:  # Nothing to hash (nor a key word to count from).
    return x
  if _INLINE.get():
    return threefry2x32(key1, key2, *x)
  # One pass, counted from the key: (k >> 31) | 1 is 1 for every k. The pass
  # hashes its carry, so that XLA does not hoist the hash out of the loop.
  passes = (jnp.ravel(key1)[0] >> np.uint32(31)) | np.uint32(1)
  return lax.fori_loop(
    0,
    passes.astype(jnp.int32),
    lambda _, x: threefry2x32(key1, key2, *x),
    x,
  )


@contextlib.contextmanager
def inline() -> Iterator[None]:
  """Programs lowered within it, on this thread, take the hash inline.

  For programs that read each random word once (initialisers): the hash is
  then one kernel per array with no loop around it, which compiles faster.
  Not for programs that broadcast random words (dropout masks read by a
  gradient): XLA would hash again in every reader (see the module docstring).
  """
  token = _INLINE.set(True)
  try:
    yield
  finally:
    _INLINE.reset(token)


def unroll_on_cpu() -> None:
  """Lowers JAX's `threefry2x32` primitive on CPU in one pass.

  Takes effect for the programs compiled afterwards; calling it again
  changes nothing.
  """
  mlir.register_lowering(
    threefry2x32_p,
    mlir.lower_fun(_lowering, multiple_results=True),
    platform='cpu',
  )


def key(seed: int) -> jax.Array:
  """`jax.random.key(seed)`, the same key, without compiling a program.

  `jax.random.key` hashes the seed in two small compiled programs, which a
  run's first launch (an empty compilation cache) compiles before anything
  else: with JAX's default Threefry keys, the key's two words are the
  seed's high and low 32 bits (the high word 0 without 64-bit types).
  """
  if jax.config.jax_default_prng_impl != 'threefry2x32':
    return jax.random.key(seed)
  high = (seed >> 32) & 0xFFFFFFFF if jax.config.jax_enable_x64 else 0
  data = np.array([high, seed & 0xFFFFFFFF], np.uint32)
  return jax.random.wrap_key_data(data, impl='threefry2x32')
