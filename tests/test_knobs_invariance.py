"""Speed and memory knobs leave a run's numbers alone.

One FM run on the embedded MovieLens data is shared; each test trains or
scores again with one knob changed and compares metrics.jsonl's numbers,
the checkpoints or predict.py's output with the shared run's.
"""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import numpy as np

import checkpoints
from configs import fm
import train

# Lines of metrics.jsonl that depend on the clock, not on the run.
TIMING = ('wall_time', 'time', 'examples_per_sec')


def _config(**overrides):
  config = fm.get_config('smoke')
  config.model.embed_dim = 4
  config.progress_bar = False
  for key, value in overrides.items():
    config[key] = value
  return config


def _numbers(workdir: str) -> list[dict]:
  """metrics.jsonl's lines without the clock's numbers."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return [{k: v for k, v in x.items() if k not in TIMING} for x in lines]


def _states(workdir: str) -> dict:
  """Every saved step's state, `{(kind, step): {path: array}}`."""
  out = {}
  for kind in ('latest', 'best'):
    mgr = checkpoints.manager(
      os.path.join(workdir, 'checkpoints', kind), read_only=True
    )
    for step in mgr.all_steps():
      state, _ = checkpoints.restore(mgr, step)
      leaves = jax.tree_util.tree_leaves_with_path(state)
      out[kind, step] = {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves
      }
    mgr.close()
  return out


class KnobsTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.cache = os.path.join(cls.root, 'cache')
    cls.base = cls.train('base')

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def train(cls, name: str, **overrides) -> str:
    workdir = os.path.join(cls.root, name)
    config = _config(**overrides)
    config.dataset.cache_dir = cls.cache
    train.train_and_evaluate(config, workdir)
    return workdir

  def assert_same_run(self, workdir: str, reference: str = '') -> None:
    """metrics.jsonl's numbers and every checkpoint are the reference run's
    (the shared one by default), to the bit."""
    reference = reference or self.base
    self.assertEqual(_numbers(workdir), _numbers(reference))
    mine, base = _states(workdir), _states(reference)
    self.assertEqual(sorted(mine), sorted(base))
    for key, leaves in base.items():
      self.assertEqual(sorted(mine[key]), sorted(leaves))
      for path, value in leaves.items():
        np.testing.assert_array_equal(mine[key][path], value, f'{key} {path}')

  def test_eval_batch_size_leaves_the_metrics_alone(self):
    # 3000 rows over 2 devices: 1500 a device, dividing no split. The
    # validation and test logloss were float32 psums of each batch, summed
    # in another order for each size (1e-8 apart).
    self.assertEqual(jax.device_count(), 2)
    self.assert_same_run(self.train('eval_batch', eval_batch_size=3000))

  def test_steps_per_dispatch_and_a_split_fed_by_the_host_change_nothing(self):
    # 157 steps an epoch: 5 a dispatch leaves a remainder of 2.
    self.assert_same_run(
      self.train('streamed', steps_per_dispatch=5, device_split_mb=0)
    )

  def test_a_run_resumed_after_epoch_1_is_the_run_straight_through(self):
    # DeepFM: BatchNorm statistics and dropout keys must resume too.
    deepfm = dict(
      model_name='deepfm',
      model={'embed_dim': 4, 'mlp_dims': (8,), 'dropout': 0.2},
    )
    straight = self.train('straight', **deepfm)
    self.train('resumed', num_epochs=1, **deepfm)
    self.assert_same_run(self.train('resumed', **deepfm), straight)


if __name__ == '__main__':
  absltest.main()
