"""Checks `--coordinator_address` before `jax.distributed` is given it.

Given an address that it cannot serve or reach, jaxlib aborts the process
(status 134, a C++ stack) once its initialization timeout has passed;
`check_coordinator` turns each such mistake into one `UserError` first.
"""

import errno
import socket
import time

from utils import UserError


def check_coordinator(
  address: str, process_id: int, timeout: float, probe_timeout: float = 5.0
) -> None:
  """Checks `address` before `jax.distributed.initialize` is given it.

  Given an address it cannot serve or reach, jaxlib aborts the process
  (status 134, no Python exception) once its initialization timeout has
  passed. So process 0 checks here that the address's port is free and that
  the address reaches this process (a listener of its own, for a moment),
  and every other process waits, up to `timeout` seconds, until process 0
  answers there.

  Args:
    address: `host:port` of process 0's coordination service.
    process_id: this process.
    timeout: seconds a process other than 0 waits for process 0.
    probe_timeout: seconds process 0 waits for its own connection.

  Raises:
    UserError: the address is malformed, unknown, taken, or does not reach
      process 0 (the message says which and what to do).
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
    _check_served_here(flag, found, probe_timeout)
    return
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
          f'{flag}: process 0 did not answer within {timeout:g} s ({e}).'
          ' Start process 0 with the same --coordinator_address, naming its'
          ' own host and a port that the other hosts can reach.'
        ) from e
    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _check_served_here(flag: str, found: tuple, timeout: float) -> None:
  """Process 0: the port is free here, and a connection to it comes here.

  `found` is the address's first `socket.getaddrinfo` entry, `flag` the flag
  and its value (for messages), `timeout` the seconds to wait for the
  connection.
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
