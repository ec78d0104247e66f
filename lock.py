"""The lock that makes one process the only run in a workdir.

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
import threading
import time
from typing import Any

from absl import logging

from utils import UserError

LOCK_FILE = 'run.lock'
HEARTBEAT_SECONDS = 10.0
WATCH_BEATS = 2.5

# Lock files this process holds: a second `acquire` of the same workdir in
# one process must be refused here, because POSIX locks (flock on NFS) do not
# conflict within a process and closing the second descriptor would drop the
# first one's lock.
_held: set[str] = set()
_held_guard = threading.Lock()


def user() -> str:
  """`user <name>` of this process, or `uid <n>` without a passwd entry."""
  try:
    return f'user {getpass.getuser()}'
  except (KeyError, OSError):  # No passwd entry (some containers).
    return f'uid {os.getuid()}'


def now_text() -> str:
  """The local time, ISO 8601 to the second, with its UTC offset."""
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


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
    self._record.update(released=True, released_time=now_text())
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
      host, pid and start time), or the lock file cannot be written; or
      the workdir is an export (export.py), whose encoder/ a run rewrites.
  """
  if not enabled:
    return Lock()
  # Before anything is written in it, the lock included.
  if os.path.exists(os.path.join(workdir, 'signature.json')):
    raise UserError(
      f'workdir {workdir} is an export (export.py: signature.json), not a'
      ' run: training in it would overwrite its encoder/. Use another'
      ' workdir.'
    )
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
      'user': user().removeprefix('user '),
      'command': ' '.join(sys.argv),
      'start_time': now_text(),
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
        f' by {user()} (or free space), or use another workdir.'
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


def running(workdir: str) -> str:
  """Who runs in `workdir` from this host, as a refusal names it; or ''.

  Read only: a lock taken to test it, however briefly, would refuse a run
  that starts at that moment, and a second descriptor of this process's own
  lock file, once closed, would drop its POSIX (NFS) lock. A run on another
  host is not judged: its pid means nothing here.
  """
  path = os.path.join(workdir, LOCK_FILE)
  with _held_guard:
    if os.path.realpath(path) in _held:
      return f'this process, pid {os.getpid()}'
  try:
    record = _read_record(path)
  except OSError:
    return ''
  if (
    not record
    or record.get('released')
    or record.get('host') != socket.gethostname()
    or not _pid_alive(record.get('pid'))
  ):
    return ''
  return _describe(record)


def may_be_held(workdir: str) -> bool:
  """Whether a run may hold `workdir` now, and so write in it as it is read.

  False only where no run can: there is no lock file (every run takes the
  lock before it writes), or its record is marked released, or it names
  this host and a process that is gone. A record of another host (a shared
  file system) may be a live run's, whose pid means nothing here; one that
  cannot be read, or is caught as it is written, may be a run's that
  starts. Read only, as `running`.
  """
  path = os.path.join(workdir, LOCK_FILE)
  with _held_guard:
    if os.path.realpath(path) in _held:
      return True
  try:
    record = _read_record(path)
  except FileNotFoundError:
    return False
  except OSError:
    return True
  if not record:
    return True
  if record.get('released'):
    return False
  if record.get('host') == socket.gethostname():
    return _pid_alive(record.get('pid'))
  return True


def _read_record(path: str) -> dict | None:
  """The record in lock file `path` (None: empty or half written)."""
  with open(path, 'rb') as f:
    return _parse(f.read(1 << 16))


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
