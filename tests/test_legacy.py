"""legacy.py: checkpoints of the old MLP layout (a bias before BatchNorm).

Until 2026-12-02 each hidden Dense layer of `MultiLayerPerceptron` had a
bias; `OldMultiLayerPerceptron` below is that block as it was. A state saved
then must resume training and predict exactly as it did.
"""

from collections.abc import Sequence
import importlib
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
from model_tables import MODEL_NAMES
from model_tables import build
from model_testing import random_ids
from model_testing import randomize
import numpy as np
import optax

import best_reader
import checkpoints
from configs import dcn as dcn_config
import legacy
import train

dcn = importlib.import_module('models.dcn')

FIELD_DIMS = (7, 11, 5)


class OldMultiLayerPerceptron(nn.Module):
  """The MLP block before 2026-12-02: a bias in each hidden Dense layer."""

  hidden_dims: Sequence[int]

  @nn.compact
  def __call__(self, x, *, train):
    for width in self.hidden_dims:
      x = nn.Dense(width)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    return nn.Dense(1)(x)[:, 0]


def _old_layout(state, seed=0):
  """`state` with random old biases, their running means moved alike.

  The old layout computes what `state` computes: BatchNorm cancels the bias
  in training, and evaluation subtracts it again with the running mean.
  """
  old = legacy.with_old_biases(state)
  today = {jax.tree_util.keystr(p) for p, _ in _leaves(state)}
  rng = np.random.default_rng(seed)
  biases = {}

  def draw(path, x):
    where = jax.tree_util.keystr(path)
    if where in today or not where.startswith('.params'):
      return x
    biases[where] = rng.normal(size=np.shape(x)).astype(np.float32)
    return biases[where]

  old = jax.tree_util.tree_map_with_path(draw, old)
  mlp = old.batch_stats['MultiLayerPerceptron_0']
  for where, b in biases.items():
    index = where.split("['Dense_")[1].split("']")[0]
    bn = mlp[f'BatchNorm_{index}']
    mlp[f'BatchNorm_{index}'] = {**bn, 'mean': bn['mean'] + b}
  return old, biases


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


class LegacyTest(parameterized.TestCase):
  @parameterized.named_parameters((n, n) for n in MODEL_NAMES)
  def test_no_model_has_a_bias_before_batchnorm(self, name):
    # What makes a bias beside BatchNorm_i always the old layout.
    ids = random_ids(4, (7, 11, 5))
    shapes = jax.eval_shape(build(name).init, jax.random.key(0), ids)
    self.assertFalse(legacy.has_old_biases(shapes))
    # Every model with the shared MLP block, whose hidden layers carry
    # BatchNorm, has `linear_init`; FiBiNET has it without BatchNorm.
    with_mlp = 'linear_init' in build(name).__dataclass_fields__
    with_mlp &= name != 'fibinet'
    self.assertEqual(legacy.with_old_biases(shapes) is not None, with_mlp)

  def test_an_upgraded_old_block_computes_what_it_did(self):
    x = np.random.default_rng(1).normal(size=(32, 5)).astype(np.float32)
    old_block = OldMultiLayerPerceptron((8, 6))
    old = randomize(old_block.init(jax.random.key(0), x, train=False))
    new_block = dcn.MultiLayerPerceptron((8, 6))
    new = legacy.upgrade(dict(old))
    self.assertEqual(
      jax.tree.map(np.shape, new),
      jax.tree.map(
        np.shape,
        jax.eval_shape(
          lambda k: new_block.init(k, x, train=False), jax.random.key(0)
        ),
      ),
    )
    self.assertTrue(legacy.has_old_biases(old))
    self.assertFalse(legacy.has_old_biases(new))
    np.testing.assert_allclose(
      new_block.apply(new, x, train=False),
      old_block.apply(old, x, train=False),
      rtol=1e-5,
      atol=1e-5,
    )
    # Training mode never read the bias.
    got, got_stats = new_block.apply(
      new, x, train=True, mutable=['batch_stats']
    )
    want, want_stats = old_block.apply(
      old, x, train=True, mutable=['batch_stats']
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The running means move alike: today's stays `mean - bias`.
    stats = legacy.upgrade(
      {'params': old['params'], 'batch_stats': want_stats['batch_stats']}
    )['batch_stats']
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      got_stats['batch_stats'],
      stats,
    )

  def test_a_current_state_is_returned_as_it_is(self):
    ids = random_ids(4, FIELD_DIMS)
    variables = dict(build('dcn').init(jax.random.key(0), ids))
    self.assertIs(legacy.upgrade(variables), variables)
    self.assertIsNone(legacy.with_old_biases({'params': {'Dense_0': {}}}))

  def test_a_masked_kernel_gets_a_masked_bias(self):
    # An optimizer state that keeps nothing for the MLP (the tables' own
    # optimizer) holds MaskedNodes there: the old layout has one more.
    kernel = np.zeros((3, 4), np.float16)
    block = {'Dense_0': {'kernel': kernel}, 'BatchNorm_0': {'scale': kernel}}
    masked = {**block, 'Dense_0': {'kernel': optax.MaskedNode()}}
    old = legacy.with_old_biases({'params': block, 'opt_state': masked})
    bias = old['params']['Dense_0']['bias']
    self.assertEqual((bias.shape, bias.dtype), ((4,), np.float16))
    self.assertIsInstance(old['opt_state']['Dense_0']['bias'], optax.MaskedNode)

  def test_an_old_checkpoint_resumes_and_loads_as_today(self):
    config = dcn_config.get_config('smoke')
    model = train.create_model(config, FIELD_DIMS)
    state = train.state_initializer(config, model)(jax.random.key(0))
    state = state.replace(
      params=randomize(state.params, seed=2),
      batch_stats=randomize(state.batch_stats, seed=3),
    )
    state = state.replace(opt_state=state.tx.init(state.params))
    old, biases = _old_layout(jax.device_get(state))
    self.assertLen(biases, len(config.model.mlp_dims))
    self.assertTrue(legacy.has_old_biases(old))
    meta = {'epoch': 1, 'best_auc': 0.5, 'best_epoch': 1, 'bad_epochs': 0}
    workdir = tempfile.mkdtemp()
    with checkpoints.Checkpoints(workdir) as ckpt:
      ckpt.save_latest(1, old, meta)
      ckpt.save_best(1, old, meta)
    with checkpoints.Checkpoints(workdir) as ckpt:
      resumed, got_meta = ckpt.restore_latest(jax.device_get(state))
    self.assertEqual(got_meta['epoch'], 1)
    best, _ = best_reader.load_best(workdir)
    want = jax.device_get(state)
    for got in (resumed, best):
      params = got.params if hasattr(got, 'params') else got['params']
      stats = (
        got.batch_stats if hasattr(got, 'batch_stats') else got['batch_stats']
      )
      jax.tree.map(np.testing.assert_array_equal, params, want.params)
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        stats,
        want.batch_stats,
      )
    # Resumed, the optimizer's moments of the old biases are gone.
    self.assertEqual(
      jax.tree.structure(resumed.opt_state), jax.tree.structure(want.opt_state)
    )


if __name__ == '__main__':
  absltest.main()
