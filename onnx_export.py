"""A model's inference function as ONNX, converted by jax2onnx and checked.

`convert` hands the function to jax2onnx, as traced or, when jax2onnx fails
on it or on what it makes of it, with its nested calls inlined (`_inline`).
`check` runs a converted model in onnxruntime on sample rows and compares it
with the JAX function: a model that onnxruntime refuses or that computes
other numbers (a converter's bug: with jax 0.12, xDeepFM's einsum became an
Einsum that onnxruntime refuses) is not kept. Without onnxruntime nothing is
checked.
"""

from collections.abc import Callable, Sequence
import contextlib
import importlib.abc
import logging as std_logging
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

OUTPUT = 'probability'
# The ONNX opset that model.onnx is stamped with. jax2onnx's default (23)
# needs onnxruntime >= 1.23 (1.22 and older refuse to load it); its IR
# version 10 needs onnxruntime >= 1.18 (May 2024), whose newest opset is 21:
# with it, every model loads from onnxruntime 1.18 on (checked on 1.18 to
# 1.32), but W&D's crosses (`cross_fields`) compute in uint32, whose Mul
# and Where onnxruntime runs from 1.31 on.
OPSET = 21
# The largest difference from the JAX function that a model may show (a
# saturated sigmoid's float32 rounding differs by a few 1e-6).
ATOL = 1e-4


def convert(
  fn: Callable,
  specs: Sequence[jax.ShapeDtypeStruct],
  names: Sequence[str],
  feeds: dict[str, np.ndarray] | None = None,
) -> bytes:
  """`fn` as a serialized ONNX model (inputs `names`, output `probability`).

  Args:
    fn: `(*inputs) -> probabilities`.
    specs: its inputs' specs, in order.
    names: their names.
    feeds: sample inputs by name, to `check` each conversion on; None: not
      checked.

  Raises:
    ImportError: jax2onnx is not installed.
    Exception: what the converter raised, or `check`'s ValueError, for the
      last way tried.
  """
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top

  closed = jax.make_jaxpr(fn)(*specs)

  def inlined(*args):
    return _inline(closed.jaxpr, closed.consts, *args)[0]

  def converted(way: Callable) -> bytes:
    model = _to_onnx(to_onnx, way, specs, names)
    if feeds is not None:
      check(model, fn, feeds)
    return model

  # jax2onnx's own BatchNorm lowering rejects some flax BatchNorms (AFN's,
  # over axis 1): the traced primitives convert.
  if not _has_integer_rem(closed.jaxpr):
    with contextlib.suppress(Exception):
      return converted(fn)
  return converted(inlined)


def check(model: bytes, fn: Callable, feeds: dict[str, np.ndarray]) -> None:
  """Runs `model` in onnxruntime on `feeds` and compares it with `fn`.

  Raises:
    ValueError: onnxruntime cannot load or run it, or its probabilities
      differ from `fn(*feeds.values())` by more than `ATOL`.
  """
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  try:
    session = onnxruntime.InferenceSession(
      model, providers=['CPUExecutionProvider']
    )
    got = session.run(None, feeds)[0]
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).splitlines() or [type(e).__name__])[0][:300]
    raise ValueError(f'onnxruntime cannot run the model: {first}') from e
  want = np.asarray(fn(*feeds.values()))
  gap = float(np.max(np.abs(np.asarray(got) - want), initial=0.0))
  if np.shape(got) != np.shape(want) or not gap <= ATOL:
    raise ValueError(
      'the model computes other probabilities than the JAX function (by up'
      f' to {gap:.3g} on {len(want)} sample rows)'
    )


def _inline(jaxpr, consts: Sequence, *args) -> list:
  """Evaluates `jaxpr` with nested calls inlined and integer `rem` rewritten.

  jax2onnx cannot lower an integer remainder with a symbolic batch
  dimension (W&D's hashed crosses take one); `x - (x / y) * y`, with
  truncating division, is the same remainder and lowers. Only functions
  with such a remainder, or that jax2onnx fails to convert directly, take
  this path: tracing first, outside jax2onnx, turns `jnp.einsum` into
  `dot_general`s, some of which it lowers to an invalid ONNX Einsum
  (xDeepFM's).
  """
  env = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    params = eqn.params
    inner = params.get('jaxpr', params.get('call_jaxpr'))
    if eqn.primitive.name == 'rem' and jnp.issubdtype(
      eqn.invars[0].aval.dtype, jnp.integer
    ):
      x, y = invals
      outs = [x - lax.div(x, y) * y]
    elif inner is not None and eqn.primitive.name in (
      'pjit',
      'jit',
      'closed_call',
      'custom_jvp_call',
    ):
      closed = getattr(inner, 'jaxpr', inner)
      outs = _inline(closed, getattr(inner, 'consts', ()), *invals)
    else:
      bind_params = eqn.primitive.get_bind_params(params)
      subfuns = []
      if isinstance(bind_params, tuple):  # jax < 0.8: (subfuns, params).
        subfuns, bind_params = bind_params
      outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, value in zip(eqn.outvars, outs, strict=True):
      env[v] = value
  return [read(v) for v in jaxpr.outvars]


def _has_integer_rem(jaxpr) -> bool:
  """Whether `jaxpr` (or one nested in it) takes an integer remainder."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'rem' and jnp.issubdtype(
      eqn.invars[0].aval.dtype, jnp.integer
    ):
      return True
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns') and _has_integer_rem(inner):
        return True
  return False


class _SkipPlugins(importlib.abc.MetaPathFinder):
  """Refuses to import jax2onnx's plugins for other libraries.

  jax2onnx imports every plugin module on its first conversion; those of
  its examples and of equinox run and compile JAX code as they load, which
  makes the first export of a process many times slower. A model is traced
  as JAX primitives, which only the `jax` plugins convert.
  """

  SKIPPED = tuple(
    f'jax2onnx.plugins.{tree}' for tree in ('examples', 'equinox', 'dm_pix')
  )

  def find_spec(self, name, path, target=None):
    del path, target
    if name.startswith(self.SKIPPED):
      raise ImportError(f'{name}: not needed to export a model')
    return None


def _to_onnx(
  to_onnx: Callable, fn: Callable, specs: Sequence, names: Sequence[str]
) -> bytes:
  """`to_onnx(fn, ...)` serialized, with jax2onnx's extra plugins skipped."""
  finder = _SkipPlugins()
  loggers = [std_logging.getLogger(n) for n in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  sys.meta_path.insert(0, finder)
  try:
    # They log a warning per skipped plugin and per untyped constant.
    for logger in loggers:
      logger.setLevel(std_logging.ERROR)
    proto = to_onnx(
      fn,
      specs,
      model_name='flax_fm',
      opset=OPSET,
      input_names=list(names),
      output_names=[OUTPUT],
    )
  finally:
    sys.meta_path.remove(finder)
    for logger, level in zip(loggers, levels, strict=True):
      logger.setLevel(level)
  return proto.SerializeToString()
