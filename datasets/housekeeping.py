"""What a directory of encoded caches accumulates, and what of it may go.

`remove_stale` deletes what no run can read: the `.tmp-*` directory of a
preprocessing run that died (its `owner.json` names the host and process)
and `.damaged-*` directories, caches that a rebuild moved aside.
"""

import json
import logging
import os
import shutil

from datasets import core

# Written into a temporary cache directory: who is filling it.
OWNER = 'owner.json'


def remove_stale(parent: str) -> None:
  """Deletes temporary and damaged cache directories of dead runs.

  A killed preprocessing run leaves its `.tmp-*` directory (up to the size
  of the encoded data); its `owner.json` names the host and process, so a
  later run on the same host removes it once that process is gone. A
  `.damaged-*` directory is a replaced cache that nothing reads any more.
  """
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    if entry.startswith('.damaged-'):
      shutil.rmtree(path, ignore_errors=True)
    if not entry.startswith('.tmp-'):
      continue
    try:
      with open(os.path.join(path, OWNER)) as f:
        owner = json.load(f)
    except (OSError, ValueError):
      continue  # Not ours, or being created.
    try:
      gone = core.process_gone(owner['host'], int(owner['pid']))
    except (KeyError, ValueError, TypeError):
      continue  # Unreadable: leave it.
    if gone:
      logging.info('Removing %s, left by a run that died', path)
      shutil.rmtree(path, ignore_errors=True)
