"""TensorBoard event files of a run's metrics, written without TensorFlow.

`tensorboard --logdir=<workdir>` plots what `metrics.jsonl` holds: the
numbers of each train, valid and test line as scalars `<split>/<name>` at
the line's step. An event file is a TFRecord file of `Event` protocol
buffers: each record is the data's length, its masked CRC-32C, the data and
theirs. The few fields written here are encoded by hand, so that neither
TensorFlow nor generated protobuf classes are needed.

Each file starts with a SessionLog START at step 0. A resumed run replaces
the files by one that holds the lines metrics.jsonl keeps
(`EventWriter.rewrite`) and appends to it, so both of TensorBoard's loaders
(tensorboard-data-server, its default, and its Python one) show what
metrics.jsonl holds: not the epochs that a kill cut short, nor a test line
at an earlier best step. A TensorBoard left running across the resume shows
those until it restarts if it uses the data server, which ignores START;
its Python loader drops them at the new file's START.
"""

import contextlib
import os
import socket
import struct
import time

from absl import logging

# Metrics of a line that are not plotted: its place and time, and counts.
NOT_PLOTTED = ('split', 'epoch', 'step', 'wall_time', 'time', 'num_examples')
_FILES_OPENED = [0]


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """The CRC-32C (Castagnoli) of `data`, which TFRecord files use."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack(
    '<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  )


def tf_record(data: bytes) -> bytes:
  """`data` framed as one record of a TFRecord file."""
  length = struct.pack('<Q', len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(
  step: int,
  wall_time: float,
  *,
  scalars: dict[str, float] | None = None,
  file_version: str | None = None,
  restart: bool = False,
) -> bytes:
  """An `Event` message: tensorflow/core/util/event.proto's fields

  wall_time (1, double), step (2, int64), file_version (3, string), summary
  (5: `Summary`, whose values (1) have a tag (1) and a simple_value (2,
  float)) and session_log (7: `SessionLog`, status (1) 1 = START).
  """
  out = b'\x09' + struct.pack('<d', wall_time) + b'\x10' + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b''.join(
      _bytes_field(
        1,
        _bytes_field(1, tag.encode()) + b'\x15' + struct.pack('<f', value),
      )
      for tag, value in scalars.items()
    )
    out += _bytes_field(5, values)
  if restart:
    out += _bytes_field(7, b'\x08\x01')
  return out


PREFIX = 'events.out.tfevents.'  # The files TensorBoard reads.
TEMPORARY = '.events.tmp'  # Not read: TensorBoard reads names with 'tfevents'.


class EventWriter:
  """Appends a run's metrics to an event file of its own in `directory`.

  The file is created at the first event, or by `rewrite` (a resume). A
  write that fails (a full disk) is logged once and ends the event file:
  metrics.jsonl, the record that counts, goes on.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.path = None
    self.failed = False

  def rewrite(self, records: list[dict]) -> None:
    """Replaces the directory's event files by one of `records`' numbers.

    The new file is written under a name that TensorBoard does not read and
    renamed into place. The last of the old files (the one a running
    TensorBoard's Python loader reads) is emptied: that loader then goes on
    to the new file, whose START drops what it showed; the others are
    removed.
    """
    self.path = self._name()
    temporary = os.path.join(self.directory, TEMPORARY)
    try:
      names = os.listdir(self.directory)
      old = sorted(name for name in names if name.startswith(PREFIX))
      with open(temporary, 'wb') as f:
        f.write(self._header())
        f.writelines(tf_record(self._event(record)) for record in records)
      os.replace(temporary, self.path)
      for name in old:
        path = os.path.join(self.directory, name)
        if name == old[-1]:
          os.truncate(path, 0)
        else:
          os.remove(path)
    except OSError as e:
      self._fail(e)
      with contextlib.suppress(OSError):
        os.remove(temporary)

  def write(self, record: dict) -> None:
    """Appends the numbers of a metrics line as `<split>/<name>` scalars."""
    if self.failed:
      return
    data = tf_record(self._event(record))
    try:
      if self.path is None:  # A new run (or metrics.jsonl was removed).
        self.path = self._name()
        data = self._header() + data
      with open(self.path, 'ab') as f:
        f.write(data)
    except OSError as e:
      self._fail(e)

  def _event(self, record: dict) -> bytes:
    split = record.get('split', 'metrics')
    scalars = {
      f'{split}/{name}': float(value)
      for name, value in record.items()
      if name not in NOT_PLOTTED and isinstance(value, (int, float))
    }
    wall_time = record.get('time')  # A line written again keeps its time.
    if not isinstance(wall_time, (int, float)):
      wall_time = time.time()
    return event(record.get('step', 0), wall_time, scalars=scalars)

  def _name(self) -> str:
    _FILES_OPENED[0] += 1
    name = (
      f'{PREFIX}{int(time.time())}.{socket.gethostname()}'
      f'.{os.getpid()}.{_FILES_OPENED[0]:06d}'  # Sorted as written.
    )
    return os.path.join(self.directory, name)

  def _header(self) -> bytes:
    """A new file's first events: its version, then a START at step 0."""
    now = time.time()
    version = event(0, now, file_version='brain.Event:2')
    return tf_record(version) + tf_record(event(0, now, restart=True))

  def _fail(self, error: OSError) -> None:
    self.failed = True
    logging.warning('No more TensorBoard events in %s: %s', self.path, error)
