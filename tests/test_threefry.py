"""threefry.py: the unrolled hash equals Threefry-2x32 and JAX's own bits."""

import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from configs import deepfm
import threefry
import train

# What JAX draws with a key, jitted: raw bits, floats, split and fold_in
# chains and a Flax dropout mask, over sizes odd and even.
DRAWS = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn

def draws():
  key = jax.random.key(20161201)
  a, b = jax.random.split(jax.random.fold_in(key, 7))
  mask = nn.Dropout(0.3).apply(
    {}, jnp.ones([37, 5]), deterministic=False,
    rngs={'dropout': jax.random.fold_in(b, 3)})
  return {
    'bits': jax.random.bits(key, (1001,)),
    'uniform': jax.random.uniform(a, (6, 33)),
    'normal': jax.random.normal(b, (128,)),
    'keys': jax.random.key_data(jax.random.split(a, 5)),
    'mask': mask,
  }
"""


def _numpy_threefry(key, x):
  """Threefry-2x32, 20 rounds, in numpy uint32 arithmetic (Random123)."""
  rotate = lambda v, d: (v << np.uint32(d)) | (v >> np.uint32(32 - d))
  ks = [key[0], key[1], key[0] ^ key[1] ^ np.uint32(0x1BD11BDA)]
  x = [x[0] + ks[0], x[1] + ks[1]]
  rotations = [(13, 15, 26, 6), (17, 29, 16, 24)]
  for s in range(1, 6):
    for d in rotations[(s - 1) % 2]:
      x[0] = x[0] + x[1]
      x[1] = rotate(x[1], d) ^ x[0]
    x[0] = x[0] + ks[s % 3]
    x[1] = x[1] + ks[(s + 1) % 3] + np.uint32(s)
  return x


def _kernels_hashing(hlo: str) -> list[tuple[int, int]]:
  """(rotations, output size) of each compiled computation that rotates."""
  kernels = []
  for computation in re.split(r'\n(?=%|ENTRY)', hlo):
    rotations = computation.count('shift-left(')
    if rotations:
      head = computation.split('\n')[0]
      shape = re.search(r'-> \(?\w+\[([\d,]*)\]', head)
      dims = [int(d) for d in shape.group(1).split(',') if d] if shape else []
      kernels.append((rotations, math.prod(dims)))
  return kernels


class ThreefryTest(absltest.TestCase):
  def test_known_answers(self):
    # Random123's known-answer vectors for threefry2x32_20.
    cases = [
      ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
      ((2**32 - 1,) * 2, (2**32 - 1,) * 2, (0x1CB996FC, 0xBB002BE7)),
      (
        (0x13198A2E, 0x03707344),
        (0x243F6A88, 0x85A308D3),
        (0xC4923A9C, 0x483DF7A0),
      ),
    ]
    hash_fn = jax.jit(threefry.threefry2x32)
    for key, count, expected in cases:
      words = [jnp.asarray(np.uint32(v)) for v in key + count]
      self.assertEqual(tuple(int(w) for w in hash_fn(*words)), expected)

  def test_equals_numpy_on_random_words(self):
    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    x = rng.integers(0, 2**32, (2, 999), dtype=np.uint32)
    with np.errstate(over='ignore'):
      expected = _numpy_threefry(key, x)
    got = jax.jit(threefry.threefry2x32)(key[0], key[1], x[0], x[1])
    np.testing.assert_array_equal(np.asarray(got[0]), expected[0])
    np.testing.assert_array_equal(np.asarray(got[1]), expected[1])

  def test_no_keys_have_no_bits_to_hash(self):
    # An empty batch of keys has no key word to count the loop's pass from.
    threefry.unroll_on_cpu()
    keys = jax.random.split(jax.random.key(0), 0)
    bits = jax.jit(jax.vmap(lambda k: jax.random.bits(k, (3,))))(keys)
    self.assertEqual((bits.shape, bits.dtype), ((0, 3), np.uint32))

  def test_registered_lowering_keeps_jax_bits_in_one_pass(self):
    namespace = {}
    exec(DRAWS, namespace)
    draws = jax.jit(namespace['draws'])
    threefry.unroll_on_cpu()
    # All 20 rounds in one kernel (JAX's CPU loop has 4 in its body).
    kernels = _kernels_hashing(draws.lower().compile().as_text())
    self.assertEqual(max(rotations for rotations, _ in kernels), 20)
    ours = draws()
    # JAX's own CPU lowering, in a process that never registered ours.
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'draws.npz')
      script = DRAWS + (
        f'\nnp.savez({out!r}, **jax.tree.map(np.asarray, jax.jit(draws)()))\n'
      )
      subprocess.run([sys.executable, '-c', script], check=True, timeout=120)
      with np.load(out) as theirs:
        self.assertEqual(set(theirs), set(ours))
        for name, value in theirs.items():
          np.testing.assert_array_equal(np.asarray(ours[name]), value, name)
    # The mask really drops: about 30% of 185 entries.
    self.assertBetween(float((ours['mask'] == 0).mean()), 0.15, 0.45)

  def test_a_broadcast_reader_does_not_hash_again(self):
    # A [64, 16] mask read by a product broadcast over 100 columns (as AFM's
    # gradient reads its pooled vector's mask): hashed once, 1,024 words.
    # Written out inline, XLA fuses the hash into the product's kernel and
    # hashes each word 100 times.
    threefry.unroll_on_cpu()

    def masked(key, y):
      keep = jax.random.bernoulli(key, 0.8, (64, 16))
      return jnp.where(keep, 1.25, 0.0)[:, None, :] * y

    y = jnp.ones([64, 100, 16])
    hlo = jax.jit(masked).lower(jax.random.key(0), y).compile().as_text()
    sizes = [size for _, size in _kernels_hashing(hlo)]
    self.assertEqual(max(sizes), 64 * 16)
    keep = jax.random.bernoulli(jax.random.key(0), 0.8, (64, 16))
    np.testing.assert_array_equal(
      jax.jit(masked)(jax.random.key(0), y),
      np.broadcast_to(np.where(keep, 1.25, 0.0)[:, None, :], y.shape),
    )

  def test_inline_keeps_the_bits_without_a_loop_on_its_thread(self):
    threefry.unroll_on_cpu()
    namespace = {}
    exec(DRAWS, namespace)
    draws = namespace['draws']
    looped = jax.jit(lambda: draws())
    inline = jax.jit(lambda: draws())  # Its own cache entry.
    elsewhere = {}
    with threefry.inline():
      hlo = inline.lower().compile().as_text()
      # A program another thread lowers meanwhile keeps the loop.
      thread = threading.Thread(
        target=lambda: elsewhere.update(hlo=looped.lower().as_text())
      )
      thread.start()
      thread.join()
    self.assertNotIn('while(', hlo)
    self.assertIn('stablehlo.while', elsewhere['hlo'])
    self.assertIn('while(', looped.lower().compile().as_text())
    ours, theirs = inline(), looped()
    for name, value in theirs.items():
      np.testing.assert_array_equal(ours[name], value, name)

  def test_training_initialises_inline_with_the_same_bits(self):
    config = deepfm.get_config()
    model = train.create_model(config, (13, 17))
    modes = []
    hash_fn = threefry.threefry2x32

    def recording(*args):
      modes.append(threefry._INLINE.get())
      return hash_fn(*args)

    with mock.patch.object(threefry, 'threefry2x32', recording):
      state = train.state_initializer(config, model)(jax.random.key(3))
    self.assertNotEmpty(modes)
    self.assertTrue(all(modes))
    with mock.patch.object(threefry, 'inline', contextlib.nullcontext):
      looped = train.state_initializer(config, model)(jax.random.key(3))
    leaves = jax.tree.leaves((state.params, state.opt_state))
    expected = jax.tree.leaves((looped.params, looped.opt_state))
    self.assertLen(leaves, len(expected))
    for got, want in zip(leaves, expected, strict=True):
      np.testing.assert_array_equal(got, want)
    # The embedding table really is random.
    table = state.params['FeaturesEmbedding_0']['embedding']
    self.assertGreater(float(jnp.std(table)), 0.01)

  def test_training_registers_it(self):
    script = (
      'import jax, train\n'
      'bits = jax.jit(lambda k: jax.random.bits(k, (8,)))\n'
      'print(bits.lower(jax.random.key(0)).compile().as_text())\n'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
      [sys.executable, '-c', script],
      cwd=root,
      check=True,
      timeout=120,
      capture_output=True,
      text=True,
    )
    kernels = _kernels_hashing(out.stdout)
    self.assertEqual(max(rotations for rotations, _ in kernels), 20)


if __name__ == '__main__':
  absltest.main()
