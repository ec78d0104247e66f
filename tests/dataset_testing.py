"""Shared by the dataset tests: pytorch-fm's CTR encoding, synthetic files.

The reference encoding is a transcription of torchfm/dataset/criteo.py and
avazu.py; the ids of kept values may be numbered differently from ours
(pytorch-fm enumerates a set), so `assert_same_encoding` checks that each
field's ids correspond one to one, with the out-of-vocabulary id last in
both.
"""

import collections
import http.server
import math
import os
import random
import tempfile
import threading

from absl.testing import parameterized
import numpy as np

from configs import default
import data


def convert_numeric_feature(val: str) -> str:
  """torchfm/dataset/criteo.py's function, verbatim."""
  if val == '':
    return 'NULL'
  v = int(val)
  if v > 2:
    return str(int(math.log(v) ** 2))
  else:
    return str(v - 2)


def reference_encode(rows, int_fields, min_count, bucket=True):
  """pytorch-fm's feature mapper: rows of raw strings -> ids, field_dims.

  Values of `int_fields` go through `convert_numeric_feature` (when
  `bucket`); values seen fewer than `min_count` times share the last id.
  """
  num_fields = len(rows[0])
  convert = convert_numeric_feature if bucket else (lambda v: v or 'NULL')
  counts = [collections.Counter() for _ in range(num_fields)]
  for row in rows:
    for f, value in enumerate(row):
      counts[f][convert(value) if f in int_fields else value] += 1
  mappers = [
    {v: i for i, v in enumerate(sorted(v for v, c in cnt.items() if c >= m))}
    for cnt, m in zip(counts, [min_count] * num_fields, strict=True)
  ]
  ids = [
    [
      mappers[f].get(
        convert(value) if f in int_fields else value, len(mappers[f])
      )
      for f, value in enumerate(row)
    ]
    for row in rows
  ]
  return np.array(ids), tuple(len(m) + 1 for m in mappers)


def assert_same_encoding(test, ids, dims, ref_ids, ref_dims):
  """Equal up to a renaming of each field's in-vocabulary ids."""
  ids, ref_ids = np.asarray(ids), np.asarray(ref_ids)
  test.assertEqual(tuple(dims), tuple(ref_dims))
  test.assertEqual(ids.shape, ref_ids.shape)
  for f in range(ids.shape[1]):
    pairs = set(zip(ids[:, f].tolist(), ref_ids[:, f].tolist(), strict=True))
    ours = {a for a, _ in pairs}
    theirs = {b for _, b in pairs}
    test.assertTrue(
      len(pairs) == len(ours) == len(theirs), f'field {f} is not 1:1'
    )
    for a, b in pairs:
      test.assertEqual(a == dims[f] - 1, b == ref_dims[f] - 1, f'OOV of {f}')
    test.assertLess(ids[:, f].max(), dims[f])


def _hex(rng, vocab):
  """A skewed draw from `vocab` hex values, sometimes missing."""
  if rng.random() < 0.1:
    return ''
  return f'{int(vocab * rng.random() ** 3):08x}'


def _integer(rng):
  kind = rng.random()
  if kind < 0.15:
    return ''
  if kind < 0.5:
    return str(rng.randint(-3, 5))
  if kind < 0.9:
    return str(rng.randint(6, 300))
  return str(rng.randint(300, 10**9))


def criteo_rows(n, seed=0):
  rng = random.Random(seed)
  return [
    [str(rng.randint(0, 1))]
    + [_integer(rng) for _ in range(13)]
    + [_hex(rng, 5 + 20 * (c % 4)) for c in range(26)]
    for _ in range(n)
  ]


def avazu_rows(n, seed=0):
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    day, hour = rng.randint(21, 30), rng.randint(0, 23)
    rows.append(
      [str(rng.getrandbits(63)), str(rng.randint(0, 1)), f'1410{day}{hour:02d}']
      + [_hex(rng, 3 + 7 * (c % 3)) or '0' for c in range(21)]
    )
  return rows


def write_text(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  return path


def write_lines(path, rows, sep, header=None):
  with open(path, 'w') as f:
    if header:
      f.write(sep.join(header) + '\n')
    for row in rows:
      f.write(sep.join(row) + '\n')
  return path


class DatasetTestCase(parameterized.TestCase):
  """A temporary directory and dataset configs with a cache inside it."""

  def setUp(self):
    super().setUp()
    self.tmp = self.enter_context(tempfile.TemporaryDirectory())

  def config(self, name, path, **overrides):
    """`config.dataset` of `name` at `path`; format keys as nested dicts."""
    config = default.get_config().dataset
    config.name = name
    config.path = path
    config.cache_dir = os.path.join(self.tmp, 'cache')
    config.chunk_rows = 97  # Several chunks, and a short last one.
    config.update(overrides)
    return config

  def encoded(self):
    root = os.path.join(self.tmp, 'cache', 'encoded')
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def all_rows(dataset):
  return np.asarray(dataset.train.ids), np.asarray(dataset.train.labels)


def random_split(num: int, field_dims, side: bool = False) -> data.Split:
  """`num` random examples; with `side`, a multi-hot and a numeric field."""
  rng = np.random.default_rng(0)
  ids = np.stack([rng.integers(0, d, num) for d in field_dims], 1)
  labels = ((rng.random(num) < 0.5) * 1.0).astype(np.float32)
  if not side:
    return data.Split(ids.astype(np.int32), labels)
  multi = rng.integers(-1, 4, (num, 1, 3)).astype(np.int32)
  multi = -np.sort(-multi, axis=-1)  # -1 padding at the end of each list.
  dense = rng.normal(size=(num, 1)).astype(np.float32)
  return data.Split(ids.astype(np.int32), labels, multi, dense)


class HttpServer:
  """A one-file HTTP server on 127.0.0.1 that can cut a transfer short.

  Every path serves `payload`; `requests` counts the GETs. With `ranges` it
  says `Accept-Ranges: bytes` with `etag` and answers a `Range: bytes=N-`
  (if its `If-Range` is `etag`) with 206 and the bytes from N; `headers`
  holds each GET's Range and If-Range (`if_range=False`: a server that
  ignores If-Range; `etag=None`: no ETag). `payload`, `etag` and `truncate`
  may be changed between
  requests; so may `hang`, an Event that a GET sending half the payload
  waits for (up to 30 s) before it ends.
  """

  def __init__(
    self,
    payload: bytes,
    truncate: bool = False,
    status: int = 200,
    stall: threading.Event | None = None,
    length: str | None = None,
    trickle: bool = False,
    ranges: bool = False,
    etag: str = '"v1"',
    if_range: bool = True,
  ):
    self.payload, self.truncate, self.etag = payload, truncate, etag
    self.hang = None
    stop = threading.Event()
    server = self
    requests = self.requests = []
    headers = self.headers = []

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (http.server's name)
        requests.append(self.path)
        asked = self.headers.get('Range'), self.headers.get('If-Range')
        headers.append(asked)
        if stall is not None:  # Silent until the test is done.
          stall.wait(30)
          return
        if status != 200:
          self.send_error(status)
          return
        payload_, first = server.payload, 0
        if ranges and asked[0] and (asked[1] == server.etag or not if_range):
          first = int(asked[0].removeprefix('bytes=').rstrip('-'))
          if first >= len(payload_):
            self.send_error(416)
            return
          self.send_response(206)
          self.send_header(
            'Content-Range',
            f'bytes {first}-{len(payload_) - 1}/{len(payload_)}',
          )
          payload_ = payload_[first:]
        else:
          self.send_response(200)
        if ranges:
          self.send_header('Accept-Ranges', 'bytes')
          if server.etag is not None:  # None: a server that sends none.
            self.send_header('ETag', server.etag)
        self.send_header('Content-Length', length or str(len(payload_)))
        self.end_headers()
        if trickle:  # A byte at a time, never silent for long.
          for i in range(len(payload_)):
            if stop.wait(0.02):
              return
            self.wfile.write(payload_[i : i + 1])
            self.wfile.flush()
        elif server.hang is not None:
          hang = server.hang
          self.wfile.write(payload_[: len(payload_) // 2])
          self.wfile.flush()
          hang.wait(30)
        elif server.truncate:
          self.wfile.write(payload_[: len(payload_) // 2])
          self.wfile.flush()
          self.connection.shutdown(2)  # The server goes away mid-transfer.
        else:
          self.wfile.write(payload_)

      def log_message(self, *args):
        pass

    self.httpd = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_port}'
    self.stall = stall
    self.stop = stop
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    if self.stall is not None:
      self.stall.set()
    self.stop.set()
    self.httpd.shutdown()
    self.httpd.server_close()
