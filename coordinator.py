"""Checks `--coordinator_address` before `jax.distributed` is given it.

Given an address that it cannot serve or reach, jaxlib aborts the process
(status 134, a C++ stack) once its initialization timeout has passed;
`check_coordinator` turns each such mistake into one `UserError` first.
Given `num_processes`, process 0 then holds a lobby on the address, where
every other process says its `--process_id` and `--num_processes` before any
joins JAX's coordination service: processes given other counts (or the
same id) all stop at once, instead of waiting out the start-up timeout. A
process that cannot start (a bad flag) tells them there too
(`report_failure`).
"""

from collections.abc import Callable, Iterable
import errno
import socket
import time

from utils import UserError

UNJOINED = (
  'Not every process joined the run at %s within the %s s of'
  ' --initialization_timeout_seconds: start all %s with the same'
  ' --coordinator_address and --num_processes, each with its own --process_id.'
)
# What the lobby's guests say (hello, or failed), and what process 0 answers
# (ok, or error): one line each.
_PREFIX = 'flax_fm'
_HELLO, _FAILED = f'{_PREFIX} hello', f'{_PREFIX} failed'
_OK, _ERROR = f'{_PREFIX} ok', f'{_PREFIX} error '
# Seconds a guest waits past its timeout for process 0's verdict.
_VERDICT_GRACE_SECONDS = 10
# Seconds process 0 tells its error to processes still on their way.
_LATE_SECONDS = 5
# Seconds a process that could not start tries to tell the others.
REPORT_SECONDS = 10


def check_coordinator(
  address: str,
  process_id: int,
  timeout: float,
  probe_timeout: float = 5.0,
  num_processes: int | None = None,
) -> None:
  """Checks `address` before `jax.distributed.initialize` is given it.

  Given an address it cannot serve or reach, jaxlib aborts the process
  (status 134, no Python exception) once its initialization timeout has
  passed. So process 0 checks here that the address's port is free and that
  the address reaches this process (a listener of its own, for a moment),
  and every other process waits, up to `timeout` seconds, until process 0
  answers there. Given `num_processes`, they meet there first (the lobby):
  each other process says its id and count, and process 0 answers every one
  once all came, or at once that they were given other counts.

  Args:
    address: `host:port` of process 0's coordination service.
    process_id: this process.
    timeout: seconds a process other than 0 waits for process 0.
    probe_timeout: seconds process 0 waits for its own connection.
    num_processes: this process's `--num_processes`; None: no lobby.

  Raises:
    UserError: the address is malformed, unknown, taken, or does not reach
      process 0; or the processes were given other counts or the same id, or
      not all came within `timeout` (the message says which and what to do).
  """
  flag = f'--coordinator_address={address}'
  host, colon, port = address.rpartition(':')
  host = host.strip('[]')  # An IPv6 address is written [::1]:port.
  if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
    raise UserError(
      f'{flag}: expected host:port of process 0, e.g. 10.0.0.1:1234.'
    )
  port = int(port)
  try:
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  except (OSError, UnicodeError) as e:
    raise UserError(
      f'{flag}: cannot resolve {host!r} ({e}). Name the host of process 0'
      ' by a name or IP address that every process can resolve.'
    ) from e
  if process_id == 0:
    lobby = None
    if num_processes is not None and num_processes > 1:
      lobby = lambda listener: _lobby(listener, address, num_processes, timeout)
    _check_served_here(flag, found, probe_timeout, lobby)
    return
  deadline = time.monotonic() + timeout
  while True:
    error = 'it closed the connection'
    try:
      with socket.create_connection((host, port), timeout=5) as connection:
        if num_processes is None:
          return
        if _visit(connection, process_id, num_processes, address, timeout):
          return
    except OSError as e:
      error = e
    if time.monotonic() >= deadline:
      raise UserError(
        f'{flag}: process 0 did not answer within {timeout:g} s ({error}).'
        ' Start process 0 with the same --coordinator_address, naming its'
        ' own host and a port that the other hosts can reach.'
      )
    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def report_failure(
  address: str, process_id: int, num_processes: int, message: str
) -> None:
  """Tells the other processes why this one could not start (e.g. a flag).

  Else they wait for it the whole start-up timeout. Process 0 holds the
  lobby, telling each that comes; another process tells process 0's lobby,
  which tells them. At most `REPORT_SECONDS`, and best effort: an address
  that does not serve or reach the lobby is left alone.
  """
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  if not (host and port.isdigit() and num_processes > 1):
    return
  line = ' '.join(message.split())  # One line.
  try:
    if process_id == 0:
      _tell_guests(host, int(port), f'Process 0: {line}', num_processes)
    else:
      _tell_lobby(host, int(port), f'{_FAILED} {process_id} {line}')
  except (OSError, UnicodeError):
    pass


def _tell_guests(host: str, port: int, error: str, count: int) -> None:
  """Process 0: tells `error` to the others as they come to its lobby."""
  family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
  heard = []
  with socket.socket(family, socket.SOCK_STREAM) as listener:
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('::' if family == socket.AF_INET6 else '', port))
    listener.listen()
    try:
      _tell_late(listener, error, set(), count, heard, REPORT_SECONDS)
    finally:
      for guest in heard:
        guest.close()


def _tell_lobby(host: str, port: int, line: str) -> None:
  """Another process: says `line` in process 0's lobby, once it is there."""
  deadline = time.monotonic() + REPORT_SECONDS
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, port), timeout=2) as connection:
        connection.sendall(f'{line}\n'.encode())
        connection.settimeout(max(deadline - time.monotonic(), 0.1))
        if _read_line(connection):  # Process 0 answered: it heard.
          return
    except OSError:
      pass
    time.sleep(0.5)


def _visit(
  connection: socket.socket,
  process_id: int,
  num_processes: int,
  address: str,
  timeout: float,
) -> bool:
  """A process other than 0 in the lobby: whether process 0 let it join.

  It waits for process 0's answer up to `timeout` seconds, and some.
  Returns False where the connection closed unanswered (process 0 took it
  for its own check): the caller connects again.

  Raises:
    UserError: process 0's verdict; or JAX's coordination service (not the
      lobby) answered, or no verdict came in time.
  """
  connection.sendall(f'{_HELLO} {process_id} {num_processes}\n'.encode())
  connection.settimeout(timeout + _VERDICT_GRACE_SECONDS)
  try:
    answer = _read_line(connection)
  except TimeoutError as e:
    raise UserError(UNJOINED % (address, f'{timeout:g}', num_processes)) from e
  if not answer:
    return False
  if answer == _OK:
    return True
  if answer.startswith(_ERROR):
    raise UserError(answer.removeprefix(_ERROR))
  raise UserError(
    f"Process 0 already runs JAX's coordination service at {address}: the"
    ' run started without this process. Give each process its own'
    ' --process_id (0 to --num_processes - 1) and start them all again.'
  )


def _lobby(
  listener: socket.socket, address: str, count: int, timeout: float
) -> None:
  """Process 0: waits until every other process came to `listener`.

  Each says its id and count; once all `count` - 1 came, each hears OK.

  Raises:
    UserError: one was given another count, or an id another took, or one
      could not start (every process that came, or comes within
      `_LATE_SECONDS`, hears it too); or not all came within `timeout`.
  """
  deadline = time.monotonic() + timeout
  guests: dict[int, socket.socket] = {}  # Those waiting, by process id.
  heard = []  # Every guest's connection, to close.
  try:
    error = None
    while error is None:
      for process in [p for p, c in guests.items() if _closed(c)]:
        del guests[process]  # Left (e.g. stopped): it may come again.
      if len(guests) == count - 1:
        _answer(guests.values(), _OK)
        return
      if (guest := _next_guest(listener, deadline)) is None:
        message = UNJOINED % (address, f'{timeout:g}', count)
        _answer(guests.values(), f'{_ERROR}{message}')
        raise UserError(message)
      connection, process, said = guest
      heard.append(connection)
      if process in guests and _closed(guests[process]):
        del guests[process]  # It came again.
      if isinstance(said, str):
        error = f'Process {process}: {said}'
      elif process in guests or process == 0:
        error = (
          f'Two processes were given --process_id={process} at {address}:'
          ' give each its own, 0 to --num_processes - 1.'
        )
      elif said != count:
        error = (
          f'The processes were given different --num_processes at {address}:'
          f' {count} (process 0), {said} (process {process}). Give every'
          ' process the same.'
        )
      guests.setdefault(process, connection)
    _answer(heard, f'{_ERROR}{error}')
    _tell_late(listener, error, set(guests), count, heard, _LATE_SECONDS)
    raise UserError(error)
  finally:
    for guest in heard:
      guest.close()


def _tell_late(
  listener: socket.socket,
  error: str,
  told: set[int],
  count: int,
  heard: list[socket.socket],
  seconds: float,
) -> None:
  """Tells `error` to the processes that come within `seconds`, until
  every one of the `count` - 1 but process 0 heard it (the ids `told`)."""
  until = time.monotonic() + seconds
  while len(told - {0}) < count - 1 and (guest := _next_guest(listener, until)):
    heard.append(guest[0])
    told.add(guest[1])
    _answer([guest[0]], f'{_ERROR}{error}')


def _next_guest(
  listener: socket.socket, deadline: float
) -> tuple[socket.socket, int, int | str] | None:
  """The next process to come to `listener` (None: none before `deadline`).

  Returns its connection, id, and count (int) or why it could not start
  (str). Any other connection (e.g. process 0's own check of the address) is
  closed.
  """
  while (left := deadline - time.monotonic()) > 0:
    listener.settimeout(left)
    try:
      connection = listener.accept()[0]
    except TimeoutError:
      return None
    try:
      connection.settimeout(5)  # A guest says hello as it connects.
      words = _read_line(connection).split(' ', 3)
    except OSError:
      words = []
    if len(words) == 4 and words[0] == _PREFIX and words[2].isdigit():
      if words[1] == 'hello' and words[3].isdigit():
        return connection, int(words[2]), int(words[3])
      if words[1] == 'failed':
        return connection, int(words[2]), words[3]
    connection.close()
  return None


def _answer(guests: Iterable[socket.socket], line: str) -> None:
  """Tells every guest `line` (OK, or an error)."""
  for connection in guests:
    try:
      connection.sendall(f'{line}\n'.encode())
    except OSError:
      pass  # Gone: it waits no more.


def _closed(connection: socket.socket) -> bool:
  """Whether the other end of `connection` has closed it."""
  timeout = connection.gettimeout()
  connection.setblocking(False)  # Else recv waits out the timeout first.
  try:
    return connection.recv(1, socket.MSG_PEEK) == b''
  except BlockingIOError:
    return False
  except OSError:
    return True
  finally:
    connection.settimeout(timeout)


def _read_line(connection: socket.socket, limit: int = 4096) -> str:
  """One line from `connection`, without its newline ('' at its end)."""
  data = b''
  while not data.endswith(b'\n') and len(data) < limit:
    try:
      chunk = connection.recv(limit - len(data))
    except ConnectionResetError:
      chunk = b''  # Closed with our words unread.
    if not chunk:
      break
    data += chunk
  return data.decode(errors='replace').rstrip('\n')


def _check_served_here(
  flag: str,
  found: tuple,
  timeout: float,
  lobby: Callable[[socket.socket], None] | None = None,
) -> None:
  """Process 0: the port is free here, and a connection to it comes here.

  `found` is the address's first `socket.getaddrinfo` entry, `flag` the flag
  and its value (for messages), `timeout` the seconds to wait for the
  connection. Then `lobby`, if given, is held on the listener.
  """
  family, _, _, _, target = found
  port = target[1]
  with socket.socket(family, socket.SOCK_STREAM) as listener:
    # As the coordination service binds: the TIME_WAIT of past connections
    # does not hold the port, a listening socket does.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      listener.bind(('::' if family == socket.AF_INET6 else '', port))
      listener.listen()
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return  # Not the address's fault: let jaxlib say what it is.
      raise UserError(
        f'{flag}: port {port} is in use on this host. Choose a free port'
        ' and give it to every process.'
      ) from e
    listener.settimeout(timeout)
    try:
      with socket.create_connection(target[:2], timeout=timeout):
        listener.accept()[0].close()  # Ours, not another host's listener.
    except OSError as e:
      raise UserError(
        f'{flag}: process 0 serves the coordination service there, but a'
        f' connection to it does not reach this host ({e}). Give an address'
        ' of the host that runs process 0.'
      ) from e
    if lobby is not None:
      lobby(listener)
