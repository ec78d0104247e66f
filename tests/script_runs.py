"""`python <script> <flags>` for runs that stop early, without its start-up.

A run of main.py, predict.py or export.py that ends in an error before its
work spends most of its time importing JAX, Flax and the project. `run`
sends the script and its argv to a server process of this process (started
at the first call) that imported them once; the server forks a child that
runs the script as `__main__` (`runpy.run_path`) with `sys.argv` and the
working directory the command line would give, its stdout and stderr in
files, and reports its exit status. The same file, flags and exit path as
`python <script>`; a run that trains or exports should start a real process.
`run_together` forks the processes of a multi-process run from the same
server, at once, each ending as the interpreter does.
"""

import atexit
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SERVER = """
import json, os, runpy, sys, tempfile, time, traceback
root = sys.argv[1]
sys.path[0] = root  # For -c's '': as `python <root>/<script>` has it.
import jax, ml_collections.config_flags  # noqa: F401
import checkpoints, config_check, entry, export, multihost  # noqa: F401
import predict, train, utils, workdir  # noqa: F401


def together(commands, env, logs, timeout):
  pids = []
  for command, log in zip(commands, logs):
    pid = os.fork()
    if pid == 0:  # Ends as the interpreter does: SystemExit, atexit.
      fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(fd, 1)
      os.dup2(fd, 2)
      os.environ.clear()
      os.environ.update(env)
      sys.argv = command[1:]
      sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
      runpy.run_path(sys.argv[0], run_name='__main__')
      sys.exit(0)
    pids.append(pid)
  deadline = time.monotonic() + timeout
  codes = [None] * len(pids)
  while None in codes and time.monotonic() < deadline:
    for i, pid in enumerate(pids):
      if codes[i] is None and (done := os.waitpid(pid, os.WNOHANG))[0]:
        codes[i] = os.waitstatus_to_exitcode(done[1])
    time.sleep(0.01)
  for i, pid in enumerate(pids):
    if codes[i] is None:
      os.kill(pid, 9)
      os.waitpid(pid, 0)
  print(json.dumps(codes), flush=True)


for line in sys.stdin:
  request = json.loads(line)
  if request[0] == 'together':
    together(*request[1:])
    continue
  script, argv, cwd, env = request
  out, err = (tempfile.mkstemp()[1] for _ in range(2))
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY), fd)
      os.chdir(cwd)
      if env is not None:
        os.environ.clear()
        os.environ.update(env)
      sys.argv = argv
      try:
        runpy.run_path(script, run_name='__main__')
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
          sys.stderr.write(e.code + '\\n')
      except BaseException:
        traceback.print_exc()
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)
  deadline = time.monotonic() + 300
  while not (done := os.waitpid(pid, os.WNOHANG))[0]:
    if time.monotonic() > deadline:
      os.kill(pid, 9)
      done = os.waitpid(pid, 0)
      break
    time.sleep(0.01)
  texts = []
  for path in (out, err):
    with open(path, errors='replace') as f:
      texts.append(f.read())
    os.remove(path)
  print(json.dumps([os.waitstatus_to_exitcode(done[1]), *texts]), flush=True)
"""
_server = []  # This process's server, started at the first run.


def _stop() -> None:
  if _server:  # Its stdin closed, it ends.
    _server.pop().communicate(timeout=60)


def run(
  argv: list[str], cwd: str = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
  """`subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True,
  text=True)` for a run of a project script that stops early.

  Args:
    argv: the script (a path relative to `cwd`, or absolute), then its flags.
    cwd: the working directory of the run.
    env: its environment, read by the script (not by the imports the server
      made already); None: this process's.
  """
  script = os.path.join(cwd, argv[0])
  code, stdout, stderr = _ask([script, list(argv), cwd, env])
  return subprocess.CompletedProcess(list(argv), code, stdout, stderr)


def run_together(
  commands: list[list[str]], env: dict[str, str], logs: list[str], timeout
) -> list[int | None]:
  """The exit statuses of `commands` (`[python, script, *flags]`), run at
  once (the processes of a multi-process run), each writing its stdout and
  stderr to its file of `logs`; None for one killed at `timeout` seconds.

  Unlike `run`'s, the processes end as the interpreter does (SystemExit,
  atexit handlers, threads), so the exit path is the script's own.
  """
  return _ask(['together', commands, env, logs, timeout])


def _ask(request: list) -> Any:
  """The server's answer to `request` (JSON), the server started if need be."""
  if not _server or _server[0].poll() is not None:
    _server[:] = [
      subprocess.Popen(
        [sys.executable, '-c', _SERVER, ROOT],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
      )
    ]
    atexit.register(_stop)
  server = _server[0]
  server.stdin.write(json.dumps(request) + '\n')
  server.stdin.flush()
  return json.loads(server.stdout.readline())
