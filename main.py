"""Trains and evaluates a CTR model; `python main.py --config=C --workdir=W`.

This file is kept short on purpose: it parses flags, optionally joins a
multi-host run, and hands over to `train.train_and_evaluate`, where the logic
lives and tests reach it. A problem the user can fix (config, data, workdir,
permissions, disk) ends the run with one line and status 2; any other error
with its traceback and status 1. Either way the process ends within
`EXIT_GRACE_SECONDS`, whatever threads are left waiting.
"""

import os
import sys
import threading
import time

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import config_check
import entry
import multihost
import train
import utils
import workdir as workdir_lib

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
config_flags.DEFINE_config_file(
  'config',
  None,
  'Training configuration file, e.g. configs/fm.py (or configs/fm.py:smoke).',
  lock_config=True,
)
flags.DEFINE_bool(
  'distributed',
  False,
  'Join a multi-host run with jax.distributed.initialize(); the flags below'
  ' (or what JAX detects on Slurm, Open MPI or Cloud TPU) say how. Implied'
  ' by any of them.',
)
flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (multi-host).'
)
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process, 0-based (multi-host).')
flags.DEFINE_integer(
  'heartbeat_timeout_seconds',
  100,
  'Multi-host: a process silent for this long is declared dead and the'
  ' others stop with an error naming it.',
)
flags.DEFINE_integer(
  'initialization_timeout_seconds',
  300,
  'Multi-host: how long the processes wait for each other at start-up.',
)
flags.mark_flags_as_required(['config', 'workdir'])

# How long a failed run may take to shut down. Python's exit waits for every
# non-daemon thread, and a thread waiting on a broken disk or a lost peer
# may never end.
EXIT_GRACE_SECONDS = 30.0


def exit_within(seconds: float, status: int) -> None:
  """Ends the process with `status` in `seconds` unless it has ended."""

  def stop():
    time.sleep(seconds)
    logging.error('Still shutting down after %.0f s: exiting now.', seconds)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

  threading.Thread(target=stop, name='exit_within', daemon=True).start()


def main(argv):
  if len(argv) > 1:
    raise utils.UserError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.distributed or any(
    FLAGS[name].present
    for name in ('coordinator_address', 'num_processes', 'process_id')
  ):
    multihost.setup_distributed(
      FLAGS.coordinator_address,
      FLAGS.num_processes,
      FLAGS.process_id,
      heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
      initialization_timeout_seconds=FLAGS.initialization_timeout_seconds,
    )
  logging.info(
    'JAX process %d / %d, local devices: %r',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  try:
    # Only an override has a flag; a run recorded with one still resumes.
    if 'config.model_name' in FLAGS and not workdir_lib.has_checkpoints(
      FLAGS.workdir
    ):
      config_check.check_model_name_override(FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (Exception, KeyboardInterrupt) as e:
    user_error = isinstance(e, utils.UserError)
    if not user_error:
      # Multi-host: name a lost process and exit instead of hanging.
      multihost.stop_after_failure(e, FLAGS.heartbeat_timeout_seconds)
    exit_within(EXIT_GRACE_SECONDS, 2 if user_error else 1)
    raise


if __name__ == '__main__':
  entry.run_main(main)
