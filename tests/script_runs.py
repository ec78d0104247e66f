"""`python <script> <flags>` for runs that stop early, without its start-up.

A run of main.py, predict.py or export.py that ends in an error before its
work spends most of its time importing JAX, Flax and the project. `run`
sends the script and its argv to a server process of this process (started
at the first call) that imported them once; the server forks a child that
runs the script as `__main__` (`runpy.run_path`) with `sys.argv` and the
working directory the command line would give, its stdout and stderr in
files, and reports its exit status. The same file, flags and exit path as
`python <script>`; a run that trains or exports should start a real process.
"""

import atexit
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SERVER = """
import json, os, runpy, sys, tempfile, time, traceback
root = sys.argv[1]
sys.path[0] = root  # For -c's '': as `python <root>/<script>` has it.
import jax, ml_collections.config_flags  # noqa: F401
import config_check, entry, export, multihost, predict, train  # noqa: F401
import utils, workdir  # noqa: F401

for line in sys.stdin:
  script, argv, cwd, env = json.loads(line)
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
  script = os.path.join(cwd, argv[0])
  server.stdin.write(json.dumps([script, list(argv), cwd, env]) + '\n')
  server.stdin.flush()
  code, stdout, stderr = json.loads(server.stdout.readline())
  return subprocess.CompletedProcess(list(argv), code, stdout, stderr)
