"""Multi-process training on 127.0.0.1, with real processes and real faults.

N processes of `main.py`, one emulated CPU device each, joined by
`jax.distributed` (gloo collectives), stand in for N hosts. N is
`$FM_TEST_NUM_PROCESSES` (default 2), e.g.

  FM_TEST_NUM_PROCESSES=4 python -m pytest tests/test_multihost.py

Every subprocess is bounded by a timeout and killed with SIGKILL at the end
(JAX's preemption notifier catches SIGTERM).

With 3 or more processes a SIGKILL can make gloo (whose collectives XLA runs
untagged) abort process 0 on a collective mismatch before the heartbeat
timeout; the survivors then name process 0, not the killed one. The kill
test accepts that case only with gloo's abort in process 0's log, and says so
in a warning.
"""

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from unittest import mock
import warnings

from absl.testing import absltest
import numpy as np
import orbax.checkpoint as ocp
import script_runs

from configs import fm as fm_config
import data
import entry
import lock
import multihost
import step_files
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = int(os.environ.get('FM_TEST_NUM_PROCESSES', '2'))
NUM_EPOCHS = 3
# The smoke config's batch of 512 makes 157 steps an epoch, each an
# all-reduce between the processes; 39 of 2048 run the same paths sooner.
BATCH_SIZE = 2048
# --heartbeat_timeout_seconds of the fault test: survivors must stop within
# about this long after a peer dies. Small, but far above scheduling noise.
HEARTBEAT_TIMEOUT = 10
# Seconds allowed on top of the heartbeat timeout on a loaded machine.
SLACK = 15
RUN_TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  """The environment with `num_devices` CPU devices per process.

  conftest.py puts a 2-device flag in XLA_FLAGS; it is replaced. Proxy
  variables are dropped: everything talks over loopback.
  """
  env = {k: v for k, v in os.environ.items() if '_proxy' not in k.lower()}
  flags = re.sub(
    r'--xla_force_host_platform_device_count=\S+',
    '',
    env.get('XLA_FLAGS', ''),
  )
  env['XLA_FLAGS'] = (
    f'{flags} --xla_force_host_platform_device_count={num_devices}'
  ).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  return env


class Run:
  """`main.py` in one or more processes; logs go to files beside workdir.

  A `{i}` in `workdir` becomes the process index (an unshared workdir).
  """

  def __init__(
    self,
    workdir,
    cache,
    num_processes,
    *flags,
    tag='run',
    only=None,
    wrapper=(),
    env=None,
  ):
    self.workdir = workdir
    self.logs = []
    self.procs = []
    base = [
      sys.executable,
      *wrapper,  # A script that runs main.py after injecting a fault.
      'main.py',
      '--config=configs/fm.py:smoke',
      f'--config.dataset.cache_dir={cache}',
      f'--config.num_epochs={NUM_EPOCHS}',
      f'--config.batch_size={BATCH_SIZE}',
      '--config.progress_bar=false',
      *flags,
    ]
    if num_processes > 1:
      base.append(f'--coordinator_address=127.0.0.1:{_free_port()}')
      base.append(f'--num_processes={num_processes}')
    devices = 1 if num_processes > 1 else NUM_PROCESSES
    self.commands = []
    for i in range(num_processes):
      command = base + [f'--workdir={workdir.format(i=i)}']
      command += (only or {}).get(i, [])  # Process i's own flags.
      if num_processes > 1:
        command.append(f'--process_id={i}')
      self.commands.append(command)
      self.logs.append(f'{workdir.format(i=i)}.{tag}.{i}.log')
    self.env = {**_env(devices), **(env or {})}
    self._start()

  def _start(self) -> None:
    for command, log in zip(self.commands, self.logs, strict=True):
      with open(log, 'w') as out:
        self.procs.append(
          subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )

  def log(self, i: int) -> str:
    with open(self.logs[i], errors='replace') as f:
      return f.read()

  def tails(self) -> str:
    return '\n'.join(
      f'--- process {i} ---\n{self.log(i)[-3000:]}'
      for i in range(len(self.logs))
    )

  def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]
    except subprocess.TimeoutExpired as e:
      self.kill()
      raise AssertionError(f'Timed out:\n{self.tails()}') from e

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()


class ForkedRun(Run):
  """A `Run` that stops before training: its processes are forked, when
  `wait` is called, from tests/script_runs.py's server, which spent JAX's
  and main.py's imports once (`script_runs.run_together`). The same script,
  flags, environment and exit path."""

  def _start(self) -> None:
    pass  # At `wait`.

  def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
    codes = script_runs.run_together(
      self.commands, self.env, self.logs, timeout
    )
    if None in codes:
      raise AssertionError(f'Timed out:\n{self.tails()}')
    return codes

  def kill(self) -> None:
    pass  # The server kills its children at the timeout.


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _logged_test_metrics(text: str) -> tuple[str, str, str]:
  """The test line every process logs: auc, logloss, num_examples."""
  found = re.findall(
    r'split=test .*?auc=(\S+) logloss=(\S+) num_examples=(\d+)', text
  )
  assert len(found) == 1, text[-3000:]
  return found[0]


# Runs main.py; process 0's save in checkpoints/$FAULT_DIR from epoch 2 on
# is refused: its checksums.json ($FAULT=checksums, a full disk), orbax's
# meta item ($FAULT=meta, permissions) or a copy of the best's files
# ($FAULT=copy, a full disk).
_INJECT = textwrap.dedent(
  """
  import errno, os, sys
  sys.path.insert(0, {root!r})
  from etils import epath
  import checkpoints, entry, main, step_files

  fault, where = os.environ['FAULT'], os.environ['FAULT_DIR']
  armed = []
  save = checkpoints.save

  def save_armed(mgr, step, *args, **kwargs):
    armed[:] = [step >= 2 and os.path.basename(str(mgr.directory)) == where]
    return save(mgr, step, *args, **kwargs)

  checkpoints.save = save_armed

  def refuse(code, path):
    if armed[0] and '--process_id=0' in sys.argv:
      raise OSError(code, os.strerror(code), str(path))

  if fault == 'checksums':
    write_checksums = step_files.write_checksums

    def failing_checksums(directory):
      refuse(errno.ENOSPC, os.path.join(directory, step_files.CHECKSUMS))
      return write_checksums(directory)

    step_files.write_checksums = failing_checksums

  if fault == 'meta':
    for cls in [epath.Path, *epath.Path.__subclasses__()]:
      if 'write_text' in vars(cls):

        def failing_text(self, *args, _write=vars(cls)['write_text'], **kw):
          if os.path.basename(os.path.dirname(str(self))).startswith('meta'):
            refuse(errno.EACCES, self)
          return _write(self, *args, **kw)

        cls.write_text = failing_text

  if fault == 'copy':
    copy_synced = step_files._copy_synced

    def failing_copy(source, target):
      refuse(errno.ENOSPC, target)
      return copy_synced(source, target)

    step_files._copy_synced = failing_copy

  if fault == 'reload':  # Process 1's listing of what process 0 saved.
    import orbax.checkpoint as ocp

    reload = ocp.CheckpointManager.reload

    def failing_reload(self):
      if armed and armed[0] and '--process_id=1' in sys.argv:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(self.directory))
      return reload(self)

    ocp.CheckpointManager.reload = failing_reload

  if fault == 'unseen':  # Process 1 lists no checkpoint (a stale listing).
    import orbax.checkpoint as ocp

    if '--process_id=1' in sys.argv:
      ocp.CheckpointManager.latest_step = lambda self: None
      ocp.CheckpointManager.all_steps = lambda self, *args, **kwargs: []

  if fault.startswith('init_from'):  # Process 1's read of the source run.
    import best_reader, utils

    load_best = best_reader.load_best

    def other_best(workdir):
      state, meta = load_best(workdir)
      if '--process_id=1' in sys.argv and fault == 'init_from':
        raise utils.UserError(f'No best checkpoint in {{workdir}}.')
      if '--process_id=1' in sys.argv:  # It saved a newer best meanwhile.
        meta = {{**meta, 'epoch': meta['epoch'] + 1}}
      return state, meta

    best_reader.load_best = other_best

  if fault == 'memory' and '--process_id=1' in sys.argv:  # A smaller host.
    import programs

    programs.host_memory = lambda: 2**10

  if fault == 'devices' and '--process_id=1' in sys.argv:  # A second GPU.
    os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=2'

  if fault == 'slow_exit' and '--process_id=1' in sys.argv:  # Ends last.
    import atexit, time

    atexit.register(time.sleep, 3)  # After the peer watch's end, before JAX's.

  sys.argv = sys.argv[1:]
  entry.run_main(main.main)
  """
).format(root=ROOT)


# Process 0's abort when gloo sees messages of different collectives.
_GLOO_MISMATCH = r'gloo::EnforceNotMet|collective mismatch'


def _names_lost(log: str, process: int) -> bool:
  """Whether `log` reports `process` lost: our message or JAX's own."""
  patterns = [
    rf'Lost process(\(es\))? {process} of {NUM_PROCESSES}:',
    rf'stopped sending heartbeats\):\s*{process}\s',
    rf'Task {process} heartbeat timeout',
  ]
  if process == 0:  # It runs the coordination service ("leader").
    patterns.append(r'the leader task was preempted/died')
  return any(re.search(p, log) for p in patterns)


# What jaxlib prints when it aborts a process (a C++ or Python stack).
_STACKS = ('Traceback', 'Check failure stack trace', 'Fatal Python error')


def _lost_in_one_line(test, run, survivor: int, victim: int) -> None:
  """`survivor` ended with status 1 and one line naming `victim` lost."""
  log = run.log(survivor)
  test.assertEqual(run.procs[survivor].returncode, 1, run.tails())
  for stack in _STACKS:
    test.assertNotIn(stack, log, run.tails())
  test.assertRegex(
    log.strip().splitlines()[-1],
    rf'^main.py: error: Lost process\(es\) {victim} of {NUM_PROCESSES}: no'
    rf' heartbeat for {HEARTBEAT_TIMEOUT} s\. Process {survivor} stops\.'
    rf' Start all {NUM_PROCESSES} processes again with the same flags to'
    r' resume from the latest checkpoint\.$',
  )


def _state(workdir: str) -> dict:
  """The latest checkpointed train state as a flat {path: numpy array}."""
  manager = ocp.CheckpointManager(
    os.path.join(workdir, 'checkpoints', 'latest'),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  restored = manager.restore(
    manager.latest_step(),
    args=ocp.args.Composite(state=ocp.args.StandardRestore()),
  )['state']
  manager.close()
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(f'{prefix}/{key}', value)
    elif isinstance(node, (list, tuple)):
      for key, value in enumerate(node):
        walk(f'{prefix}/{key}', value)
    elif node is not None:  # Optax's empty states restore as None.
      flat[prefix] = np.asarray(node)

  walk('', restored)
  return flat


def _csv_flags(path: str, rows: int = 400) -> list[str]:
  """Writes a CSV of clicks at `path`; the flags of a run on it."""
  rng = np.random.default_rng(0)
  with open(path, 'w') as f:
    f.write('user,item,label\n')
    for user, item in rng.integers(0, 20, (rows, 2)).tolist():
      f.write(f'u{user},i{item},{int(user % 3 == item % 2)}\n')
  return [
    '--config.dataset.name=csv',
    f'--config.dataset.path={path}',
    '--config.dataset.csv.label_column=label',
    '--config.batch_size=64',
  ]


def _files(directory: str) -> dict[str, tuple[int, int]]:
  """The inode and modification time of each file in `directory`."""
  paths = {n: os.path.join(directory, n) for n in os.listdir(directory)}
  return {
    n: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for n, p in paths.items()
  }


class _MultiProcessTestCase(absltest.TestCase):
  """A temporary directory and the encoded dataset, shared by the tests."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix='multihost-')
    cls.cache = os.path.join(cls.tmp, 'cache')
    # Encode the dataset once, before any process races to write the cache.
    config = fm_config.get_config('smoke')
    config.dataset.cache_dir = cls.cache
    data.load_dataset(config.dataset)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _start_and_hit_after_first_checkpoint(self, workdir, sig):
    """Starts the processes; sends `sig` to the last after epoch 1's save.

    Returns:
      The run, the victim's index and the monotonic time of the signal.
    """
    victim = NUM_PROCESSES - 1
    timeout = f'--heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT}'
    run = Run(workdir, self.cache, NUM_PROCESSES, timeout, tag='first')
    try:
      first = os.path.join(workdir, 'checkpoints', 'latest', '1')
      deadline = time.monotonic() + RUN_TIMEOUT
      while not os.path.isdir(first):
        self.assertTrue(
          all(p.poll() is None for p in run.procs),
          f'A process ended before the first checkpoint:\n{run.tails()}',
        )
        self.assertLess(time.monotonic(), deadline, run.tails())
        time.sleep(0.02)
      self.assertIsNone(run.procs[victim].poll())
      run.procs[victim].send_signal(sig)
      return run, victim, time.monotonic()
    except BaseException:
      run.kill()
      raise

  def _wait_for_survivors(self, run, victim, since) -> list[int]:
    """Every other process must exit non-zero within the bound."""
    bound = HEARTBEAT_TIMEOUT + SLACK
    survivors = [i for i in range(NUM_PROCESSES) if i != victim]
    for i in survivors:
      try:
        code = run.procs[i].wait(max(since + bound - time.monotonic(), 0))
      except subprocess.TimeoutExpired:
        self.fail(f'Process {i} still runs {bound} s after the fault.')
      self.assertNotEqual(code, 0, run.tails())
    self.assertLess(time.monotonic() - since, bound)
    return survivors


class TrainingTest(_MultiProcessTestCase):
  """N processes against one process with N devices; kill and resume."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # The reference: one process with NUM_PROCESSES emulated devices.
    cls.reference = os.path.join(cls.tmp, 'reference')
    run = Run(cls.reference, cls.cache, 1)
    codes = run.wait()
    assert codes == [0], run.tails()
    cls.reference_metrics = _metrics(cls.reference)

  def _check_same_test_metrics_on_every_process(self, run: Run) -> tuple:
    logged = {_logged_test_metrics(run.log(i)) for i in range(len(run.procs))}
    self.assertLen(logged, 1, run.tails())
    return logged.pop()

  def test_processes_train_as_one_process_with_as_many_devices(self):
    workdir = os.path.join(self.tmp, 'processes')
    run = Run(workdir, self.cache, NUM_PROCESSES)
    self.assertEqual(run.wait(), [0] * NUM_PROCESSES, run.tails())
    self.assertIn(f'JAX process 0 / {NUM_PROCESSES}', run.log(0))

    # Same parameters and optimizer state after the same global batches.
    got, want = _state(workdir), _state(self.reference)
    self.assertEqual(sorted(got), sorted(want))
    self.assertTrue(any('/params/' in key for key in got))
    for key in want:
      np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)

    # Same train/valid/test lines, written once (by process 0).
    metrics = _metrics(workdir)
    self.assertEqual(
      [(r['split'], r['epoch'], r['step']) for r in metrics],
      [(r['split'], r['epoch'], r['step']) for r in self.reference_metrics],
    )
    for a, b in zip(metrics, self.reference_metrics, strict=True):
      for key in ('loss', 'auc', 'logloss'):
        if key in b:
          self.assertAlmostEqual(a[key], b[key], places=6, msg=(key, a, b))
      self.assertEqual(a.get('num_examples'), b.get('num_examples'))

    # Every process evaluated the whole split and reports the same numbers.
    auc, _, count = self._check_same_test_metrics_on_every_process(run)
    self.assertAlmostEqual(float(auc), metrics[-1]['auc'], places=12)
    self.assertEqual(int(count), metrics[-1]['num_examples'])

    # Process 0 wrote the best epoch once: its latest step copies the best's
    # files, orbax's metadata (with its timestamps) included.
    root = os.path.join(workdir, 'checkpoints')
    [best] = os.listdir(os.path.join(root, 'best'))
    self.assertEqual(
      step_files.checksums(os.path.join(root, 'latest', best)),
      step_files.checksums(os.path.join(root, 'best', best)),
    )

  def test_killed_process_stops_the_others_and_restart_resumes(self):
    workdir = os.path.join(self.tmp, 'killed')
    run, victim, killed = self._start_and_hit_after_first_checkpoint(
      workdir, signal.SIGKILL
    )
    try:
      survivors = self._wait_for_survivors(run, victim, killed)
      logs = {i: run.log(i) for i in survivors}
      named = {i for i in survivors if _names_lost(logs[i], victim)}
      if named == set(survivors):
        # Not jaxlib's abort (status -6, a C++ stack) at the heartbeat
        # timeout: the peer watch's one line.
        for i in survivors:
          _lost_in_one_line(self, run, i, victim)
      else:
        # With 3+ processes, gloo (the CPU collectives) can abort process 0
        # on a collective mismatch within milliseconds of the kill, before
        # the heartbeat timeout; its coordination service goes with it and
        # the others report process 0 lost. See the README.
        self.assertGreater(NUM_PROCESSES, 2, run.tails())
        self.assertRegex(logs[0], _GLOO_MISMATCH, run.tails())
        for i in survivors[1:]:
          self.assertTrue(_names_lost(logs[i], 0), run.tails())
        warnings.warn(
          f'gloo aborted process 0 after the kill of process {victim}: the'
          ' survivors named process 0 (README: Multi-device and multi-host).',
          stacklevel=1,
        )
    finally:
      run.kill()
    # The kill came mid-training: there is no test line yet.
    self.assertNotIn('test', [r['split'] for r in _metrics(workdir)])

    # All processes again, same flags: resume from the checkpoint and finish
    # as the uninterrupted run did.
    timeout = f'--heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT}'
    run = Run(workdir, self.cache, NUM_PROCESSES, timeout, tag='again')
    self.assertEqual(run.wait(), [0] * NUM_PROCESSES, run.tails())
    for i in range(NUM_PROCESSES):
      self.assertRegex(run.log(i), r'Resumed from epoch [1-9]')
    metrics = _metrics(workdir)
    self.assertEqual(metrics[-1]['split'], 'test')
    self.assertAlmostEqual(
      metrics[-1]['auc'], self.reference_metrics[-1]['auc'], delta=0.002
    )
    auc, _, _ = self._check_same_test_metrics_on_every_process(run)
    self.assertAlmostEqual(float(auc), metrics[-1]['auc'], places=12)


class FaultTest(_MultiProcessTestCase):
  """A hung process, an unshared workdir, a missing cluster, a save that
  one process cannot write."""

  def test_sigterm_to_every_process_stops_the_run(self):
    # A scheduler's SIGTERM (scancel, docker stop) reaches every process:
    # JAX's preemption notifier took it from entry.py's handler and waited
    # for a sync point never asked for, so the run trained on, unheard.
    workdir = os.path.join(self.tmp, 'terminated')
    run, _, since = self._start_and_hit_after_first_checkpoint(
      workdir, signal.SIGTERM
    )
    try:
      for p in run.procs[:-1]:
        p.send_signal(signal.SIGTERM)
      codes = [
        p.wait(max(since + SLACK - time.monotonic(), 0.1)) for p in run.procs
      ]
    except subprocess.TimeoutExpired:
      self.fail(f'Still running {SLACK} s after SIGTERM:\n{run.tails()}')
    finally:
      run.kill()
    self.assertNotIn(0, codes, run.tails())
    for i in range(NUM_PROCESSES):
      self.assertIn(f'Process {i} of {NUM_PROCESSES} interrupted', run.log(i))
      if codes[i] == 128 + signal.SIGTERM:  # Ended as one process would.
        self.assertNotIn('Traceback', run.log(i), run.tails())
        self.assertEqual(
          run.log(i).strip().splitlines()[-1], 'main.py: terminated (SIGTERM).'
        )
    self.assertIn(128 + signal.SIGTERM, codes, run.tails())
    self.assertNotIn('test', [r['split'] for r in _metrics(workdir)])

  def test_frozen_process_is_declared_dead_after_the_heartbeat_timeout(self):
    # A stopped process (a hung or unreachable host) keeps its sockets open:
    # the others wait in a collective until the coordination service misses
    # its heartbeats, then every one of them stops, naming it.
    workdir = os.path.join(self.tmp, 'frozen')
    run, victim, stopped = self._start_and_hit_after_first_checkpoint(
      workdir, signal.SIGSTOP
    )
    try:
      for i in self._wait_for_survivors(run, victim, stopped):
        # Recoverable, the service no longer aborts the others: without the
        # peer watch they waited in the collective, forever.
        _lost_in_one_line(self, run, i, victim)
    finally:
      run.kill()

  def test_a_process_that_ends_last_is_not_aborted(self):
    # A recoverable run has no shutdown barrier: process 0 stopped the
    # coordination service while process 1 still ended, and jaxlib aborted
    # it (status -6, a C++ stack). The finished run's process 1 ends last.
    run = self._finished()
    for i in range(NUM_PROCESSES):
      for stack in _STACKS:
        self.assertNotIn(stack, run.log(i), run.tails())

  def test_unshared_workdir_stops_every_process_with_a_clear_error(self):
    workdir = os.path.join(self.tmp, 'unshared-{i}')
    run = ForkedRun(workdir, self.cache, NUM_PROCESSES)
    self.assertEqual(run.wait(), [2] * NUM_PROCESSES, run.tails())
    for i in range(NUM_PROCESSES):
      self.assertRegex(
        run.log(i),
        r'main.py: error: --workdir \S+ is not shared: process\(es\) '
        + ', '.join(map(str, range(1, NUM_PROCESSES))),
      )

  def test_processes_with_other_configs_all_stop_naming_the_keys(self):
    # Another learning rate trained apart, silently; another evaluation
    # batch left both processes waiting in other collectives, forever.
    workdir = os.path.join(self.tmp, 'other-configs')
    other = ['--config.learning_rate=0.01', '--config.eval_batch_size=1024']
    cache = f'--config.dataset.cache_dir={self.cache}/../cache'  # Same files.
    run = ForkedRun(
      workdir, self.cache, NUM_PROCESSES, only={1: other + [cache]}
    )
    self.assertEqual(run.wait(), [2] * NUM_PROCESSES, run.tails())
    for i in range(NUM_PROCESSES):
      self.assertRegex(
        run.log(i),
        r'main.py: error: The processes were started with different configs:'
        r' config.eval_batch_size: 0: \d+, 1: 1024.*; config.learning_rate:'
        r' 0: 0.001, 1: 0.01(, \d: 0.001)*\. Start every process with the'
        r' same --config and flags \(only config.dataset.path,'
        r' config.dataset.valid_path, config.dataset.test_path,'
        r' config.dataset.cache_dir, config.dataset.parse_workers,'
        r' config.progress_bar may differ\)\.$',
      )
    self.assertFalse(os.path.exists(os.path.join(workdir, 'config.json')))

  def _refused(self, workdir, culprit, *flags, trains=False, **kwargs):
    """The one line with which every process of a run leaves (status 2,
    within 30 s: before main.py forces an exit or a heartbeat is missed),
    the others naming process `culprit` (None: none), and no traceback.
    Forked (`ForkedRun`) unless the run `trains` first."""
    started = time.monotonic()
    run = (Run if trains else ForkedRun)(
      workdir,
      self.cache,
      NUM_PROCESSES,
      *flags,
      f'--heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT}',
      **kwargs,
    )
    codes = run.wait(HEARTBEAT_TIMEOUT + SLACK)
    self.assertEqual(codes, [2] * NUM_PROCESSES, run.tails())
    self.assertLess(time.monotonic() - started, 30, run.tails())
    lines = set()
    for i in range(NUM_PROCESSES):
      self.assertNotIn('Traceback', run.log(i), run.tails())
      line = run.log(i).strip().splitlines()[-1]
      if culprit is not None and i != culprit:
        self.assertIn(f'main.py: error: Process {culprit}: ', line)
        line = line.replace(f'Process {culprit}: ', '', 1)
      lines.add(line)
    self.assertLen(lines, 1, run.tails())
    return lines.pop()

  def test_changed_data_on_resume_stops_every_process_in_one_line(self):
    # Process 0 alone compared the data with the encoder of the checkpoints:
    # it refused while the others waited in their next collective, until its
    # exit was forced 30 s later and theirs aborted in jaxlib with a trace.
    # Process 0 alone compares the files with sources.json, too.
    workdir = os.path.join(self.tmp, 'changed-data')
    flags = _csv_flags(f'{workdir}.csv')
    run = Run(workdir, self.cache, NUM_PROCESSES, *flags, tag='first')
    self.assertEqual(run.wait(), [0] * NUM_PROCESSES, run.tails())
    encoder = os.path.join(workdir, 'encoder')
    before = _files(encoder)
    with open(f'{workdir}.csv') as f:
      text = f.read()
    with open(f'{workdir}.csv', 'w') as f:  # u1 renamed: other user ids.
      f.write(text.replace('\nu1,', '\nu99,'))
    error = self._refused(workdir, 0, *flags, tag='changed')
    self.assertRegex(
      error,
      r'^main.py: error: workdir [^ ]+ holds checkpoints of a run whose data'
      r' files changed: they differ from those recorded in',
    )
    self.assertEqual(_files(encoder), before)  # Not rewritten.

  def test_a_host_that_cannot_load_its_data_stops_every_process(self):
    # Hosts may read the data from their own paths: a missing file on one
    # left the others waiting for it until the heartbeat timeout.
    workdir = os.path.join(self.tmp, 'no-data')
    missing = os.path.join(self.tmp, 'missing.csv')
    only = {1: [f'--config.dataset.path={missing}']}
    error = self._refused(workdir, 1, *_csv_flags(f'{workdir}.csv'), only=only)
    self.assertEqual(
      error, f'main.py: error: config.dataset.path: {missing} does not exist.'
    )

  def test_hosts_that_loaded_other_data_stop_before_training(self):
    # Each host may read its own copy of the data: one whose copy differs
    # (here a label) would train apart and score other test rows.
    workdir = os.path.join(self.tmp, 'other-data')
    flags = _csv_flags(f'{workdir}.csv')
    with open(f'{workdir}.csv') as f:
      lines = f.readlines()
    lines[-1] = lines[-1][:-2] + ('0' if lines[-1][-2] == '1' else '1') + '\n'
    with open(f'{workdir}.other.csv', 'w') as f:
      f.writelines(lines)
    only = {1: [f'--config.dataset.path={workdir}.other.csv']}
    error = self._refused(workdir, None, *flags, only=only)
    self.assertRegex(
      error,
      r'^main.py: error: The processes loaded different data: \w+: 0: .*'
      r' Give every process the same file at config.dataset.path',
    )
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))

  def test_a_host_that_cannot_make_the_workdir_stops_every_process(self):
    # Each host makes the workdir: one refused there left the others waiting
    # in the check of a shared workdir until the heartbeat timeout.
    blocker = os.path.join(self.tmp, 'a-file')
    with open(blocker, 'w'):
      pass
    only = {1: [f'--workdir={blocker}/run']}
    error = self._refused(os.path.join(self.tmp, 'unmade'), 1, only=only)
    self.assertTrue(
      error.startswith(
        f'main.py: error: workdir {blocker}/run cannot be created: {blocker}'
        ' is a file'
      ),
      error,
    )

  def _finished(self) -> Run:
    """One run of the default flags that finished, for the tests that resume
    one or read its best (each run costs 2 processes). Its process 1 ends
    last, 3 s after the others (`_INJECT`'s slow_exit)."""
    cls = type(self)
    if not hasattr(cls, 'finished'):
      finished = os.path.join(cls.tmp, 'finished')
      script = os.path.join(cls.tmp, 'inject.py')
      with open(script, 'w') as f:
        f.write(_INJECT)
      run = Run(
        finished,
        cls.cache,
        NUM_PROCESSES,
        tag='first',
        wrapper=(script,),
        env={'FAULT': 'slow_exit', 'FAULT_DIR': 'none'},
      )
      self.assertEqual(run.wait(), [0] * NUM_PROCESSES, run.tails())
      cls.finished = run
    return cls.finished

  def _finished_copy(self, name):
    """A copy at `name` of the workdir of `_finished`'s run."""
    workdir = os.path.join(self.tmp, name)
    shutil.copytree(self._finished().workdir, workdir)
    return workdir

  def test_metrics_that_process_0_cannot_write_stop_every_process(self):
    # Process 0 alone writes metrics.jsonl: a full disk there left the
    # others in the epoch's collectives until its exit was forced, 30 s on.
    workdir = self._finished_copy('metrics-unwritable')
    path = os.path.join(workdir, 'metrics.jsonl')
    with open(path) as f:
      lines = f.readlines()
    # A line to drop first (of an epoch past the checkpoints'; a finished
    # run keeps its test line): the file is rewritten,
    later = json.dumps({**json.loads(lines[0]), 'epoch': 99}) + '\n'
    with open(path, 'w') as f:
      f.writelines([later, *lines])
    os.makedirs(f'{path}.tmp')  # where its copy cannot be written.
    error = self._refused(workdir, 0, tag='again')
    self.assertRegex(
      error,
      rf'^main.py: error: Cannot write metrics.jsonl in {workdir}: Is a'
      r' directory \(EISDIR, ',
    )

  def test_an_unreadable_metrics_file_of_process_0_stops_every_process(self):
    # Process 0 alone reads metrics.jsonl on a resume: its error left the
    # others in their next collective until the heartbeat timeout.
    workdir = self._finished_copy('metrics-unreadable')
    path = os.path.join(workdir, 'metrics.jsonl')
    os.remove(path)
    os.makedirs(path)
    error = self._refused(workdir, 0, tag='again')
    self.assertRegex(
      error, rf'^main.py: error: Cannot read {path}: Is a directory \(EISDIR'
    )

  def _injected(self, workdir, culprit, fault, where, trains=False):
    """`_refused` of a run under `_INJECT` with `fault` in checkpoints/`where`
    from epoch 2 on."""
    script = os.path.join(self.tmp, 'inject.py')
    with open(script, 'w') as f:
      f.write(_INJECT)
    return self._refused(
      workdir,
      culprit,
      tag='fault',
      wrapper=(script,),
      env={'FAULT': fault, 'FAULT_DIR': where},
      trains=trains,
    )

  def test_a_state_that_one_host_cannot_hold_stops_every_process(self):
    # Process 1 alone refused the state for its memory: it waited 30 s in
    # JAX's shutdown, and the others in their next collective, then aborted.
    error = self._injected(os.path.join(self.tmp, 'memory'), 1, 'memory', '-')
    self.assertRegex(
      error,
      r'^main.py: error: The train state \(parameters and optimizer slots\)'
      r" needs 0.00 GiB, more than the 0.00 GiB of this host's available",
    )

  def test_processes_given_other_counts_stop_at_once(self):
    # Process 0's --num_processes sets the run's size: one given another
    # (a typo on one host) trained on in a run it did not ask for; given a
    # larger one, process 0 waited for a process that never came, and the
    # others with it, the whole start-up timeout (300 s by default).
    for process in (1, 0):
      error = self._refused(
        os.path.join(self.tmp, f'count-{process}'),
        None,
        only={process: [f'--num_processes={NUM_PROCESSES + 1}']},
        tag=f'count-{process}',
      )
      zero, other = NUM_PROCESSES, NUM_PROCESSES + 1
      if process == 0:
        zero, other = other, zero
      self.assertRegex(
        error,
        r'^main.py: error: The processes were given different'
        rf' --num_processes at 127.0.0.1:\d+: {zero} \(process 0\), {other}'
        r' \(process \d+\)\. Give every process the same\.$',
      )

  def test_a_bad_flag_on_one_process_stops_every_process_at_once(self):
    # It stopped at once; the others waited for it the whole start-up
    # timeout (300 s by default).
    for culprit in (1, 0):
      error = self._refused(
        os.path.join(self.tmp, f'bad-flag-{culprit}'),
        culprit,
        only={culprit: ['--config.num_epochs=x']},
        tag=f'bad-flag-{culprit}',
      )
      self.assertEqual(
        error,
        'main.py: error: --config.num_epochs=x: config.num_epochs takes an'
        f" integer, e.g. {NUM_EPOCHS}; 'x' is not one.",
      )

  def test_hosts_with_other_device_counts_stop_in_one_line(self):
    # A host with another GPU visible: every process stopped in its first
    # collective with a traceback, "cannot reshape array of size 3".
    workdir = os.path.join(self.tmp, 'devices')
    error = self._injected(workdir, None, 'devices', 'none')
    self.assertRegex(
      error,
      r'^main.py: error: The processes have different numbers of devices:'
      r' {process: devices} {0: 1, 1: 2(, \d+: 1)*}\. Give each the same'
      r' \(e.g. CUDA_VISIBLE_DEVICES, XLA_FLAGS\)\.$',
    )
    self.assertFalse(os.path.exists(workdir))

  def test_a_process_that_sees_no_checkpoint_stops_every_process(self):
    # It would start over while the others resume: other collectives.
    workdir = self._finished_copy('unseen')
    latest = max(map(int, os.listdir(f'{workdir}/checkpoints/latest')))
    error = self._injected(workdir, None, 'unseen', 'none')
    self.assertRegex(
      error,
      '^main.py: error: The processes see different latest checkpoints in'
      rf' {re.escape(workdir)}: {{0: {latest}, 1: -1(, \d+: {latest})*}}'
      r' \(-1: none\)\.',
    )

  def test_init_from_that_one_process_reads_otherwise_stops_every_process(
    self,
  ):
    # Each process reads config.init_from: one that could not (storage it
    # does not share) left the others in their next collective, and two
    # that read other best epochs of a run still training trained apart.
    source = self._finished_copy('init-source')
    best = [m['epoch'] for m in _metrics(source) if m['split'] == 'test'][0]
    script = os.path.join(self.tmp, 'inject.py')
    with open(script, 'w') as f:
      f.write(_INJECT)
    for fault, culprit, error in [
      ('init_from', 1, f'No best checkpoint in {source}.'),
      (
        'init_from_epoch',
        None,
        'The processes see different best checkpoints (config.init_from) in'
        f' {source}: {{0: {best}, 1: {best + 1}}}',
      ),
    ]:
      line = self._refused(
        os.path.join(self.tmp, fault),
        culprit,
        f'--config.init_from={source}',
        tag='fault',
        wrapper=(script,),
        env={'FAULT': fault, 'FAULT_DIR': 'none'},
      )
      self.assertTrue(line.startswith(f'main.py: error: {error}'), line)

  def _refused_save(self, name, fault, where, reason):
    """A run whose process 0 cannot save in checkpoints/`where` at epoch 2
    (`fault`): every process stops in one line naming `reason`, epoch 1's
    checkpoints and the best are intact, and a rerun resumes from them."""
    workdir = os.path.join(self.tmp, name)
    error = self._injected(workdir, 0, fault, where, trains=True)
    ckpts = os.path.join(workdir, 'checkpoints')
    self.assertRegex(
      error,
      '^main.py: error: Cannot save the checkpoint of epoch 2 in'
      f' {re.escape(os.path.join(ckpts, where))}: {re.escape(reason)}',
    )
    # Epoch 1's latest step and the best (epoch 1's, or 2's saved before a
    # refused latest) are whole, as their checksums say.
    best = 1 if where == 'best' else 2
    for step in (os.path.join('latest', '1'), os.path.join('best', str(best))):
      path = os.path.join(ckpts, step)
      self.assertTrue(os.path.exists(os.path.join(path, step_files.CHECKSUMS)))
      self.assertIsNone(step_files.damage(path), path)
    self.assertNotIn('2', os.listdir(os.path.join(ckpts, 'latest')))
    self.assertEqual(
      [(r['split'], r['epoch']) for r in _metrics(workdir)],
      [('train', 1), ('valid', 1), ('train', 2), ('valid', 2)],
    )

    run = Run(workdir, self.cache, NUM_PROCESSES, tag='again')
    self.assertEqual(run.wait(), [0] * NUM_PROCESSES, run.tails())
    for i in range(NUM_PROCESSES):
      self.assertIn('Resumed from epoch 1 ', run.log(i))
    metrics = _metrics(workdir)
    self.assertEqual(
      [(r['split'], r['epoch']) for r in metrics],
      [(s, e) for e in range(1, NUM_EPOCHS + 1) for s in ('train', 'valid')]
      + [('test', metrics[-1]['epoch'])],
    )
    best = os.path.join(ckpts, 'best', str(metrics[-1]['epoch']))
    self.assertTrue(os.path.exists(os.path.join(best, step_files.CHECKSUMS)))

  def test_a_checksum_file_that_process_0_cannot_write_stops_every_process(
    self,
  ):
    # Process 0 alone writes a step's checksums.json. While orbax's save
    # was collective, its full disk left the others training on into their
    # next collective, until its exit was forced 30 s later and jaxlib
    # aborted theirs (SIGABRT, a fatal-error trace).
    self._refused_save(
      'checksums-refused',
      'checksums',
      'best',
      'No space left on device (ENOSPC, ',
    )

  def test_an_orbax_write_refused_on_process_0_alone_stops_every_process(
    self,
  ):
    # Orbax's own write: while its save was collective, the others waited
    # in its next barrier, as above. In the best: an improving epoch's
    # latest copies the best's files, with no orbax write to refuse.
    self._refused_save(
      'meta-refused', 'meta', 'best', 'Permission denied (EACCES, '
    )

  def test_a_latest_copy_refused_on_process_0_stops_every_process(self):
    # Epoch 2 improves: its latest copies the best's files (process 0
    # alone), and the best of epoch 2 stays.
    self._refused_save(
      'copy-refused', 'copy', 'latest', 'No space left on device (ENOSPC, '
    )

  def test_a_listing_that_fails_on_process_1_alone_stops_every_process(self):
    # The others list the steps that process 0 saved: an error there left
    # process 0 in its next collective until the heartbeat timeout.
    workdir = os.path.join(self.tmp, 'reload-refused')
    error = self._injected(workdir, 1, 'reload', 'best', trains=True)
    best = os.path.join(workdir, 'checkpoints', 'best')
    self.assertRegex(
      error,
      f'^main.py: error: Cannot read the checkpoints in {re.escape(best)}:'
      r' Input/output error \(EIO, ',
    )
    run = Run(workdir, self.cache, NUM_PROCESSES, tag='again')
    self.assertEqual(run.wait(), [0] * NUM_PROCESSES, run.tails())
    for i in range(NUM_PROCESSES):
      self.assertIn('Resumed from epoch 1 ', run.log(i))

  def test_a_process_that_never_joins_is_what_the_others_report(self):
    # jaxlib's own abort, at its timeout, says "another task died" of a task
    # that never came, with a C++ stack (status 134): ours ends it first.
    result = subprocess.run(
      [
        sys.executable,
        'main.py',
        '--config=configs/fm.py:smoke',
        f'--workdir={os.path.join(self.tmp, "alone")}',
        f'--coordinator_address=127.0.0.1:{_free_port()}',
        '--num_processes=2',
        '--process_id=0',
        '--initialization_timeout_seconds=4',
      ],
      cwd=ROOT,
      env=_env(1),
      capture_output=True,
      text=True,
      timeout=RUN_TIMEOUT,
    )
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertRegex(
      result.stderr.splitlines()[-1],
      r'^main.py: error: Not every process joined the run at'
      r' 127.0.0.1:\d+ within the 4 s of --initialization_timeout_seconds:'
      r' start all 2 with the same --coordinator_address and --num_processes,'
      r' each with its own --process_id\.$',
    )
    self.assertNotIn('Fatal Python error', result.stderr)

  def test_distributed_without_cluster_or_flags_says_what_to_pass(self):
    env = {
      k: v
      for k, v in _env(1).items()
      if not k.startswith(('SLURM_', 'OMPI_', 'PMI_', 'TPU_'))
    }
    # Any of the flags asks for a multi-process run, as --distributed does.
    for flag, unset in (
      ('--distributed', '--coordinator_address, --num_processes, --process_id'),
      ('--num_processes=2', '--coordinator_address, --process_id'),
      ('--process_id=0', '--coordinator_address, --num_processes'),
    ):
      result = script_runs.run(  # It stops before JAX's backends start.
        [
          'main.py',
          '--config=configs/fm.py:smoke',
          f'--workdir={os.path.join(self.tmp, "nocluster")}',
          flag,
        ],
        env=env,
      )
      self.assertEqual(result.returncode, 2, result.stderr[-3000:])
      self.assertNotIn('Traceback', result.stderr)
      last = result.stderr.strip().splitlines()[-1]
      self.assertRegex(
        last,
        r'^main.py: error: Cannot join a multi-process run: coordinator_address'
        rf' should be defined. Set {unset}: ',
      )
      self.assertFalse(os.path.exists(os.path.join(self.tmp, 'nocluster')))


@contextlib.contextmanager
def _among(count, others, index=0):
  """This process as process `index` of `count`: each `process_allgather(x)`
  gathers `x` with what the others send, `others(x)` (arrays like `x`)."""

  def gather(x):
    rows = [np.asarray(y) for y in others(np.asarray(x))]
    rows.insert(index, np.asarray(x))
    return np.stack(rows)

  with (
    mock.patch.object(multihost.jax, 'process_count', return_value=count),
    mock.patch.object(multihost.jax, 'process_index', return_value=index),
    mock.patch.object(
      multihost.multihost_utils, 'process_allgather', side_effect=gather
    ),
  ):
    yield


class UserErrorTest(absltest.TestCase):
  """A run set up wrong stops with a UserError (one line, status 2)."""

  def test_missing_flags_are_named(self):
    refusals = (
      ValueError('coordinator_address should be defined.'),
      ValueError('process_id and num_processes must be nonnegative.'),
      ValueError('coordinator_address should be defined.'),
      multihost.jax.errors.JaxRuntimeError('UNAVAILABLE: bind failed'),
      TypeError('process_id must be a nonnegative int.'),
    )
    with (
      mock.patch.dict(os.environ),
      mock.patch.object(multihost.jax.config, 'update'),
      mock.patch.object(
        multihost.jax.distributed, 'initialize', side_effect=refusals
      ),
      mock.patch.object(multihost, 'check_coordinator'),
    ):
      os.environ.pop('JAX_COORDINATOR_ADDRESS', None)
      with self.assertRaisesRegex(
        UserError,
        r'^Cannot join a multi-process run: coordinator_address should be'
        r' defined. Set --coordinator_address, --process_id: every process'
        r' passes --coordinator_address=<host:port of process 0>',
      ):
        multihost.setup_distributed(num_processes=2)
      with self.assertRaisesRegex(
        UserError, r'must be nonnegative. Check the flags: every process'
      ):
        multihost.setup_distributed('127.0.0.1:1234', 2, 2)
      with self.assertRaisesRegex(  # Process 0 is set, not missing.
        UserError, r'defined\. Set --coordinator_address: every process'
      ):
        multihost.setup_distributed(None, 2, 0)
      with self.assertRaisesRegex(
        UserError,
        r'^Cannot join a multi-process run at h:1: UNAVAILABLE: bind failed\.'
        r' Check --coordinator_address and start the processes again\.$',
      ):
        multihost.setup_distributed('h:1', 2, 0)
      with self.assertRaisesRegex(  # As a cluster may give it.
        UserError, r'nonnegative int\. Check the flags: every process'
      ):
        multihost.setup_distributed('h:1', 2, '0')

  def test_jax_and_the_address_check_get_what_the_flags_say(self):
    # Process 0 checks the address too; $JAX_COORDINATOR_ADDRESS stands in
    # for the flag (JAX reads it itself); an out-of-range process_id is
    # left to JAX's own error.
    for flags, checked in (
      (('h:1', 2, 0), ('h:1', 0, 50)),
      ((None, 2, 1), ('env-host:2', 1, 50)),
      (('h:1', 2, 2), None),
    ):
      with (
        mock.patch.dict(os.environ, {'JAX_COORDINATOR_ADDRESS': 'env-host:2'}),
        mock.patch.object(multihost.jax.config, 'update'),
        mock.patch.object(multihost.jax.distributed, 'initialize') as init,
        mock.patch.object(multihost, 'check_coordinator') as check,
        mock.patch.object(multihost.jax, 'process_count', return_value=2),
        mock.patch.object(multihost, 'gather_text', return_value=['', '']),
      ):
        multihost.setup_distributed(
          *flags, heartbeat_timeout_seconds=7, initialization_timeout_seconds=50
        )
      self.assertEqual(check.call_args and check.call_args.args, checked)
      if checked:  # Process 0 hears the others' counts.
        self.assertEqual(check.call_args.kwargs, {'num_processes': 2})
      init.assert_called_once_with(
        coordinator_address=flags[0],
        num_processes=2,
        process_id=flags[2],
        # Longer than ours: the process ends in one line before jaxlib's
        # abort.
        initialization_timeout=50 + multihost.JOIN_GRACE_SECONDS,
        heartbeat_timeout_seconds=7,
      )

  def test_the_join_timeout_waits_only_for_what_the_flags_name(self):
    # Under Slurm the address and count are the cluster's: nothing to name,
    # and jaxlib keeps the timeout given.
    for flags, started in (
      ((None, None, None), False),
      ((None, 2, 0), False),
      (('h:1', None, None), False),
      (('h:1', 2, 0), True),
    ):
      with (
        mock.patch.dict(os.environ),
        mock.patch.object(multihost.jax.config, 'update'),
        mock.patch.object(multihost.jax.distributed, 'initialize') as init,
        mock.patch.object(multihost, 'check_coordinator'),
        mock.patch.object(multihost.threading, 'Timer') as timer,
        mock.patch.object(multihost.jax, 'process_count', return_value=2),
        mock.patch.object(multihost, 'gather_text', return_value=['', '']),
      ):
        os.environ.pop('JAX_COORDINATOR_ADDRESS', None)
        multihost.setup_distributed(*flags, initialization_timeout_seconds=50)
      self.assertEqual(timer.return_value.start.called, started, flags)
      timer.return_value.cancel.assert_called_once()
      self.assertEqual(timer.call_args.args[0], 50)
      grace = multihost.JOIN_GRACE_SECONDS if started else 0
      self.assertEqual(
        init.call_args.kwargs['initialization_timeout'], 50 + grace, flags
      )

  def test_coordinator_address_is_checked_before_jax_gets_it(self):
    def free_port():
      with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

    check = multihost.check_coordinator
    malformed = ('localhost', 'localhost:0', 'localhost:65536', ':80', 'h:ht')
    for address in malformed:
      with self.assertRaisesRegex(UserError, 'expected host:port'):
        check(address, 0, 1)
    with self.assertRaisesRegex(
      UserError, r"no-such-host.invalid:1234: cannot resolve 'no-such-host"
    ):
      check('no-such-host.invalid:1234', 1, 1)
    with self.assertRaisesRegex(  # idna's UnicodeError: an empty label.
      UserError, r"^--coordinator_address=a..b:1234: cannot resolve 'a..b'"
    ):
      check('a..b:1234', 1, 1)
    with self.assertRaisesRegex(  # IPv6, bracketed: parsed and resolved.
      UserError, r'^--coordinator_address=\[::1\]:\d+: process 0 did not'
    ):
      check(f'[::1]:{free_port()}', 1, 0.3)
    port = free_port()
    check(f'127.0.0.1:{port}', 0, 1)  # Free, and here.
    # Again: the first check's connection (in TIME_WAIT) holds no port.
    check(f'127.0.0.1:{port}', 0, 1)
    refused = OSError(errno.EADDRNOTAVAIL, 'Cannot assign requested address')
    with mock.patch.object(socket.socket, 'bind', side_effect=refused):
      check(f'127.0.0.1:{port}', 0, 1)  # Not "in use": jaxlib says what.
    with self.assertRaisesRegex(
      UserError,
      r'^--coordinator_address=192.0.2.1:\d+: process 0 .* does'
      r' not reach this host',
    ):  # TEST-NET-1: no host of it answers.
      check(f'192.0.2.1:{free_port()}', 0, 1, probe_timeout=0.2)
    with self.assertRaisesRegex(UserError, r'did not answer within 0.3 s'):
      check(f'127.0.0.1:{port}', 1, 0.3)
    with socket.create_server(('', port)):
      with self.assertRaisesRegex(UserError, f'port {port} is in use'):
        check(f'127.0.0.1:{port}', 0, 1)
      check(f'127.0.0.1:{port}', 1, 0.3)  # Process 0 answers.
    # The address leads to another host's listener: refused in time.
    failed = []
    with socket.create_server(('127.0.0.1', 0)) as elsewhere:
      connect = socket.create_connection
      with mock.patch.object(
        socket,
        'create_connection',
        lambda _, timeout: connect(elsewhere.getsockname(), timeout),
      ):
        probe = threading.Thread(
          target=self._raised,
          args=(failed, check, f'127.0.0.1:{free_port()}', 0, 1, 0.3),
          daemon=True,
        )
        probe.start()
        probe.join(10)
    self.assertRegex(str(failed), r'a connection to it does not reach this')

  @staticmethod
  def _raised(into: list, function, *args) -> None:
    """Calls `function(*args)`; appends the UserError it raised to `into`."""
    try:
      function(*args)
    except UserError as e:
      into.append(e)

  def _two_processes(self, gathered):
    return (
      mock.patch.object(multihost.jax, 'process_count', return_value=2),
      mock.patch.object(multihost.jax, 'process_index', return_value=0),
      mock.patch.object(
        multihost.multihost_utils, 'broadcast_one_to_all', lambda x: x
      ),
      mock.patch.object(multihost.multihost_utils, 'sync_global_devices'),
      mock.patch.object(
        multihost, 'allgather', return_value=np.array(gathered)
      ),
    )

  def test_unshared_workdir(self):
    workdir = tempfile.mkdtemp()
    with contextlib.ExitStack() as stack:
      for patch in self._two_processes([1, 0]):
        stack.enter_context(patch)
      with self.assertRaisesRegex(
        UserError, f'--workdir {workdir} is not shared: process\\(es\\) 1 '
      ):
        multihost.check_shared_workdir(workdir)
    self.assertEqual(os.listdir(workdir), [])  # The check file is gone.

  def test_processes_that_loaded_other_data(self):
    # Hosts may read the data from their own paths; what they loaded must
    # agree, or they train apart and score other test rows.
    config = fm_config.get_config('smoke').dataset
    config.cache_dir = tempfile.mkdtemp()
    dataset = data.load_dataset(config)
    test = dataset.test
    flipped = np.array(test.labels)
    flipped[-1] = 1 - flipped[-1]
    moved = np.array(test.ids)
    moved[0] = moved[1]
    fingerprint = multihost._fingerprint
    for other, message in (
      (dataset, None),
      (
        dataclasses.replace(dataset, test=dataclasses.replace(test, ids=moved)),
        r'^The processes loaded different data: test: 0: \[10085, \d+,'
        r' "\w{12}"\], 1: \[10085, \d+, "\w{12}"\]\. Give every process',
      ),
      (
        dataclasses.replace(
          dataset, test=dataclasses.replace(test, labels=flipped)
        ),
        r'^The processes loaded different data: test: 0: \[10085, (\d+),'
        r' "\w{12}"\], 1: \[10085, (?!\1)\d+, "\w{12}"\]\.',
      ),
      (
        dataclasses.replace(dataset, field_dims=(611, 9726)),
        r'^The processes loaded different data: fields: .*9725.*9726.*'
        r'config.dataset.path',
      ),
      *self._other_parts(dataset),
    ):
      texts = [json.dumps(fingerprint(d)) for d in (dataset, other)]
      with (
        mock.patch.object(multihost.jax, 'process_count', return_value=2),
        mock.patch.object(multihost, 'gather_text', return_value=texts),
      ):
        if message is None:
          multihost.assert_same_data(dataset)
        else:
          with self.assertRaisesRegex(UserError, message):
            multihost.assert_same_data(dataset)

  @staticmethod
  def _other_parts(dataset):
    """(`dataset` with one part changed, the message naming that part alone)
    for each part that `assert_same_data` compares."""
    replace = dataclasses.replace

    def last_row_changed(split):  # Beyond the first 1024 rows.
      ids = np.array(split.ids)
      ids[-1, 0] = (ids[-1, 0] + 1) % dataset.field_dims[0]
      return replace(split, ids=ids)

    vocabulary = list(dataset.vocabulary)
    vocabulary[1] = vocabulary[1][::-1]
    test = dataset.test
    dense = np.zeros((len(test), 1), np.float32)
    # A host's copy of the file with rows changed between the splits' ends:
    # only the files' digests tell (it trained apart, unnoticed).
    sources = {r: {**s, 'sha256': '0' * 64} for r, s in dataset.sources.items()}
    assert sources, 'no data file digests to compare'
    for other, part in (
      (replace(dataset, sources=sources), 'sources'),
      (replace(dataset, train=last_row_changed(dataset.train)), 'train'),
      (replace(dataset, valid=last_row_changed(dataset.valid)), 'valid'),
      (replace(dataset, test=last_row_changed(test)), 'test'),
      (replace(dataset, test=replace(test, dense=dense)), 'test'),
      (replace(dataset, vocabulary=tuple(vocabulary)), 'vocabularies'),
      (replace(dataset, multi_vocabulary=(np.arange(3),)), 'vocabularies'),
      (replace(dataset, multi_field_dims=(3,)), 'fields'),
      (replace(dataset, dense_names=('age',)), 'fields'),
    ):
      yield other, rf'^The processes loaded different data: {part}: [^;]*\. '

  def test_host_keys_may_differ_and_nothing_else(self):
    base = {'dataset.path': '/a', 'progress_bar': True, 'seed': 0}
    two = mock.patch.object(multihost.jax, 'process_count', return_value=2)

    def sent(flat):  # What this process's config sends to the others.
      with (
        two,
        mock.patch.object(
          multihost, 'gather_text', side_effect=lambda text: [text, text]
        ) as gather,
      ):
        multihost.assert_same_config(flat)
      return gather.call_args.args[0]

    for other, message in (
      ({'dataset.path': '/b', 'progress_bar': False}, None),
      ({'dataset.valid_path': '/b/v', 'dataset.test_path': '/b/t'}, None),
      ({'seed': 1}, r'configs: config.seed: 0: 0, 1: 1\. Start every'),
      ({'seed': None}, r'configs: config.seed: 0: 0, 1: null\. Start'),
      # A key that process 0's config lacks (another config file's); every
      # difference, in key order.
      ({'model.extra': 1}, r'configs: config.model.extra: 0: null, 1: 1\. '),
      (
        {'seed': 2, 'model.extra': 1, 'learning_rate': 0.1},
        r'configs: config.learning_rate: 0: null, 1: 0.1; config.model.extra:'
        r' 0: null, 1: 1; config.seed: 0: 0, 1: 2\. ',
      ),
    ):
      texts = [sent(base), sent(dict(base, **other))]
      with two, mock.patch.object(multihost, 'gather_text', return_value=texts):
        if message is None:
          multihost.assert_same_config(base)
        else:
          with self.assertRaisesRegex(UserError, message):
            multihost.assert_same_config(base)

  def test_errors_shared_raises_any_error_of_one_process_on_all(self):
    # Only a UserError was sent: after another error of one process (an
    # OSError of process 0 on metrics.jsonl) the others waited in their next
    # collective, and a UserError without text read as no error.
    for error, kind, text in (
      (UserError(''), UserError, r'^Process 0: $'),
      (
        IsADirectoryError(21, 'Is a directory'),
        RuntimeError,
        r'^Process 0: IsADirectoryError: \[Errno 21\] Is a directory$',
      ),
    ):
      with mock.patch.object(
        multihost, 'gather_text', side_effect=lambda t: [t, '']
      ) as gather:
        with self.assertRaises(type(error)), multihost.errors_shared():
          raise error
      sent = [c.args[0] for c in gather.call_args_list]
      self.assertLen(sent, 1)
      with (  # What the other process raises.
        mock.patch.object(multihost, 'gather_text', return_value=sent + ['']),
        self.assertRaisesRegex(kind, text),
        multihost.errors_shared(),
      ):
        pass

  def test_gather_text_pads_and_cuts_each_process_text(self):
    sent = ['{"a": 1}', '{"bb": "é"}']
    data = [np.frombuffer(t.encode(), np.uint8) for t in sent]
    width = max(map(len, data))
    gathered = iter(
      [
        np.array([len(d) for d in data], np.int32),
        np.concatenate([np.pad(d, (0, width - len(d))) for d in data]),
      ]
    )
    with mock.patch.object(
      multihost, 'allgather', side_effect=lambda x: next(gathered)
    ):
      self.assertEqual(multihost.gather_text(sent[0]), sent)

  def test_processes_that_see_other_checkpoints(self):
    with contextlib.ExitStack() as stack:
      for patch in self._two_processes([3, -1]):
        stack.enter_context(patch)
      with self.assertRaisesRegex(
        UserError,
        r'The processes see different latest checkpoints in /w:'
        r' \{0: 3, 1: -1\} \(-1: none\)',
      ):
        multihost.assert_same_on_all_processes(3, 'latest checkpoints', '/w')

  def test_process_1_sees_the_file_that_process_0_wrote_before_the_barrier(
    self,
  ):
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    token = np.arange(8, dtype=np.uint8)  # Process 0's, broadcast.
    path = os.path.join(workdir, '.shared-0001020304050607')
    for shared in (True, False):

      def barrier(_, shared=shared):  # Process 0 wrote before it came.
        if shared:
          open(path, 'w').close()

      with (
        _among(2, lambda x: [np.ones_like(x)], index=1),
        mock.patch.object(
          multihost.multihost_utils, 'broadcast_one_to_all', return_value=token
        ),
        mock.patch.object(
          multihost.multihost_utils, 'sync_global_devices', side_effect=barrier
        ),
      ):
        if shared:
          multihost.check_shared_workdir(workdir)
          os.remove(path)  # Process 1 leaves it to process 0.
        else:
          with self.assertRaisesRegex(
            UserError, r'is not shared: process\(es\) 1 do not see'
          ):
            multihost.check_shared_workdir(workdir)

  def test_what_each_process_sends_is_compared(self):
    for value, others, seen in (
      (None, [3], r'\{0: -1, 1: 3\} \(-1: none\)'),
      (3, [3, -1], r'\{0: 3, 1: 3, 2: -1\}'),
      (3, [3, 3], None),
    ):
      with _among(
        1 + len(others), lambda x, o=others: [np.int32(v) for v in o]
      ):
        if seen is None:
          multihost.assert_same_on_all_processes(value, 'steps', '/w')
          continue
        with self.assertRaisesRegex(
          UserError, r'^The processes see different steps in /w: ' + seen
        ):
          multihost.assert_same_on_all_processes(value, 'steps', '/w')

  def test_no_error_anywhere_raises_nothing_and_any_process_error_does(self):
    with _among(2, lambda x: [x]):
      with multihost.errors_shared():
        pass
      self.assertEqual(multihost.gather_text(''), ['', ''])
      self.assertEqual(multihost.gather_text('é'), ['é', 'é'])  # 2 bytes.
      np.testing.assert_array_equal(
        multihost.allgather(np.arange(3)), [0, 1, 2, 0, 1, 2]
      )
    with (
      mock.patch.object(multihost, 'gather_text', return_value=['', 'Uno']),
      self.assertRaisesRegex(UserError, r'^Process 1: no$'),
      multihost.errors_shared(),
    ):
      pass

  def test_an_interrupt_does_not_wait_for_the_other_processes(self):
    # They are not in the same collective: a Ctrl-C would wait forever.
    with mock.patch.object(multihost, 'gather_text') as gather:
      with self.assertRaises(KeyboardInterrupt), multihost.errors_shared():
        raise KeyboardInterrupt
    gather.assert_not_called()

  def test_process_0_alone_locks_and_every_process_hears_a_refusal(self):
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
    with multihost.lock_workdir(workdir, False):
      self.assertEqual(os.listdir(workdir), [])
    with multihost.lock_workdir(workdir, True):
      self.assertEqual(os.listdir(workdir), [lock.LOCK_FILE])
      with (
        mock.patch.object(
          multihost, 'gather_text', side_effect=lambda t: [t, '']
        ) as gather,
        self.assertRaisesRegex(UserError, 'already in use'),
      ):
        multihost.lock_workdir(workdir, True)
    self.assertRegex(gather.call_args.args[0], r'^Uworkdir \S+ is already in')


class _Exited(Exception):
  """What the tests' `os._exit` raises instead of ending the process."""


class LostPeerTest(absltest.TestCase):
  """A failed process waits for the others; failed alone, it exits with 1."""

  def _all_failed(self, **barrier):
    """`all_failed(2.5)`, its barrier answering as `barrier` says (a
    `side_effect`); returns the answer and the barrier's arguments."""
    client = mock.Mock()
    client.wait_at_barrier.configure_mock(**barrier)
    with mock.patch.object(
      multihost.peer_watch.distributed.global_state, 'client', client
    ):
      answer = multihost.all_failed(2.5)
    return answer, client.wait_at_barrier.call_args.args

  def test_all_failed_is_whether_every_process_came_to_the_barrier(self):
    answer, args = self._all_failed()
    self.assertIs(answer, True)
    self.assertEqual(args, ('flax_fm: every process failed', 2500))
    error = multihost.jax.errors.JaxRuntimeError
    timeout = error('DEADLINE_EXCEEDED: Barrier timed out. Id: x')
    self.assertIs(self._all_failed(side_effect=timeout)[0], False)
    unreachable = error('UNAVAILABLE: Failed to send RPC to coordination')
    self.assertIs(self._all_failed(side_effect=unreachable)[0], unreachable)

  def _stop(self, error, failed, count=2):
    """`stop_after_failure(error, 10)` in process 1 of `count`, whose wait
    for the others answers `failed`. Returns the exit status (None: it
    returned), the last error logged, and the seconds given to `all_failed`
    (None: not asked)."""
    with (
      mock.patch.object(multihost.jax, 'process_count', return_value=count),
      mock.patch.object(multihost.jax, 'process_index', return_value=1),
      mock.patch.object(multihost, 'all_failed', return_value=failed) as ask,
      mock.patch.object(multihost.os, '_exit', side_effect=_Exited) as exit_,
      self.assertLogs('absl', 'ERROR') as logs,
    ):
      try:
        multihost.stop_after_failure(error, 10)
      except _Exited:
        pass
    last = logs.records[-1]
    if isinstance(error, KeyboardInterrupt):  # One line, as one process.
      self.assertFalse(last.exc_info)
    elif exit_.called:  # The traceback of what stopped it goes with it.
      self.assertIs(last.exc_info[1], error)
    status = exit_.call_args.args[0] if exit_.called else None
    return status, last.getMessage(), ask.call_args and ask.call_args.args

  def test_a_process_that_failed_alone_exits(self):
    error = RuntimeError('collective failed')
    again = ' Start all 2 processes again with the same flags to resume'
    for failed, message in (
      (False, 'Process 1 of 2 failed alone while the others still run;'),
      (
        ConnectionError('gone'),
        'Lost process 0 of 2: the JAX coordination service it runs is'
        ' unreachable (gone). Process 1 stops.',
      ),
    ):
      status, logged, asked = self._stop(error, failed)
      self.assertEqual(status, 1, failed)
      self.assertTrue(logged.startswith(message), logged)
      self.assertIn(again, logged)
      self.assertEqual(asked, (20,))  # The heartbeat timeout, and some.

  def test_all_failed_alike_return_to_re_raise(self):
    status, logged, asked = self._stop(ValueError('bad config'), True)
    self.assertIsNone(status)
    self.assertEqual(asked, (20,))
    self.assertEqual(
      logged,
      'Process 1 of 2 stopped: ValueError: bad config. Waiting for the others'
      ' (at most 20 s): a process that was lost is named when the JAX'
      ' coordination service misses its heartbeats.',
    )

  def test_an_interrupted_process_exits_without_asking(self):
    # The question would wait for peers that go on training.
    status, logged, asked = self._stop(KeyboardInterrupt(), True)
    self.assertEqual((status, asked), (130, None))  # As one process.
    self.assertTrue(logged.startswith('Process 1 of 2 interrupted;'), logged)
    self.assertEqual(self._stop(entry.Terminated(), True)[0], 143)

  def test_a_single_process_returns_at_once(self):
    with (
      mock.patch.object(multihost, 'all_failed') as ask,
      mock.patch.object(multihost.os, '_exit') as exit_,
    ):
      multihost.stop_after_failure(RuntimeError('x'), 10)
    self.assertFalse(ask.called or exit_.called)


if __name__ == '__main__':
  absltest.main()
