"""States saved by earlier versions of the models, read in today's layout.

One change so far. Until 2026-12-02 each hidden Dense layer of the MLP block
(`MultiLayerPerceptron` in models/*.py) had a bias, which the BatchNorm
after it cancels; since then it has none. A state saved before still holds
that bias. It folds into BatchNorm's running mean (`mean - bias`:
evaluation subtracts the mean from the same sum, so every output stays
what it was), and the optimizer's moments of it are dropped (training
mode never read the bias, so nothing that drives training changes).

A block is a dict holding `Dense_i` beside `BatchNorm_i`; no model has a
Dense layer with a bias next to a BatchNorm of the same index any more
(tests/test_legacy.py checks every model), so a bias there is always the
old layout.
"""

import re
from typing import Any

import jax
import numpy as np
import optax

_DENSE = re.compile(r'Dense_(\d+)$')


def _dense_keys(tree: Any) -> list[str]:
  """The `Dense_i` keys of a dict that has a `BatchNorm_i` beside them."""
  if not isinstance(tree, dict):
    return []
  return [
    key
    for key, value in tree.items()
    if (m := _DENSE.match(key))
    and f'BatchNorm_{m.group(1)}' in tree
    and isinstance(value, dict)
  ]


def _is_block(x: Any) -> bool:
  return bool(_dense_keys(x))


def _map_blocks(fn, tree: Any) -> Any:
  """`fn(block)` on every block of `tree`, anything else kept."""
  return jax.tree.map(
    lambda x: fn(x) if _is_block(x) else x, tree, is_leaf=_is_block
  )


def _blocks(tree: Any) -> list[dict]:
  return [x for x in jax.tree.leaves(tree, is_leaf=_is_block) if _is_block(x)]


def has_old_biases(tree: Any) -> bool:
  """Whether `tree` holds a bias before a BatchNorm (the old layout)."""
  return any(
    'bias' in block[key]
    for block in _blocks(tree)
    for key in _dense_keys(block)
  )


def with_old_biases(target: Any) -> Any | None:
  """`target` in the old layout (a restore target for an old checkpoint).

  Each Dense layer before a BatchNorm gets back a bias: zeros `[features]`
  where its kernel is an array, the kernel's placeholder where the optimizer
  keeps none (`optax.MaskedNode`). None when `target` has no such layer.
  """
  if not _blocks(target) or has_old_biases(target):
    return None

  def add(block):
    block = dict(block)
    for key in _dense_keys(block):
      kernel = block[key]['kernel']
      if isinstance(kernel, optax.MaskedNode):
        bias = optax.MaskedNode()
      else:
        bias = np.zeros(np.shape(kernel)[-1:], np.dtype(kernel.dtype))
      block[key] = {**block[key], 'bias': bias}
    return block

  return _map_blocks(add, target)


def _fold(params: Any, stats: Any) -> Any:
  """`stats` with each old bias of `params` taken off its running mean."""
  if not isinstance(params, dict) or not isinstance(stats, dict):
    return stats
  out = dict(stats)
  for key, value in params.items():
    if key in stats:
      out[key] = _fold(value, stats[key])
  for key in _dense_keys(params):
    if 'bias' in params[key]:
      bn = f'BatchNorm_{key[len("Dense_") :]}'
      mean = out[bn]['mean']
      bias = params[key]['bias'].astype(mean.dtype)
      out[bn] = {**out[bn], 'mean': mean - bias}
  return out


def _strip(block: dict) -> dict:
  block = dict(block)
  for key in _dense_keys(block):
    block[key] = {k: v for k, v in block[key].items() if k != 'bias'}
  return block


def upgrade(state: Any) -> Any:
  """`state` (a TrainState or the dict of one) in today's layout.

  Returns `state` itself when it has no old bias.
  """
  if not has_old_biases(state):
    return state
  as_dict = isinstance(state, dict)
  params = state['params'] if as_dict else state.params
  stats = (state.get('batch_stats') if as_dict else state.batch_stats) or {}
  stats = _fold(params, stats)
  state = (
    {**state, 'batch_stats': stats}
    if as_dict
    else state.replace(batch_stats=stats)
  )
  return _map_blocks(_strip, state)
