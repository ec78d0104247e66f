"""Tests of entry.run_main: a UserError is one line and status 2, bugs are not.

Each case runs a tiny entry point in a subprocess, as a user runs main.py.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = 'config.batch_size: set it to 2048.'

_SCRIPT = textwrap.dedent(
  f"""
  import signal, sys
  sys.path.insert(0, {ROOT!r})
  import entry

  # As from a terminal: under `nohup` or `&` SIGINT comes ignored, and the
  # program rightly keeps it so (the Ctrl-C cases then ran on).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  import utils


  def main(argv):
    kind = argv[1]
    if kind == 'user':
      try:
        {{}}['batch_size']
      except KeyError as e:
        raise utils.UserError({MESSAGE!r}) from e
    if kind == 'config':
      import config_check
      from configs import fm
      config = fm.get_config()
      config.batch_size = 0
      config_check.validate_config(config)
    if kind == 'memory':
      import numpy as np
      np.empty(2**62, np.uint8)
    if kind == 'bare_memory':
      raise MemoryError()
    if kind == 'xla_memory':  # What jax.errors.JaxRuntimeError holds.
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 8'
                         ' bytes.')
    if kind == 'internal':
      raise RuntimeError('an internal bug')
    if kind == 'frozen':  # Startup's objects frozen; new garbage is not.
      import gc, weakref
      class Node:
        pass
      node = Node()
      node.self = node
      gone = weakref.ref(node)
      del node
      gc.collect()
      print('frozen', gc.get_freeze_count(), 'cycle kept', gone() is not None)
    if kind == 'interrupt_in_gc':  # Ctrl-C as JAX's gc callback runs.
      import gc, os, signal, time
      signum = getattr(signal, argv[2] if len(argv) > 2 else 'SIGINT')
      sent = []
      def collecting(phase, info):
        if phase == 'start' and not sent:
          sent.append(os.kill(os.getpid(), signum))
          sum(range(10000))  # The handler runs here, in the callback.
      gc.callbacks.append(collecting)
      gc.collect()
      time.sleep(5)
    if kind == 'signal_at_exit':  # A signal as the interpreter shuts down.
      import atexit, os, signal, time
      signum = getattr(signal, argv[2])
      atexit.register(lambda: (os.kill(os.getpid(), signum), time.sleep(5)))
    print('done')


  if __name__ == '__main__':
    entry.run_main(main)
  """
)


class RunMainTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.script = os.path.join(tempfile.mkdtemp(), 'tool.py')
    with open(cls.script, 'w') as f:
      f.write(_SCRIPT)

  def _run(self, *args, env=None):
    return subprocess.run(
      [sys.executable, self.script, *args],
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, **(env or {})},
    )

  def test_what_startup_made_is_frozen_and_new_cycles_are_collected(self):
    result = self._run('frozen')
    self.assertEqual(result.returncode, 0, result.stderr)
    frozen, kept = re.fullmatch(
      r'frozen (\d+) cycle kept (\w+)\ndone\n', result.stdout
    ).groups()
    self.assertGreater(int(frozen), 10_000)  # absl's and ml_collections'.
    self.assertEqual(kept, 'False')

  def test_user_error_is_one_line_with_status_2(self):
    result = self._run('user')
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(
      result.stderr.strip().splitlines()[-1], f'tool.py: error: {MESSAGE}'
    )

  def test_config_error_is_a_user_error(self):
    result = self._run('config')
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    self.assertIn(
      'tool.py: error: 1 bad config value: config.batch_size=0 must be',
      result.stderr,
    )

  def test_verbosity_or_environment_shows_the_traceback(self):
    for args, env in (
      (['--verbosity=1'], None),
      ([], {'FLAX_FM_TRACEBACK': '1'}),
    ):
      result = self._run(*args, 'user', env=env)
      self.assertEqual(result.returncode, 2, result.stderr)
      self.assertIn('Traceback', result.stderr)
      self.assertIn("KeyError: 'batch_size'", result.stderr)  # The cause.
      last = result.stderr.strip().splitlines()[-1]
      self.assertEqual(last, f'tool.py: error: {MESSAGE}')
    result = self._run('user', env={'FLAX_FM_TRACEBACK': '0'})
    self.assertNotIn('Traceback', result.stderr)

  def test_out_of_memory_says_what_to_lower(self):
    # numpy's _ArrayMemoryError while preprocessing was a traceback.
    result = self._run('memory')
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    self.assertRegex(
      result.stderr.strip().splitlines()[-1],
      r'^tool.py: error: Out of memory \(Unable to allocate 4.00 EiB .*\).'
      r' Lower config.dataset.chunk_rows \(while preprocessing\),'
      r' config.batch_size, config.eval_batch_size or --batch_size',
    )

  def test_a_memory_error_without_a_message_is_named(self):
    result = self._run('bare_memory')
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertIn(
      'tool.py: error: Out of memory (MemoryError). Lower', result.stderr
    )
    result = self._run('xla_memory')  # XLA's, on a device or under a limit.
    self.assertEqual(result.returncode, 2, result.stderr)
    self.assertNotIn('Traceback', result.stderr)
    self.assertIn(
      'error: Out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 8'
      ' bytes.). Lower',
      result.stderr,
    )

  def test_internal_error_keeps_its_traceback(self):
    result = self._run('internal')
    self.assertNotIn(result.returncode, (0, 2))
    self.assertIn('Traceback', result.stderr)
    self.assertIn('RuntimeError: an internal bug', result.stderr)
    self.assertNotIn('error: an internal bug', result.stderr)

  def test_an_interrupt_in_a_gc_callback_stops_the_program(self):
    # CPython drops it there ("Exception ignored in"): the run went on.
    result = self._run('interrupt_in_gc')
    self.assertEqual(result.returncode, 130, result.stderr)
    self.assertNotIn('done', result.stdout)
    self.assertNotIn('Exception ignored', result.stderr)
    # One line, as a user's error (Python's own: a traceback of the frames).
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(
      result.stderr.strip().splitlines()[-1],
      'tool.py: error: interrupted (Ctrl-C).',
    )
    result = self._run('interrupt_in_gc', env={'FLAX_FM_TRACEBACK': '1'})
    self.assertEqual(result.returncode, 130, result.stderr)
    self.assertIn('Traceback', result.stderr)
    self.assertIn('KeyboardInterrupt', result.stderr)

  def test_a_sigterm_stops_the_program_as_a_ctrl_c_does(self):
    # It ended the process at once: no queued checkpoint save finished, and
    # nothing was said. Sent in a gc callback, as the hardest place.
    result = self._run('interrupt_in_gc', 'SIGTERM')
    self.assertEqual(result.returncode, 143, result.stderr)
    self.assertNotIn('done', result.stdout)
    self.assertNotIn('Traceback', result.stderr)
    self.assertEqual(
      result.stderr.strip().splitlines()[-1],
      'tool.py: error: terminated (SIGTERM).',
    )
    result = self._run(
      'interrupt_in_gc', 'SIGTERM', env={'FLAX_FM_TRACEBACK': '1'}
    )
    self.assertEqual(result.returncode, 143, result.stderr)
    self.assertIn('entry.Terminated', result.stderr)

  def test_a_signal_after_main_ends_the_process_without_a_traceback(self):
    # Once main has returned, what is left is the interpreter's shutdown
    # (atexit callbacks, JAX's among them): an exception raised there was
    # printed as `Exception ignored in atexit callback`, with a traceback.
    for name in ('SIGINT', 'SIGTERM'):
      result = self._run('signal_at_exit', name)
      self.assertEqual(result.returncode, -getattr(signal, name), result.stderr)
      self.assertEqual(result.stdout.strip(), 'done')
      self.assertNotIn('Traceback', result.stderr)
      self.assertNotIn('Exception ignored', result.stderr)

  def test_only_pythons_own_interrupt_handler_is_replaced(self):
    # Under nohup or `&` SIGINT comes ignored; a host program may have its
    # own handler: either stays.
    import entry  # pylint: disable=g-import-not-at-top

    # SIGTERM: its default (the end, at once) is replaced, nothing else.
    for signum, default in (
      (signal.SIGINT, signal.default_int_handler),
      (signal.SIGTERM, signal.SIG_DFL),
    ):
      self.addCleanup(signal.signal, signum, signal.getsignal(signum))
      for handler in (signal.SIG_IGN, print):
        signal.signal(signum, handler)
        entry.keep_interrupts()
        self.assertIs(signal.getsignal(signum), handler)
      signal.signal(signum, default)
      entry.keep_interrupts()
      self.assertIs(signal.getsignal(signum), entry._interrupt)

  def test_success_exits_0(self):
    result = self._run('ok')
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertEqual(result.stdout.strip(), 'done')


if __name__ == '__main__':
  absltest.main()
