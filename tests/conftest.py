"""Test set-up: two emulated CPU devices, so every pmap path runs sharded."""

import os
import sys

# Must happen before JAX initialises its backends; subprocesses inherit it.
_FLAG = '--xla_force_host_platform_device_count=2'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG
  ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
