"""Test set-up: two emulated CPU devices, fast compiles, one JAX cache."""

import gc
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile

import pytest

# Must happen before JAX initialises its backends; subprocesses inherit them.
# Two devices, so that every pmap path runs sharded; and the cheapest
# compilation of the CPU code: the tests run tiny programs once, where
# compiling them is most of the time. No LLVM optimisation (level 0),
# XLA's older elemental emitters instead of the MLIR fusion emitters, and
# code generation in one thread (the two pytest workers use both cores):
# the model tests' programs compile about 1.7x faster than at level 0
# alone. The computations are the same. XLA aborts on a flag it does not
# know: jaxlib 0.11.1 and later (what pip installs on Python 3.12 and
# later) abort on the emitters' flag, so it goes only to older ones.


def _jaxlib_version() -> tuple[int, ...]:
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ()
  return tuple(int(part) for part in re.findall(r'\d+', version)[:3])


_FLAGS = (
  '--xla_force_host_platform_device_count=2',
  '--xla_backend_optimization_level=0',
  '--xla_cpu_parallel_codegen_split_count=1',
)
if _jaxlib_version() < (0, 11, 1):
  _FLAGS += ('--xla_cpu_use_fusion_emitters=false',)
for _flag in _FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + ' ' + _flag
    ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# numpy's OpenBLAS in one thread in the workers and subprocesses (read as
# numpy loads; a pytest plugin has loaded it in this process already): the
# two workers use both cores, and its threads, waiting for each other on a
# busy machine, made a dot product of 20,000 numbers take 9 ms
# (benchmarks.synthetic.fit: 13.4 s, 2.8 s with one thread).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_configure(config):
  """One temporary root and one JAX compilation cache for the session.

  Every temporary file or directory of the tests (`tempfile`, in the
  workers and in the subprocesses they start, which inherit `TMPDIR`) lands
  in one directory that the session removes at its end, so a run leaves
  nothing behind. Many tests run `main.py` in a subprocess, which compiles
  the same programs again; with the cache they are compiled once per
  session. The workers (pytest-xdist) and subprocesses inherit both
  variables from the controller.
  """
  if hasattr(config, 'workerinput'):
    return
  config._temp_root = tempfile.mkdtemp(prefix='flax-fm-tests-')
  os.environ['TMPDIR'] = tempfile.tempdir = config._temp_root
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    cache = os.path.join(config._temp_root, 'jax-cache')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')


def pytest_collection_finish(session):
  """Freezes what collection made (the test modules and their imports).

  It lives as long as the worker, and each full garbage collection would
  walk it again.
  """
  if hasattr(session.config, 'workerinput'):
    gc.freeze()


_module = [None]  # The module of the test that ran last in this process.


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """Empties JAX's caches when the tests move on to another module.

  Each module traces and compiles its own programs, and the caches kept
  every one of them: a worker's heap grew past a million objects, and each
  full garbage collection (every cache build calls one,
  `core.release_memory`) took more than half a second. A module's
  programs are rarely another's; those that are come back from the
  persistent cache.
  """
  module = getattr(item.module, '__name__', None)
  if _module[0] not in (None, module) and 'jax' in sys.modules:
    sys.modules['jax'].clear_caches()
  _module[0] = module


def pytest_unconfigure(config):
  """Removes the temporary root; lets a worker exit without delay.

  After this hook pytest collects garbage five times, for the unraisable
  exceptions of finalizers. On a worker's heap after hundreds of tests
  they took longer than the 5 s that execnet waits for a worker to finish
  before it sends a SIGINT; the KeyboardInterrupt landed in JAX's gc
  callback and was printed as a warning at the end of the run. One
  collection here, under pytest's hook, still finds them; the objects that
  survive it are then frozen, so the five pass over nothing.
  """
  if hasattr(config, 'workerinput'):
    gc.collect()
    gc.freeze()
  if getattr(config, '_temp_root', None):
    shutil.rmtree(config._temp_root, ignore_errors=True)
