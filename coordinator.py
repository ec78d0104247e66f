"""Checks `--coordinator_address` before `jax.distributed` is given it.

Given an address that it cannot serve or reach, jaxlib aborts the process
(status 134, a C++ stack) once its initialization timeout has passed;
`check_coordinator` turns each such mistake into one `UserError` first.
Given `num_processes`, process 0 then holds a lobby on the address, where
every other process says its `--process_id` and `--num_processes` before any
joins JAX's coordination service: processes given other counts (or the
same id) all stop at once, instead of waiting out the start-up timeout.
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
# What the lobby's guests say, and what process 0 answers (one line each).
_HELLO, _OK, _ERROR = 'flax_fm hello', 'flax_fm ok', 'flax_fm error '
# Seconds a guest waits past its timeout for process 0's verdict.
_VERDICT_GRACE_SECONDS = 10
# Seconds process 0 tells its error to processes still on their way.
_LATE_SECONDS = 5


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
    UserError: one was given another count, or an id another took (every
      process that came, or comes within `_LATE_SECONDS`, hears it too); or
      not all came within `timeout`.
  """
  deadline = time.monotonic() + timeout
  guests: dict[int, socket.socket] = {}  # By process id.
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
      connection, process, given = guest
      heard.append(connection)
      if process in guests and _closed(guests[process]):
        del guests[process]  # It came again.
      if process in guests or process == 0:
        error = (
          f'Two processes were given --process_id={process} at {address}:'
          ' give each its own, 0 to --num_processes - 1.'
        )
      elif given != count:
        error = (
          f'The processes were given different --num_processes at {address}:'
          f' {count} (process 0), {given} (process {process}). Give every'
          ' process the same.'
        )
      guests.setdefault(process, connection)
    _answer(heard, f'{_ERROR}{error}')
    late = time.monotonic() + _LATE_SECONDS  # Those still on their way.
    while len(guests) < count - 1 and (guest := _next_guest(listener, late)):
      heard.append(guest[0])
      guests.setdefault(guest[1], guest[0])
      _answer([guest[0]], f'{_ERROR}{error}')
    raise UserError(error)
  finally:
    for guest in heard:
      guest.close()


def _next_guest(
  listener: socket.socket, deadline: float
) -> tuple[socket.socket, int, int] | None:
  """The next process to come to `listener` (None: none before `deadline`).

  Returns its connection, id and count. Any other connection (e.g. process
  0's own check of the address) is closed.
  """
  while (left := deadline - time.monotonic()) > 0:
    listener.settimeout(left)
    try:
      connection = listener.accept()[0]
    except TimeoutError:
      return None
    try:
      connection.settimeout(5)  # A guest says hello as it connects.
      words = _read_line(connection).split()
    except OSError:
      words = []
    said = words[2:]
    if words[:2] == _HELLO.split() and (
      len(said) == 2 and all(w.isdigit() for w in said)
    ):
      return connection, int(said[0]), int(said[1])
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
