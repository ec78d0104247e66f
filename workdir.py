"""The workdir of a run: who owns it, and which config its checkpoints are of.

`prepare` checks that the path can hold a run (a directory this process can
write), `acquire` makes this process its only writer, and `check_resume`
keeps the record of the config the checkpoints come from, so that a restart
either continues that run or stops.

The lock is `fcntl.flock` on `<workdir>/run.lock`, held open for the whole
run. The kernel holds it exactly as long as the process lives: a second run
is refused at once, two runs started together cannot both win, and a killed
run leaves nothing to clean up. On NFS, Linux turns `flock` into a POSIX
lock that the server arbitrates between hosts, and frees when a crashed
host's lease expires (NFSv4: 90 s by default). The file also holds the
holder's host, pid, start time and a heartbeat (rewritten every
`HEARTBEAT_SECONDS`): for the refusal message, and as a second guard where
locks are not shared between hosts (NFS mounted `nolock`, some FUSE file
systems). A record that its holder did not mark released when it ended is
a live run's if, on this host, the lock is held (or, without lock support,
its pid exists); on another host, if its heartbeat moves within
`WATCH_BEATS` of its intervals, watched by the newcomer (no clocks are
compared). Otherwise it is taken over with a warning.
"""

import datetime
import errno
import fcntl
import getpass
import json
import os
import socket
import sys
import tempfile
import threading
import time
from typing import Any

from absl import logging
import ml_collections

from utils import UserError

LOCK_FILE = 'run.lock'
CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
HEARTBEAT_SECONDS = 10.0
WATCH_BEATS = 2.5

# Config keys (dotted) that a resumed run may change: they touch neither the
# data, the split, the parameters nor the arithmetic of the steps taken.
# Every other key, including any added later, refuses a resume until it is
# listed here. Evaluation masks its padding (any eval_batch_size gives the
# same metrics); init_from is read only by a run that starts from scratch;
# the cache's place and chunk size do not change what it holds; downloads
# are checked against fixed checksums whatever their URL.
SAFE_KEYS = (
  *('num_epochs', 'patience', 'log_every_steps', 'progress_bar'),
  *('eval_batch_size', 'init_from'),
  *('dataset.cache_dir', 'dataset.chunk_rows', 'dataset.url'),
)

# Lock files this process holds: a second `acquire` of the same workdir in
# one process must be refused here, because POSIX locks (flock on NFS) do not
# conflict within a process and closing the second descriptor would drop the
# first one's lock.
_held: set[str] = set()
_held_guard = threading.Lock()


# --------------------------------------------------------------------------
# The directory.


def prepare(workdir: str) -> str:
  """Creates `workdir` if needed; returns its absolute path.

  Raises:
    UserError: the path is not a directory, cannot be created, or it or the
      files a run rewrites in it are not writable by this process.
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(
      f'workdir {path} exists and is not a directory. Pass the path of a'
      ' directory (it is created if missing), or move the file away.'
    )
  if not os.path.isdir(path):
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise UserError(_cannot_create(path, e)) from e
  try:
    fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f'workdir {path} is not writable ({e.strerror}). Choose a directory'
      f' that {_user()} can write, or ask for write access to it.'
    ) from e
  stuck = [p for p in _rewritten_paths(path) if not os.access(p, os.W_OK)]
  if stuck:
    raise UserError(
      f'workdir {path} holds files or directories that a run must rewrite but'
      f' {_user()} cannot write: {", ".join(stuck[:5])}'
      f'{" and more" if len(stuck) > 5 else ""}. Restore write access (chmod,'
      ' or chattr -i where they were made immutable), or use another workdir.'
    )
  return path


def _cannot_create(path: str, error: OSError) -> str:
  """Why `os.makedirs(path)` failed, naming the ancestor that stopped it."""
  ancestor = os.path.dirname(path)
  while ancestor != os.path.dirname(ancestor) and not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    return (
      f'workdir {path} cannot be created: {ancestor} is a file, not a'
      ' directory. Choose another path.'
    )
  return (
    f'workdir {path} cannot be created in {ancestor} ({error.strerror}).'
    f' Choose a path under a directory that {_user()} can write, or create'
    ' the directory first with the right owner.'
  )


def _rewritten_paths(path: str) -> list[str]:
  """Existing files and directories of `path` that a resumed run writes."""
  found = [
    os.path.join(path, name)
    for name in (LOCK_FILE, CONFIG_FILE, HISTORY_FILE, 'metrics.jsonl')
    if os.path.exists(os.path.join(path, name))
  ]
  # Orbax writes new steps into these directories and deletes old ones.
  for root, dirs, _ in os.walk(os.path.join(path, 'checkpoints')):
    found.append(root)
    found.extend(os.path.join(root, d) for d in dirs)
  return sorted(set(found))


def _user() -> str:
  try:
    return f'user {getpass.getuser()}'
  except (KeyError, OSError):  # No passwd entry (some containers).
    return f'uid {os.getuid()}'


# --------------------------------------------------------------------------
# The lock.


class Lock:
  """This process's hold on a workdir; `release` (or leave `with`) to end it.

  Attributes:
    path: the lock file (None for a process that does not lock).
    taken_over_from: the record of a dead holder whose lock this one took
      over, else None.
  """

  def __init__(
    self,
    path: str | None = None,
    fd: int | None = None,
    record: dict | None = None,
    previous: dict | None = None,
    beat: float = 0.0,
  ):
    self.path, self.taken_over_from = path, previous
    self._fd, self._record = fd, record
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(beat,))
    self._thread.daemon = True
    if fd is not None:
      self._thread.start()

  def _beat(self, seconds: float) -> None:
    warned = False
    while not self._stop.wait(seconds):
      self._record['heartbeat'] = time.time()
      try:
        _write_record(self._fd, self._record)
      except OSError as e:
        if not warned:  # The run itself will meet the same disk soon.
          logging.warning('Cannot update the lock file %s: %s', self.path, e)
          warned = True

  def release(self) -> None:
    """Marks the record released and unlocks; a second call does nothing."""
    if self._fd is None:
      return
    self._stop.set()
    self._thread.join(timeout=10)
    self._record.update(released=True, released_time=_now_text())
    try:
      _write_record(self._fd, self._record)
    except OSError as e:
      logging.warning('Cannot mark %s released: %s', self.path, e)
    os.close(self._fd)  # Unlocks.
    self._fd = None
    with _held_guard:
      _held.discard(os.path.realpath(self.path))

  def __enter__(self) -> 'Lock':
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def acquire(
  workdir: str,
  *,
  enabled: bool = True,
  heartbeat_seconds: float = HEARTBEAT_SECONDS,
) -> Lock:
  """Makes this process the only run in `workdir`, or refuses at once.

  Args:
    workdir: an existing directory (see `prepare`).
    enabled: False returns a lock that holds nothing: in a multi-process run
      only process 0 locks the shared workdir.
    heartbeat_seconds: how often the holder rewrites its heartbeat.

  Raises:
    UserError: another live run holds the workdir (the message names its
      host, pid and start time), or the lock file cannot be written.
  """
  if not enabled:
    return Lock()
  path = os.path.join(workdir, LOCK_FILE)
  key = os.path.realpath(path)
  with _held_guard:
    if key in _held:
      raise UserError(
        f'workdir {workdir} is already in use by this process (pid'
        f' {os.getpid()}); finish that run before starting another in it.'
      )
    _held.add(key)
  fd = None
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    previous = _lock(workdir, fd)
    record = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'user': _user().removeprefix('user '),
      'command': ' '.join(sys.argv),
      'start_time': _now_text(),
      'heartbeat': time.time(),
      'heartbeat_seconds': heartbeat_seconds,
      'released': False,
    }
    _write_record(fd, record)
    return Lock(path, fd, record, previous, heartbeat_seconds)
  except BaseException as e:
    with _held_guard:
      _held.discard(key)
    if fd is not None:
      os.close(fd)
    if isinstance(e, OSError):
      raise UserError(
        f'Cannot write the lock file {path} ({e.strerror}). Make it writable'
        f' by {_user()} (or free space), or use another workdir.'
      ) from e
    raise


def _lock(workdir: str, fd: int) -> dict | None:
  """Locks `fd`; returns the record of a dead holder it takes over."""
  locked = True
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd)
    raise UserError(_busy(workdir, holder, '')) from None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    locked = False
    logging.warning(
      'The file system of %s does not support locks (%s): only the record in'
      ' %s guards against a second run in this workdir.',
      workdir,
      e.strerror,
      LOCK_FILE,
    )
  previous = _parse(os.pread(fd, 1 << 16, 0))
  if not previous or previous.get('released'):
    return None
  why = _live_reason(workdir, fd, previous, locked)
  if why:
    raise UserError(_busy(workdir, previous, why))
  logging.warning(
    'Taking over workdir %s from %s, which ended without releasing it.',
    workdir,
    _describe(previous),
  )
  return previous


def _live_reason(workdir: str, fd: int, record: dict, locked: bool) -> str:
  """Why an unreleased record may be a live run's ('' if it cannot be)."""
  if record.get('host') == socket.gethostname():
    if not locked and _pid_alive(record.get('pid')):
      return ' Its process still exists.'
    return ''  # With the lock held here, the kernel says the holder is gone.
  # Locks may not reach across hosts: alive if its heartbeat still moves.
  beat = record.get('heartbeat_seconds', HEARTBEAT_SECONDS)
  watch = WATCH_BEATS * min(float(beat), 60.0)
  logging.warning(
    'workdir %s: %s did not release it; watching its heartbeat for %.1f s.',
    workdir,
    _describe(record),
    watch,
  )
  deadline = time.monotonic() + watch
  while time.monotonic() < deadline:
    time.sleep(min(watch / 10, 1.0))
    now = _parse(os.pread(fd, 1 << 16, 0))
    if now and now.get('released'):
      return ''
    if now and now.get('heartbeat') != record.get('heartbeat'):
      return (
        f' Its heartbeat in {LOCK_FILE} still moves although this process'
        ' got the lock: this file system does not share locks between'
        ' hosts.'
      )
  return ''


def _pid_alive(pid: Any) -> bool:
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Another user's process.
  return True


def _busy(workdir: str, holder: dict | None, why: str) -> str:
  who = _describe(holder) if holder else 'another process'
  return (
    f'workdir {workdir} is in use by {who}.{why} Two runs in one workdir'
    " would overwrite each other's checkpoints and metrics: wait for that"
    ' run to finish or stop it, or use another workdir.'
  )


def _describe(record: dict) -> str:
  text = (
    f'pid {record.get("pid")} on host {record.get("host")}'
    f' (user {record.get("user", "unknown")}), started'
    f' {record.get("start_time", "at an unknown time")}'
  )
  if record.get('command'):
    text += f', command: {record["command"]}'
  return text


def _read_holder(fd: int) -> dict | None:
  """The holder's record; briefly waits while a new holder writes it."""
  deadline = time.monotonic() + 2.0
  while True:
    record = _parse(os.pread(fd, 1 << 16, 0))
    if record and not record.get('released'):
      return record
    if time.monotonic() > deadline:
      return None
    time.sleep(0.05)


def _parse(raw: bytes) -> dict | None:
  try:
    record = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None  # Empty, or caught in the middle of a rewrite.
  return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict) -> None:
  # Through the locked descriptor only: opening the file a second time in
  # this process and closing it would drop a POSIX (NFS) lock. fsync: NFS
  # clients see the heartbeat without waiting for a close.
  raw = (json.dumps(record) + '\n').encode('utf-8')
  os.pwrite(fd, raw, 0)
  os.ftruncate(fd, len(raw))
  os.fsync(fd)


def _now_text() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


# --------------------------------------------------------------------------
# The config the checkpoints come from.


def flatten(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """`{dotted key: JSON value}` of a config, whatever its nesting.

  Values are normalised as `config.json` stores them (tuples become lists),
  so a config compares equal to its own record.
  """
  if isinstance(config, ml_collections.ConfigDict):
    tree = json.loads(config.to_json_best_effort())
  else:
    tree = json.loads(json.dumps(config, default=str))
  flat = {}

  def walk(node: dict, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = value

  walk(tree, '')
  return flat


def is_safe(key: str) -> bool:
  """Whether a resumed run may change config key `key` (dotted)."""
  return key in SAFE_KEYS


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints/*/` holds a step (orbax names it by step)."""
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return False
  for manager in os.listdir(root):
    directory = os.path.join(root, manager)
    if os.path.isdir(directory) and any(
      name.isdigit() for name in os.listdir(directory)
    ):
      return True
  return False


def check_resume(
  workdir: str,
  config: ml_collections.ConfigDict,
  *,
  resuming: bool | None = None,
  write: bool = True,
) -> list[dict]:
  """Records the config of a new run, or checks that a restart continues it.

  A run without checkpoints (re)writes `config.json`, the record of the
  config its checkpoints will come from, and starts an empty history. A run
  with checkpoints compares its config with the record as updated by
  `config_history.jsonl`: a change of any key outside `SAFE_KEYS` is
  refused; safe changes are appended to the history. Call it before the
  data is loaded and before any checkpoint is restored.

  Args:
    workdir: the run's directory (see `prepare`).
    config: this run's config.
    resuming: whether the workdir holds checkpoints; None: `has_checkpoints`.
    write: whether this process writes (every process checks).

  Returns:
    The safe changes as appended to the history: `time`, `key`, `old`,
    `new` (either left out where the key is absent).

  Raises:
    UserError: a change that would not continue the recorded run (every
      differing key with its old and new value), or an unreadable record.
  """
  if resuming is None:
    resuming = has_checkpoints(workdir)
  record_path = os.path.join(workdir, CONFIG_FILE)
  history_path = os.path.join(workdir, HISTORY_FILE)
  new = flatten(config)
  if not resuming or not os.path.exists(record_path):
    if resuming:
      logging.warning(
        '%s holds checkpoints but no %s: recording this config as theirs'
        ' without a check.',
        workdir,
        CONFIG_FILE,
      )
    if write:
      _write_atomic(record_path, config.to_json_best_effort(indent=2) + '\n')
      if os.path.exists(history_path):
        os.remove(history_path)
    return []

  old = _recorded(record_path, history_path)
  keys = sorted(set(old) | set(new))
  changed = [k for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
  refused = [k for k in changed if not is_safe(k)]
  if refused:
    differences = '; '.join(
      f'{k} {_show(old, k)} -> {_show(new, k)}' for k in refused
    )
    raise UserError(
      f'workdir {workdir} holds checkpoints of a run with another config,'
      f' and resuming it with this one would not continue that run:'
      f' {differences} (recorded in {record_path}). Set these back to'
      ' resume; to start a new run instead, use another workdir or delete'
      f' this one. Only {", ".join(SAFE_KEYS)} may change on a resume.'
    )
  entries = []
  for k in changed:
    entry = {'time': _now_text(), 'key': k}
    entry.update({n: v[k] for n, v in (('old', old), ('new', new)) if k in v})
    entries.append(entry)
    logging.info('Resumed with %s %s -> %s', k, _show(old, k), _show(new, k))
  if entries and write:
    with open(history_path, 'a') as f:
      f.write(''.join(json.dumps(e) + '\n' for e in entries))
  return entries


_ABSENT = object()


def _show(flat: dict, key: str) -> str:
  return json.dumps(flat[key]) if key in flat else '(absent)'


def _recorded(record_path: str, history_path: str) -> dict[str, Any]:
  """The recorded config with the history's changes applied, flattened."""
  try:
    with open(record_path) as f:
      record = json.load(f)
    if not isinstance(record, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    raise UserError(
      f'Cannot read {record_path}, the config of the checkpoints in its'
      f' workdir ({e}). Start a new run in another workdir; or, only if you'
      ' know that the checkpoints come from this config, delete the file to'
      ' record it as theirs.'
    ) from e
  flat = flatten(record)
  if os.path.exists(history_path):
    with open(history_path) as f:
      for line in f:
        try:
          entry = json.loads(line)
        except json.JSONDecodeError:
          continue  # A line cut short by a kill: its change is logged again.
        if 'new' in entry:
          flat[entry['key']] = entry['new']
        else:
          flat.pop(entry['key'], None)
  return flat


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
