"""Tests of the MovieLens source: verified downloads and ratings parsing."""

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock
import urllib.error
import zipfile

from absl.testing import absltest
from absl.testing import parameterized
from dataset_testing import HttpServer
from dataset_testing import write_text
import numpy as np
import pytest

from configs import default
import data
from datasets import download
from datasets import movielens


def _dataset_config(tmp, **overrides):
  config = default.get_config().dataset
  config.cache_dir = os.path.join(tmp, 'cache')
  config.update(overrides)
  return config


def _ml100k_zip(rows):
  """A zip laid out as GroupLens's ml-100k.zip, with `rows` in u.data."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as z:
    z.writestr(
      'ml-100k/u.data', ''.join(f'{u}\t{i}\t{r}\t0\n' for u, i, r in rows)
    )
    z.writestr('ml-100k/README', 'test archive')
  return buffer.getvalue()


def _append_tell(sizes: list[int], out) -> None:
  sizes.append(out.tell())


def _files_under(root):
  return sorted(
    os.path.relpath(os.path.join(d, f), root)
    for d, _, files in os.walk(root)
    for f in files
  )


class DownloadTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    rows = [(u, i, (u * i) % 5 + 1) for u in range(1, 30) for i in range(1, 9)]
    self.rows = rows
    self.payload = _ml100k_zip(rows)
    self.md5 = hashlib.md5(self.payload).hexdigest()

  def test_good_archive_is_verified_unpacked_and_loaded(self):
    self.addCleanup(os.umask, os.umask(0o022))
    # What killed runs left: removed when their process is gone from here.
    downloads = os.path.join(self.tmp, 'cache', 'downloads')
    os.makedirs(downloads)
    ended = subprocess.Popen(['true'])
    ended.wait()
    host = socket.gethostname()
    kept = [
      f'ml-100k.zip.partial-{os.getpid()}@{host}.abc',  # A live run's.
      f'ml-100k.zip.partial-{ended.pid}@elsewhere.abc',  # Another host's.
    ]
    for name in kept + [f'ml-100k.zip.partial-{ended.pid}@{host}.a_1']:
      write_text(os.path.join(downloads, name), 'part')
    os.makedirs(os.path.join(downloads, f'.ml-100k-{ended.pid}@{host}.9f', 'x'))
    with HttpServer(self.payload) as server:
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      with mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': self.md5}):
        dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_dims, (30, 9))  # With the OOV ids.
    n = len(dataset.train) + len(dataset.valid) + len(dataset.test)
    self.assertEqual(n, len(self.rows))
    positives = sum(r > 3 for _, _, r in self.rows)
    labels = np.concatenate(
      [dataset.train.labels, dataset.valid.labels, dataset.test.labels]
    )
    self.assertEqual(int(labels.sum()), positives)
    # Only the unpacked directory and the encoded cache remain.
    self.assertCountEqual(os.listdir(downloads), ['ml-100k', *kept])
    self.assertIn('u.data', os.listdir(os.path.join(downloads, 'ml-100k')))
    # Readable by the other users of a shared cache_dir, as the umask says.
    mode = os.stat(os.path.join(downloads, 'ml-100k')).st_mode
    self.assertEqual(stat.S_IMODE(mode), 0o755)

  def test_checksum_mismatch_is_a_clear_error_and_leaves_cache_clean(self):
    with HttpServer(self.payload) as server:
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      with mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': '0' * 32}):
        with self.assertRaisesRegex(
          data.DownloadError,
          'Checksum mismatch.* discarded: run again, and if it persists,'
          ' config.dataset.url serves another file',
        ):
          data.load_dataset(config)
    self.assertEqual(_files_under(config.cache_dir), [])

  def test_server_gone_mid_transfer_leaves_nothing_half_written(self):
    with HttpServer(self.payload, truncate=True) as server:
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      with mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': self.md5}):
        with self.assertRaises(data.DownloadError):
          data.load_dataset(config)
    self.assertEqual(_files_under(config.cache_dir), [])

  def test_a_short_transfer_without_a_checksum_is_not_kept(self):
    # Without an MD5 the announced length is the only check.
    dest = os.path.join(self.tmp, 'cache', 'x.zip')
    with HttpServer(self.payload, truncate=True) as server:
      with self.assertRaisesRegex(
        data.DownloadError,
        rf'^Download of {server.url}/x.zip ended after'
        rf' {len(self.payload) // 2} of {len(self.payload)} bytes; the partial'
        r' file was discarded\. Run again; .* set config\.dataset\.path',
      ):
        download.download(f'{server.url}/x.zip', dest)
    self.assertEqual(_files_under(self.tmp), [])

  def test_an_archive_the_disk_cannot_unpack_is_kept_for_the_rerun(self):
    full = OSError(errno.ENOSPC, 'No space left on device')
    with (
      HttpServer(self.payload) as server,
      mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': self.md5}),
    ):
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      archive = os.path.join(config.cache_dir, 'downloads', 'ml-100k.zip')
      with (
        mock.patch.object(movielens.remote, '_unpack', side_effect=full),
        self.assertRaisesRegex(
          data.DownloadError,
          rf'^Could not unpack {server.url}/ml-100k.zip: \[Errno 28\] No'
          rf' space left on device\. The downloaded archive is kept'
          rf' \({archive}\): free space there',
        ),
      ):
        data.load_dataset(config)
      self.assertTrue(os.path.exists(archive))
      self.assertEqual(data.load_dataset(config).field_dims, (30, 9))
    self.assertEqual(server.requests, ['/ml-100k.zip'])  # Downloaded once.
    self.assertFalse(os.path.exists(archive))

  def test_unreachable_server(self):
    with HttpServer(b'') as server:
      url = server.url
    config = _dataset_config(self.tmp, name='ml-1m', url=url)
    with self.assertRaisesRegex(data.DownloadError, 'Could not download'):
      data.load_dataset(config)

  def test_http_error_and_stalled_server_say_what_to_do(self):
    stalled = threading.Event()
    for server, reason in (
      (HttpServer(b'', status=404), 'HTTP Error 404: Not Found'),
      (HttpServer(b'', status=500), 'HTTP Error 500'),
      (
        HttpServer(b'', stall=stalled),
        r'timed out \(nothing from the server for 0\.5 s\)\.',
      ),
    ):
      with (
        self.subTest(reason),
        server,
        mock.patch.object(download, 'TIMEOUT_S', 0.5),
      ):
        config = _dataset_config(self.tmp, name='ml-1m', url=server.url)
        with self.assertRaisesRegex(
          data.DownloadError,
          f'^Could not download {server.url}/ml-1m.zip: .*{reason}.*'
          'config.dataset.url.*config.dataset.path',
        ):
          data.load_dataset(config)
        self.assertEqual(_files_under(config.cache_dir), [])

  def test_bad_url_length_and_trickle_are_one_line_errors(self):
    for url, reason in (
      ('files.grouplens.org/datasets', "unknown url type: 'files.grouplens"),
      ('', "unknown url type: '/ml-1m.zip'"),
    ):
      with self.subTest(url=url):
        config = _dataset_config(self.tmp, name='ml-1m', url=url)
        with self.assertRaisesRegex(
          data.DownloadError,
          f'^Could not download .*ml-1m.zip: .*{reason}.*config.dataset.url',
        ):
          data.load_dataset(config)
    # An announced length that is not a number is no length: the MD5 decides.
    for length, md5 in (('abc', self.md5), ('abc', '0' * 32)):
      with self.subTest(length=length, md5=md5):
        tmp = tempfile.mkdtemp(dir=self.tmp)
        config = _dataset_config(tmp, name='ml-100k')
        with (
          HttpServer(self.payload, length=length) as server,
          mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': md5}),
        ):
          config.url = server.url
          if md5 == self.md5:
            self.assertEqual(data.load_dataset(config).field_dims, (30, 9))
          else:
            with self.assertRaisesRegex(data.DownloadError, 'Checksum'):
              data.load_dataset(config)
    # A byte every 20 ms never times out a read; the rate stops it.
    config = _dataset_config(tempfile.mkdtemp(dir=self.tmp), name='ml-1m')
    with (
      HttpServer(self.payload, trickle=True) as server,
      mock.patch.object(download, 'TIMEOUT_S', 0.5),
    ):
      config.url = server.url
      start = time.monotonic()
      with self.assertRaisesRegex(
        data.DownloadError,
        rf'^Download of {server.url}/ml-1m.zip stalled: \d+ bytes in \d+ s.*'
        'config.dataset.path',
      ):
        data.load_dataset(config)
    # Stopped after a window, not when the whole file had trickled in (45 s).
    self.assertLess(time.monotonic() - start, 0.5 + 5.0)
    self.assertGreater(len(self.payload) * 0.02, 0.5 + 5.0)
    self.assertEqual(_files_under(config.cache_dir), [])

  def test_a_folder_unpacked_by_hand_without_its_ratings_is_named(self):
    config = _dataset_config(self.tmp, name='ml-1m', url='http://127.0.0.1:9')
    folder = os.path.join(config.cache_dir, 'downloads', 'ml-1m')
    os.makedirs(folder)
    with self.assertRaisesRegex(
      data.DataError,
      f'^{folder} is not an unpacked ml-1m.zip: {folder}/ratings.dat does'
      ' not exist.* delete it to download the archive again',
    ):
      data.load_dataset(config)
    self.assertEqual(os.listdir(folder), [])

  def test_corrupt_archive_is_discarded_and_a_rerun_recovers(self):
    # Deflate data that fails to decompress (zlib.error), its MD5 matching.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as z:
      z.writestr('ml-100k/u.data', '1\t1\t5\t0\n' * 500)
    corrupt = bytearray(buffer.getvalue())
    corrupt[50:70] = b'\xff' * 20
    for payload in (bytes(corrupt), b'PK\x03\x04' + b'x' * 100):
      with self.subTest(len(payload)), HttpServer(payload) as server:
        config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
        md5 = hashlib.md5(payload).hexdigest()
        with mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': md5}):
          with self.assertRaisesRegex(
            data.DownloadError,
            f'^Could not unpack {server.url}/ml-100k.zip: .*run again.*'
            'config.dataset.path',
          ):
            data.load_dataset(config)
        self.assertEqual(_files_under(config.cache_dir), [])
    with HttpServer(self.payload) as server:
      config = _dataset_config(self.tmp, name='ml-100k', url=server.url)
      with mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': self.md5}):
        self.assertEqual(data.load_dataset(config).field_dims, (30, 9))

  def test_cache_dir_not_writable_names_the_directory_and_the_key(self):
    # A file where cache_dir should be, and a directory that refuses the
    # download (simulated: tests may run as root).
    blocker = os.path.join(self.tmp, 'a-file')
    write_text(blocker, 'not a directory')
    refused = PermissionError(13, 'Permission denied')
    for cache_dir, patch in (
      (blocker, contextlib.nullcontext()),
      (
        os.path.join(self.tmp, 'ok'),
        mock.patch.object(download, '_locked', side_effect=refused),
      ),
    ):
      with self.subTest(cache_dir=cache_dir), patch:
        config = _dataset_config(
          self.tmp,
          name='ml-100k',
          url='http://127.0.0.1:9',
          cache_dir=cache_dir,
        )
        with self.assertRaisesRegex(
          data.DownloadError,
          f'^Could not write the download of http://127.0.0.1:9/ml-100k.zip'
          f' into {cache_dir}/downloads: .*config.dataset.cache_dir',
        ):
          data.load_dataset(config)


class ResumeTest(absltest.TestCase):
  """A transfer cut short resumes where it stopped, when the server can."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.payload = bytes(range(256)) * 400  # 102,400 bytes.
    self.md5 = hashlib.md5(self.payload).hexdigest()
    self.dest = os.path.join(self.tmp, 'cache', 'x.tar.gz')
    self.half = len(self.payload) // 2

  def _cut(self, server, **checksum):
    """One transfer that the server cuts at half; its bytes are kept."""
    server.truncate = True
    with self.assertRaisesRegex(
      data.DownloadError,
      rf'^Download of {server.url}/x.tar.gz ended after {self.half} of'
      rf' {len(self.payload)} bytes; the {self.half} bytes received are kept'
      r' and the next run resumes from there\. Run again; or download',
    ):
      download.download(f'{server.url}/x.tar.gz', self.dest, **checksum)
    server.truncate = False
    with open(self.dest + '.part', 'rb') as f:
      self.assertEqual(f.read(), self.payload[: self.half])
    # On the disk, and recorded so: a power cut now keeps them all.
    self.assertEqual(self._durable(), self.half)

  def _durable(self):
    """The count of bytes `<dest>.part.json` records as on the disk."""
    with open(self.dest + '.part.json') as f:
      return json.load(f)['durable']

  def test_a_cut_transfer_asks_for_the_rest_and_checks_the_whole(self):
    config = _dataset_config(self.tmp, name='ml-100k')
    payload = _ml100k_zip(
      [(u, i, u % 5 + 1) for u in range(1, 40) for i in (1, 2)]
    )
    md5 = hashlib.md5(payload).hexdigest()
    half = len(payload) // 2
    with (
      HttpServer(payload, truncate=True, ranges=True) as server,
      mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': md5}),
    ):
      config.url = server.url
      with self.assertRaisesRegex(
        data.DownloadError, f'the {half} bytes received are kept'
      ):
        data.load_dataset(config)
      downloads = os.path.join(config.cache_dir, 'downloads')
      self.assertCountEqual(
        os.listdir(downloads), ['ml-100k.zip.part', 'ml-100k.zip.part.json']
      )
      server.truncate = False
      self.assertEqual(data.load_dataset(config).field_dims, (40, 3))
    # The second GET asked for the bytes from the first's end, of that file.
    self.assertEqual(server.headers, [(None, None), (f'bytes={half}-', '"v1"')])
    self.assertEqual(os.listdir(downloads), ['ml-100k'])

  def test_interrupted_by_the_user_or_the_network_it_resumes_too(self):
    copy = download._copy
    reset = ConnectionResetError(104, 'Connection reset by peer')
    for error in (KeyboardInterrupt, reset):

      def interrupted(response, out, *args, error=error):
        out.write(response.read(1000))
        raise error

      with self.subTest(error), HttpServer(self.payload, ranges=True) as s:
        url = f'{s.url}/x.tar.gz'
        with (
          mock.patch.object(download, '_copy', interrupted),
          mock.patch.object(download.logging, 'warning') as warning,
          self.assertRaises((KeyboardInterrupt, data.DownloadError)) as raised,
        ):
          download.download(url, self.dest, md5=self.md5)
        self.assertEqual(
          [args[0] % args[1:] for args, _ in warning.call_args_list],
          [
            'Interrupted: the 1000 bytes received are kept and the next run'
            ' resumes from there.'
          ]
          * (error is KeyboardInterrupt),
        )
        if error is reset:
          self.assertRegex(
            str(raised.exception),
            rf'^Could not download {url}: .*by peer\. The 1000 bytes received'
            r' are kept and the next run resumes from there\. Check the',
          )
        self.assertEqual(os.path.getsize(self.dest + '.part'), 1000)
        self.assertEqual(self._durable(), 1000)
        with mock.patch.object(download, '_copy', copy):
          download.download(url, self.dest, md5=self.md5)
        with open(self.dest, 'rb') as f:
          self.assertEqual(f.read(), self.payload)
        self.assertEqual(s.headers[-1], ('bytes=1000-', '"v1"'))
        self.assertEqual(os.listdir(os.path.dirname(self.dest)), ['x.tar.gz'])
        os.remove(self.dest)

  def test_a_download_killed_9_resumes_in_the_next_process(self):
    with HttpServer(self.payload, ranges=True) as server:
      url = f'{server.url}/x.tar.gz'
      server.hang = threading.Event()
      child = subprocess.Popen(
        [
          sys.executable,
          '-c',
          'import sys; from datasets import download;'
          ' download.DURABLE_EVERY = 1;'  # What it receives is recorded.
          ' download.download(sys.argv[1], sys.argv[2], md5=sys.argv[3])',
          url,
          self.dest,
          self.md5,
        ],
        cwd=os.path.dirname(os.path.dirname(download.__file__)),
      )
      part, deadline = self.dest + '.part', time.monotonic() + 60
      durable = 0
      while time.monotonic() < deadline and durable < self.half:
        time.sleep(0.01)
        with contextlib.suppress(OSError, ValueError, KeyError):
          durable = self._durable()
      child.kill()  # SIGKILL: no handler, no clean-up.
      child.wait()
      hang, server.hang = server.hang, None
      hang.set()
      self.assertEqual(os.path.getsize(part), self.half)
      download.download(url, self.dest, md5=self.md5)
    self.assertEqual(server.headers[-1], (f'bytes={self.half}-', '"v1"'))
    with open(self.dest, 'rb') as f:
      self.assertEqual(f.read(), self.payload)
    self.assertEqual(os.listdir(os.path.dirname(self.dest)), ['x.tar.gz'])

  @contextlib.contextmanager
  def _out_of_reach(self, kept: int):
    """No server can be reached: a download in the block fails, saying that
    the `kept` bytes received are kept for the next run."""
    with (
      mock.patch.object(
        download.urllib.request,
        'urlopen',
        side_effect=urllib.error.URLError('no route'),
      ),
      self.assertRaisesRegex(
        data.DownloadError,
        r'^Could not download \S+: <urlopen error no route>\. The'
        rf' {kept} bytes received are kept and the next run resumes',
      ),
    ):
      yield

  def test_a_server_out_of_reach_on_the_rerun_leaves_the_kept_bytes(self):
    with HttpServer(self.payload, ranges=True) as server:
      url = f'{server.url}/x.tar.gz'
      self._cut(server, md5=self.md5)
      with self._out_of_reach(kept=self.half):
        download.download(url, self.dest, md5=self.md5)
      download.download(url, self.dest, md5=self.md5)
    self.assertEqual(server.headers[-1], (f'bytes={self.half}-', '"v1"'))
    with open(self.dest, 'rb') as f:
      self.assertEqual(f.read(), self.payload)

  def test_a_disk_too_small_stops_the_transfer_before_it_starts(self):
    def small_disk():
      free = mock.Mock(free=1000, f_bfree=1000, f_frsize=1)
      return (
        mock.patch.object(download.core.shutil, 'disk_usage', lambda d: free),
        mock.patch.object(download.core.os, 'statvfs', lambda d: free),
      )

    directory = os.path.dirname(self.dest)
    with HttpServer(self.payload, ranges=True) as server:
      url = f'{server.url}/x.tar.gz'
      for kept in (0, self.half):
        if kept:
          self._cut(server)
        disk_usage, statvfs = small_disk()
        with (
          self.subTest(kept=kept),
          disk_usage,
          statvfs,
          self.assertRaisesRegex(
            data.DownloadError,
            rf'^Could not download {url} into {directory}: \[Errno 28\] No'
            r' space left on device: the download needs at least'
            rf' {(len(self.payload) - kept) / 2**20:.2f} MiB, 0\.00 MiB'
            rf' free\.{f" The {kept} bytes received are kept." if kept else ""}'
            r' Free space there, or set config\.dataset\.cache_dir to a disk'
            r' with room, then run again\.$',
          ),
        ):
          download.download(url, self.dest)
        self.assertEqual(
          _files_under(self.tmp),
          ['cache/x.tar.gz.part', 'cache/x.tar.gz.part.json'] if kept else [],
        )
      download.download(url, self.dest, md5=self.md5)  # Room again.
    self.assertEqual(server.headers[-1], (f'bytes={self.half}-', '"v1"'))
    with open(self.dest, 'rb') as f:
      self.assertEqual(f.read(), self.payload)

  def test_a_full_disk_frees_what_the_transfer_took(self):
    def full(response, out, *args):
      out.write(response.read(1000))
      raise OSError(28, 'No space left on device')

    with (
      HttpServer(self.payload, ranges=True) as server,
      mock.patch.object(download, '_copy', full),
      self.assertRaisesRegex(
        data.DownloadError,
        r'^Could not write the download of .* No space left on device\. Set'
        r' config\.dataset\.cache_dir',
      ),
    ):
      download.download(f'{server.url}/x.tar.gz', self.dest)
    self.assertEqual(_files_under(self.tmp), [])

  def test_a_range_that_starts_elsewhere_is_asked_again_whole(self):
    def answer(status, **headers):
      return mock.MagicMock(status=status, headers=headers)

    whole = answer(200)
    responses = [answer(206, **{'Content-Range': 'bytes 0-99/100'}), whole]
    with mock.patch.object(
      download.urllib.request, 'urlopen', side_effect=responses
    ) as urlopen:
      self.assertEqual(download._open('http://h/u', 50, '"v1"'), (whole, 0))
    asked = [call.args[0].headers for call in urlopen.call_args_list]
    self.assertEqual(asked, [{'Range': 'bytes=50-', 'If-range': '"v1"'}, {}])
    # A 206 is a range, whether or not Accept-Ranges came with it.
    self.assertEqual(download._validator(answer(206, ETag='"a"')), '"a"')

  def test_a_range_without_the_etag_is_asked_again_whole(self):
    def answer(status, **headers):
      return mock.MagicMock(status=status, headers=headers)

    date = 'Tue, 01 Dec 2026 10:00:00 GMT'
    for validator, resumed in (('"v1"', False), (date, True)):
      with self.subTest(validator):
        part = answer(206, **{'Content-Range': 'bytes 50-99/100'})
        whole = answer(200)
        with mock.patch.object(
          download.urllib.request, 'urlopen', side_effect=[part, whole]
        ):
          got = download._open('http://h/u', 50, validator)
        # A 206 must repeat an ETag, not Last-Modified (RFC 9110 15.3.7).
        self.assertEqual(got, (part, 50) if resumed else (whole, 0))

  def test_a_file_changed_on_the_server_is_downloaded_again_whole(self):
    reversed_, longer = self.payload[::-1], self.payload[::-1] + b'more'
    # A server that sends the whole new file, one that sends a range of it
    # with the new ETag although If-Range named the old, one that sends
    # such a range with no version at all (RFC 9110 says a 206 must), and
    # one that kept the old ETag for a file of another length.
    for if_range, etag, other in (
      (True, '"v2"', reversed_),
      (False, '"v2"', reversed_),
      (False, None, reversed_),
      (False, '"v1"', longer),
    ):
      with (
        self.subTest(if_range=if_range, etag=etag, length=len(other)),
        HttpServer(self.payload, ranges=True, if_range=if_range) as server,
      ):
        self._cut(server)
        server.payload, server.etag = other, etag
        download.download(f'{server.url}/x.tar.gz', self.dest)
        with open(self.dest, 'rb') as f:
          self.assertEqual(f.read(), other)  # Not the old half, new rest.
        self.assertEqual(
          server.headers[1:],
          [(f'bytes={self.half}-', '"v1"')] + [(None, None)] * (not if_range),
        )
        self.assertEqual(os.listdir(os.path.dirname(self.dest)), ['x.tar.gz'])
        os.remove(self.dest)

  def test_a_resumed_file_that_fails_its_checksum_is_all_discarded(self):
    with HttpServer(self.payload, ranges=True) as server:
      self._cut(server, md5=self.md5)
      server.payload = self.payload[::-1]  # Changed, but the same ETag.
      with self.assertRaisesRegex(data.DownloadError, 'Checksum mismatch'):
        download.download(f'{server.url}/x.tar.gz', self.dest, md5=self.md5)
      self.assertEqual(_files_under(self.tmp), [])
      server.payload = self.payload
      download.download(f'{server.url}/x.tar.gz', self.dest, md5=self.md5)
    self.assertEqual(server.headers[-1], (None, None))  # From the start.
    with open(self.dest, 'rb') as f:
      self.assertEqual(f.read(), self.payload)

  def test_kept_bytes_past_the_end_or_of_another_url_start_over(self):
    with HttpServer(self.payload, ranges=True) as server:
      url = f'{server.url}/x.tar.gz'
      for kept, meta, asked in (
        # All of it and more: the server answers 416, then the whole.
        (
          self.payload + b'x',
          {'url': url, 'validator': '"v1"', 'durable': len(self.payload) + 1},
          'bytes=',
        ),
        # Described by an earlier version, which did not say what is on the
        # disk: nothing is.
        (b'y' * 10, {'url': url, 'validator': '"v1"'}, None),
        (b'y' * 10, {'url': url + '?b', 'validator': '"v1"'}, None),
        (b'y' * 10, {'url': url}, None),  # Damaged descriptions.
        (b'y' * 10, {'url': url, 'validator': 5}, None),
        (b'y' * 10, None, None),
        # Counts that are no count of bytes on the disk: none is.
        (b'y' * 10, {'url': url, 'validator': '"v1"', 'durable': 5.5}, None),
        (b'y' * 10, {'url': url, 'validator': '"v1"', 'durable': True}, None),
        (b'y' * 10, {'url': url, 'validator': '"v1"', 'durable': -3}, None),
        (b'y' * 10, {'url': url, 'validator': '"v1"', 'durable': '5'}, None),
      ):
        with self.subTest(meta=meta, kept=len(kept)):
          write_text(self.dest + '.part.json', json.dumps(meta))
          with open(self.dest + '.part', 'wb') as f:
            f.write(kept)
          del server.headers[:]
          download.download(url, self.dest, md5=self.md5)
          with open(self.dest, 'rb') as f:
            self.assertEqual(f.read(), self.payload)
          self.assertEqual(server.headers[-1], (None, None))
          self.assertEqual(
            (server.headers[0][0] or '').startswith('bytes='), bool(asked)
          )
          self.assertEqual(os.listdir(os.path.dirname(self.dest)), ['x.tar.gz'])

  def test_a_server_without_ranges_or_a_version_keeps_nothing(self):
    for headers in ({}, {'Accept-Ranges': 'bytes', 'ETag': 'W/"weak"'}):
      with self.subTest(headers=headers):
        response = mock.Mock(status=200, headers=headers)
        self.assertIsNone(download._validator(response))
    response = mock.Mock(
      status=200, headers={'Accept-Ranges': 'bytes', 'Last-Modified': 'Mon'}
    )
    self.assertEqual(download._validator(response), 'Mon')
    with HttpServer(self.payload, truncate=True) as server:
      with self.assertRaisesRegex(
        data.DownloadError, 'the partial file was discarded'
      ):
        download.download(f'{server.url}/x.tar.gz', self.dest)
    self.assertEqual(_files_under(self.tmp), [])

  def test_after_a_power_cut_only_the_bytes_on_the_disk_are_kept(self):
    # A power cut left the part longer than what reached the disk: a tail
    # of zeros or garbage past the bytes recorded as durable. Or shorter.
    garbage = b'\0' * 10_000 + b'g' * 10_000
    for kept, durable, resumed in (
      (self.payload[:30_000] + garbage, 30_000, 30_000),
      (self.payload[:20_000], 50_000, 20_000),
    ):
      with (
        self.subTest(durable=durable),
        HttpServer(self.payload, ranges=True) as server,
      ):
        url = f'{server.url}/x.tar.gz'
        meta = {'url': url, 'validator': '"v1"', 'durable': durable}
        write_text(self.dest + '.part.json', json.dumps(meta))
        with open(self.dest + '.part', 'wb') as f:
          f.write(kept)
        download.download(url, self.dest)  # No checksum.
        with open(self.dest, 'rb') as f:
          self.assertEqual(f.read(), self.payload)
        self.assertEqual(server.headers, [(f'bytes={resumed}-', '"v1"')])
        self.assertEqual(os.listdir(os.path.dirname(self.dest)), ['x.tar.gz'])
        os.remove(self.dest)

  def test_the_bytes_are_on_the_disk_before_their_count_is_recorded(self):
    # Each count recorded is the size the part had at its last fsync, and
    # the part is on the disk before it takes the name of the download.
    events, fsync, replace = [], os.fsync, os.replace

    def fsynced(fd):
      events.append(('fsync', os.fstat(fd).st_ino, os.fstat(fd).st_size))
      fsync(fd)

    def replaced(src, dst):
      if dst.endswith('.json'):
        with open(src) as f:
          events.append(('record', json.load(f)['durable']))
      else:
        events.append(('rename', os.stat(src).st_ino, os.stat(src).st_size))
      replace(src, dst)

    with (
      HttpServer(self.payload, ranges=True) as server,
      mock.patch.object(download, 'DURABLE_EVERY', 1),
      mock.patch.object(download.os, 'fsync', fsynced),
      mock.patch.object(download.os, 'replace', replaced),
    ):
      download.download(f'{server.url}/x.tar.gz', self.dest, md5=self.md5)
    inode = os.stat(self.dest).st_ino
    # The part's own fsyncs (not the descriptions'), counts and renaming.
    events = [e for e in events if e[0] != 'fsync' or e[1] == inode]
    self.assertEqual(events[0], ('record', 0))  # Before any byte.
    self.assertEqual(
      events[-2:],
      [
        ('fsync', inode, len(self.payload)),
        ('rename', inode, len(self.payload)),
      ],
    )
    synced = 0
    for event in events:
      if event[0] == 'fsync':
        synced = event[2]
      elif event[0] == 'record':
        self.assertEqual(event[1], synced)
    self.assertGreater(len([e for e in events if e[0] == 'record']), 1)

  def test_a_sync_falls_due_at_every_durable_every_bytes_exactly(self):
    # Chunks of 1000 bytes: a sync once DURABLE_EVERY more have come, with
    # the bytes so far; none without a sync (a transfer not resumed).
    for chunks, every, synced, want in [
      (10, 2500, True, [3000, 6000, 9000]),
      (5, 2000, True, [2000, 4000]),
      (5, 2000, False, []),
    ]:
      read1 = mock.Mock(side_effect=[b'x' * 1000] * chunks + [b''])
      response = mock.Mock(read1=read1)
      sizes = []
      with (
        io.BytesIO() as out,
        mock.patch.object(download, 'DURABLE_EVERY', every),
      ):
        sync = functools.partial(_append_tell, sizes, out) if synced else None
        received = download._copy(
          response, out, hashlib.md5(), 'u', None, 0, sync
        )
        self.assertEqual((received, out.tell()), (chunks * 1000,) * 2)
      self.assertEqual(sizes, want)

  def test_garbage_past_the_durable_bytes_is_not_recorded_as_durable(self):
    # A power cut, then a rerun that cannot reach the server: what it keeps
    # for the next is still the bytes on the disk, not the garbage after.
    url = 'http://127.0.0.1:9/x.tar.gz'
    os.makedirs(os.path.dirname(self.dest))
    meta = {'url': url, 'validator': '"v1"', 'durable': 30_000}
    write_text(self.dest + '.part.json', json.dumps(meta))
    with open(self.dest + '.part', 'wb') as f:
      f.write(self.payload[:30_000] + b'\0' * 20_000)
    with self._out_of_reach(kept=30_000):
      download.download(url, self.dest)
    self.assertEqual(self._durable(), 30_000)
    with open(self.dest + '.part', 'rb') as f:
      self.assertEqual(f.read(), self.payload[:30_000])

  def test_a_description_is_replaced_whole_once_on_the_disk(self):
    os.makedirs(os.path.dirname(self.dest))
    part = self.dest + '.part'
    old = {'url': 'u', 'validator': 'v', 'durable': 3}
    write_text(part + '.json', json.dumps(old))
    events, fsync, replace = [], os.fsync, os.replace

    def fsynced(fd):
      events.append(('fsync', os.fstat(fd).st_ino))
      fsync(fd)

    def replaced(src, dst):
      events.append(('replace', os.stat(src).st_ino, dst))
      replace(src, dst)

    with (
      mock.patch.object(download.os, 'fsync', fsynced),
      mock.patch.object(download.os, 'replace', replaced),
    ):
      download._describe(part, 'u', 'v', 7)
    with open(part + '.json') as f:
      self.assertEqual(json.load(f), dict(old, durable=7))
    inode = os.stat(part + '.json').st_ino
    self.assertEqual(
      events, [('fsync', inode), ('replace', inode, part + '.json')]
    )

    def cut(obj, f):  # The disk fills as the description is written.
      f.write(json.dumps(obj)[:5])
      raise OSError(errno.ENOSPC, 'No space left on device')

    with (
      mock.patch.object(download.json, 'dump', cut),
      self.assertRaisesRegex(OSError, 'No space'),
    ):
      download._describe(part, 'u', 'v', 9)
    with open(part + '.json') as f:  # The last one, whole.
      self.assertEqual(json.load(f), dict(old, durable=7))
    self.assertEqual(os.listdir(os.path.dirname(part)), ['x.tar.gz.part.json'])

  def test_a_sync_counts_the_bytes_still_in_the_buffer(self):
    os.makedirs(os.path.dirname(self.dest))
    part = self.dest + '.part'
    with open(part, 'w+b') as out:
      out.write(b'x' * 10)  # In the buffer of `out`, not the file's yet.
      download._sync(out, part, 'u', 'v')
      self.assertEqual(os.path.getsize(part), 10)
    self.assertEqual(self._durable(), 10)

  def test_a_transfer_cut_by_any_error_records_what_it_kept(self):
    # Not one of the network's errors, whose message records it: a bug,
    # or memory running out, mid-transfer. The next run resumes from there.
    def failed(response, out, *args):
      out.write(response.read(1000))
      raise MemoryError

    with HttpServer(self.payload, ranges=True) as server:
      url = f'{server.url}/x.tar.gz'
      with (
        mock.patch.object(download, '_copy', failed),
        self.assertRaises(MemoryError),
      ):
        download.download(url, self.dest, md5=self.md5)
      self.assertEqual(self._durable(), 1000)
      download.download(url, self.dest, md5=self.md5)
      self.assertEqual(server.headers[-1], ('bytes=1000-', '"v1"'))

  def test_a_cut_transfer_that_cannot_be_synced_still_says_why_it_ended(self):
    # The disk refuses the fsync after a network error: the error is the
    # network's, it says so, and the next run resumes from what was
    # recorded (nothing).
    def interrupted(response, out, *args):
      out.write(response.read(1000))
      raise ConnectionResetError(104, 'Connection reset by peer')

    with HttpServer(self.payload, ranges=True) as server:
      url = f'{server.url}/x.tar.gz'
      with (
        mock.patch.object(download, '_copy', interrupted),
        mock.patch.object(
          download, '_sync', side_effect=OSError(errno.EIO, 'I/O error')
        ),
        self.assertRaisesRegex(
          data.DownloadError,
          rf'^Could not download {url}: .*by peer\. The 1000 bytes received'
          r' could not all be put on the disk \(\[Errno 5\] I/O error\); the'
          r' next run resumes from those that were\. Check the',
        ),
      ):
        download.download(url, self.dest, md5=self.md5)
      self.assertEqual(self._durable(), 0)
      download.download(url, self.dest, md5=self.md5)
      self.assertEqual(server.headers[-1], (None, None))  # From the start.
    with open(self.dest, 'rb') as f:
      self.assertEqual(f.read(), self.payload)

  def test_a_part_another_process_holds_or_renamed_is_left_to_it(self):
    os.makedirs(os.path.dirname(self.dest))
    part, real_stat = self.dest + '.part', os.stat

    def renamed(path, *args, **kwargs):  # Another file took the name.
      result = real_stat(path, *args, **kwargs)
      return mock.Mock(st_ino=-1) if path == part else result

    for how in ('held', 'renamed'):
      with self.subTest(how), open(part, 'wb') as theirs:
        theirs.write(b'theirs')
        theirs.flush()
        write_text(part + '.json', json.dumps({'url': 'u', 'validator': 'v'}))
        if how == 'held':
          fcntl.flock(theirs, fcntl.LOCK_EX)
        with (
          HttpServer(self.payload, ranges=True) as server,
          mock.patch.object(download.os, 'stat', renamed)
          if how == 'renamed'
          else contextlib.nullcontext(),
        ):
          download.download(f'{server.url}/x.tar.gz', self.dest, md5=self.md5)
        with open(self.dest, 'rb') as f:
          self.assertEqual(f.read(), self.payload)
        with open(part, 'rb') as f:
          self.assertEqual(f.read(), b'theirs')
        self.assertTrue(os.path.exists(part + '.json'))
        self.assertEqual(server.headers, [(None, None)])


class MovieLensParsingTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()

  def test_embedded_data_loads_offline(self):
    dataset = data.load_dataset(_dataset_config(self.tmp))
    self.assertEqual(dataset.field_names, ('user', 'item'))
    # Dense ids, and one more per field for unseen users and movies.
    self.assertEqual(dataset.field_dims, (611, 9725))
    self.assertEqual(
      (len(dataset.train), len(dataset.valid), len(dataset.test)),
      (80668, 10083, 10085),
    )
    for split in (dataset.train, dataset.valid, dataset.test):
      self.assertEqual(split.ids.dtype, np.int32)
      self.assertTrue(np.all(split.ids < np.array(dataset.field_dims)))

  @parameterized.named_parameters(
    ('csv', 'ml-20m', 'ratings.csv', 'userId,movieId,rating,timestamp\n', ','),
    ('dat', 'ml-1m', 'ratings.dat', '', '::'),
    ('tsv', 'ml-100k', 'u.data', '', '\t'),
  )
  def test_formats_encode_to_dense_ids(self, name, filename, header, sep):
    rows = [(10, 500, 4.5), (10, 7, 2.0), (99, 500, 3.0), (5, 7, 5.0)]
    text = header + ''.join(
      f'{u}{sep}{i}{sep}{r}{sep}123\n' for u, i, r in rows
    )
    path = write_text(os.path.join(self.tmp, name, filename), text)
    frame = movielens.read_movielens(path, name)
    np.testing.assert_array_equal(frame['user'], [10, 10, 99, 5])
    ids, values = movielens.encode_columns([frame['user'], frame['item']])
    self.assertEqual(tuple(len(v) for v in values), (3, 2))
    np.testing.assert_array_equal(values[0], [5, 10, 99])
    np.testing.assert_array_equal(values[1], [7, 500])
    np.testing.assert_array_equal(ids, [[1, 1], [1, 0], [2, 1], [0, 0]])
    # The directory works as config.dataset.path too.
    config = _dataset_config(  # Four rows: no validation split.
      self.tmp, name=name, path=os.path.dirname(path), split=(1.0, 0.0, 0.0)
    )
    dataset = data.load_dataset(config)
    self.assertEqual(dataset.field_dims, (4, 3))  # With the OOV ids.

  @parameterized.named_parameters(
    ('columns', '1,2,4.0,5\n3,4,5.0\n', ':3: expected 4'),
    ('extra', '1,2,4.0,5\n3,4,5.0,6,7\n', ':3: expected 4'),
    ('no_ratings', '\n', ': no ratings found'),  # A header alone.
    ('user', '1,2,4.0,5\nx1,4,5.0,6\n', ":3: user id 'x1' is not a number"),
    ('rating', '1,2,4.0,5\n1,4,good,6\n', ":3: rating 'good' is not a"),
    ('nan', '1,2,4.0,5\n1,4,nan,6\n', ":3: rating 'nan' is not a finite"),
    ('inf', '1,2,4.0,5\n1,4,-inf,6\n', ":3: rating '-inf' is not a finite"),
    ('fraction', '1,2,4.0,5\n1.5,4,5,6\n', ":3: user id '1.5' is not a"),
    (
      'huge',
      '1,2,4.0,5\n99999999999999999999,4,5,6\n',
      ":3: user id '99999999999999999999' is out of range",
    ),
    (  # 2**63: one past int64's largest.
      'int64_max',
      '1,2,4.0,5\n1,9223372036854775808,5,6\n',
      ":3: item id '9223372036854775808' is out of range",
    ),
    (  # -2**63 is int64's smallest; a blank line is no row.
      'int64_min_and_blank',
      '-9223372036854775808,2,4.0,5\n\n1,4,good,6\n',
      ":4: rating 'good' is not a number",
    ),
    # A value quoted in the message is cut: it stays one readable line.
    (
      'long',
      '1,2,4.0,5\n1,' + 'x' * 5000 + ',4.0,6\n',
      f":3: item id '{'x' * 60}'... (5000 characters) is not a number",
    ),
  )
  def test_malformed_lines_name_file_and_line(self, body, message):
    path = write_text(
      os.path.join(self.tmp, 'bad', 'ratings.csv'),
      'userId,movieId,rating,timestamp\n' + body,
    )
    config = _dataset_config(self.tmp, name='ml-20m', path=path)
    with self.assertRaises(data.DataError) as cm:
      data.load_dataset(config)
    self.assertIn(path, str(cm.exception))
    self.assertIn(message, str(cm.exception))
    self.assertLess(len(str(cm.exception)), 400)
    self.assertFalse(os.path.exists(os.path.join(config.cache_dir, 'encoded')))

  def test_a_ratings_csv_header_is_checked_or_absent(self):
    rows = ''.join(f'{u},{i},4.0,5\n' for u, i in ((1, 10), (2, 20), (1, 30)))
    path = os.path.join(self.tmp, 'ml', 'ratings.csv')
    write_text(path, rows)  # No header: the first line is a rating.
    frame = movielens.read_movielens(path, 'ml-20m')
    np.testing.assert_array_equal(frame['user'], [1, 2, 1])
    np.testing.assert_array_equal(frame['item'], [10, 20, 30])
    with open(path, 'w', encoding='utf-8-sig') as f:  # A BOM, as Excel's.
      f.write('userId,movieId,rating,timestamp\n' + rows)
    self.assertLen(movielens.read_movielens(path, 'ml-20m'), 3)
    write_text(path, 'movieId,userId,rating,timestamp\n' + rows)
    with self.assertRaisesRegex(
      data.DataError,
      r'ratings\.csv:1: header .* is not userId,movieId,rating,timestamp.*'
      r' read by position',
    ):
      movielens.read_movielens(path, 'ml-20m')

  def test_missing_path_and_unknown_name_name_the_config_key(self):
    config = _dataset_config(self.tmp, name='ml-20m', path='/nonexistent/x')
    with self.assertRaisesRegex(data.DataError, 'config.dataset.path'):
      data.load_dataset(config)
    config = _dataset_config(self.tmp, name='ml-7m')
    with self.assertRaisesRegex(data.DataError, 'config.dataset.name'):
      data.load_dataset(config)
    config = _dataset_config(self.tmp, split=(0.8, 0.3, 0.1))
    with self.assertRaisesRegex(data.DataError, 'config.dataset.split'):
      data.load_dataset(config)


def test_a_url_with_a_trailing_slash_is_joined_with_one_slash(tmp_path):
  payload = _ml100k_zip([(1, 1, 5), (2, 1, 1)])
  md5 = hashlib.md5(payload).hexdigest()
  with (
    HttpServer(payload) as server,
    mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': md5}),
    mock.patch.object(
      movielens.download, 'download', wraps=download.download
    ) as fetched,
  ):
    config = _dataset_config(str(tmp_path), url=f'{server.url}/')
    final = movielens.fetch_grouplens('ml-100k', config)
  # Not '//ml-100k.zip' (which http.server would hide).
  assert fetched.call_args.args[0] == f'{server.url}/ml-100k.zip'
  assert server.requests == ['/ml-100k.zip']
  assert (tmp_path / 'cache' / 'downloads' / 'ml-100k' / 'u.data').exists()
  assert final == str(tmp_path / 'cache' / 'downloads' / 'ml-100k')


def test_a_url_with_a_query_string_keeps_it_after_the_archive(tmp_path):
  # A mirror's token: '/ml-100k.zip' went after the query, into its value.
  payload = _ml100k_zip([(1, 1, 5), (2, 1, 1)])
  md5 = hashlib.md5(payload).hexdigest()
  with (
    HttpServer(payload) as server,
    mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': md5}),
  ):
    urls = ('/mirror?token=a/b', '/mirror/?token=a/b', '?token=a/b')
    for i, url in enumerate(urls):
      config = _dataset_config(str(tmp_path / str(i)), url=server.url + url)
      final = movielens.fetch_grouplens('ml-100k', config)
      assert os.path.exists(os.path.join(final, 'u.data'))
  assert server.requests == [
    '/mirror/ml-100k.zip?token=a/b',
    '/mirror/ml-100k.zip?token=a/b',
    '/ml-100k.zip?token=a/b',
  ]


def test_a_url_with_a_fragment_is_refused_naming_the_key(tmp_path):
  url = 'https://mirror.example/movielens#md5=0e33842e'
  config = _dataset_config(str(tmp_path), url=url)
  with pytest.raises(data.DataError) as refused:
    movielens.fetch_grouplens('ml-100k', config)
  assert str(refused.value) == (
    f"config.dataset.url='{url}' ends in a fragment (#md5=0e33842e), which"
    " no server sees: remove it. It is the base URL of GroupLens's"
    ' archives, checked against their published MD5s.'
  )
  assert not (tmp_path / 'cache' / 'downloads' / 'ml-100k.zip').exists()


def test_an_archive_unpacked_by_the_run_waited_for_is_not_fetched(tmp_path):
  # Runs started together: the one that waited on the lock finds the
  # directory that the other unpacked meanwhile, and downloads nothing.
  config = _dataset_config(str(tmp_path), url='http://127.0.0.1:9')
  final = tmp_path / 'cache' / 'downloads' / 'ml-100k'
  building = movielens.core.building

  @contextlib.contextmanager
  def waited(path, lock_dir):
    with building(path, lock_dir):
      final.mkdir(parents=True)  # What the other run unpacked.
      (final / 'u.data').write_text('1\t1\t5\t0\n')
      yield

  with mock.patch.object(movielens.core, 'building', waited):
    assert movielens.fetch_grouplens('ml-100k', config) == str(final)
  assert _files_under(final) == ['u.data']


def _fetch_100k(tmp_path, payload, **patches):
  """fetch_grouplens of ml-100k served as `payload`, its MD5 trusted."""
  md5 = hashlib.md5(payload).hexdigest()
  with (
    HttpServer(payload) as server,
    mock.patch.dict(movielens.GROUPLENS_MD5, {'ml-100k': md5}),
  ):
    config = _dataset_config(str(tmp_path), url=server.url)
    with contextlib.ExitStack() as stack:
      for name, value in patches.items():
        stack.enter_context(mock.patch.object(movielens.core, name, value))
      return movielens.fetch_grouplens('ml-100k', config)


def test_an_archive_without_its_top_folder_is_unpacked_whole(tmp_path):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as z:
    z.writestr('u.data', '1\t2\t5\t0\n')
    z.writestr('README', 'flat')
  final = _fetch_100k(tmp_path, buffer.getvalue())
  assert sorted(os.listdir(final)) == ['README', 'u.data']
  assert movielens.read_movielens(
    os.path.join(final, 'u.data'), 'ml-100k'
  ).to_numpy().tolist() == [[1, 2, 5]]


def test_a_folder_another_run_unpacked_first_is_kept(tmp_path):
  # Where `building` cannot lock (no lock support), two runs may unpack at
  # once: the later rename fails onto the other's folder, which is kept.
  final = tmp_path / 'cache' / 'downloads' / 'ml-100k'
  make_temp_dir = movielens.core.make_temp_dir

  def raced(root, prefix):
    final.mkdir()
    (final / 'u.data').write_text('7\t8\t1\t0\n')
    return make_temp_dir(root, prefix)

  payload = _ml100k_zip([(1, 2, 5)])
  assert _fetch_100k(tmp_path, payload, make_temp_dir=raced) == str(final)
  assert (final / 'u.data').read_text() == '7\t8\t1\t0\n'
  assert os.listdir(final.parent) == ['ml-100k']  # No archive, no temp.


def test_a_path_from_home_or_missing_is_resolved_or_named(
  tmp_path, monkeypatch
):
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'ml').mkdir()
  (tmp_path / 'ml' / 'u.data').write_text('1\t2\t5\t0\n')
  config = _dataset_config(str(tmp_path), name='ml-100k', path='~/ml')
  assert movielens.files(config) == {'all': str(tmp_path / 'ml' / 'u.data')}
  config.path = '~/none'
  with pytest.raises(
    data.DataError,
    match=rf'^config.dataset.path: {tmp_path}/none/?(u.data)? does not'
    r' exist \(expected the ml-100k file u.data or its directory\)',
  ):
    movielens.files(config)


@pytest.mark.parametrize(
  ('body', 'message'),
  [
    ('\n\n', ': no ratings found'),  # Blank lines: no rows, no error.
    ('1\t2\t5\t0\t9\n3\t4\t1\t0\t9\n', ":1: expected 4 '\\t'-separated"),
  ],
)
def test_a_file_without_a_header_of_no_or_five_columns(tmp_path, body, message):
  path = write_text(str(tmp_path / 'u.data'), body)
  with pytest.raises(data.DataError, match='^' + re.escape(path + message)):
    movielens.read_movielens(path, 'ml-100k')


def test_a_download_that_slows_down_stalls_in_its_second_window(tmp_path):
  # A clock that moves 61 s per reading: 100 kB in the first 60 s window,
  # 10 bytes in the second, which stalls; progress is logged every 30 s.
  chunks = [b'x' * 100_000, b'y' * 10, b'z' * 10]
  response = mock.Mock(read1=lambda size: chunks.pop(0) if chunks else b'')
  clock = iter(range(0, 1000, 61))
  with (
    mock.patch.object(download.time, 'monotonic', lambda: next(clock)),
    mock.patch.object(download.logging, 'info') as info,
    pytest.raises(
      download._Cut, match=r'^stalled: 10 bytes in 61 s \(100010 in all\)$'
    ),
  ):
    # A resumed transfer: 2.5 MB were kept.
    download._copy(
      response, io.BytesIO(), hashlib.md5(), 'u', 100_020, 2_500_000
    )
  assert [args[0] % args[1:] for args, _ in info.call_args_list] == [
    'Downloaded 2.6 of 2.6 MB of u'
  ]


def test_a_tab_separated_file_as_ml_20m_names_the_separator(tmp_path):
  # Its header is one ','-column: no header, so line 1 has the wrong columns.
  path = write_text(
    str(tmp_path / 'ratings.csv'),
    'userId\tmovieId\trating\ttimestamp\n1\t2\t5\t0\n',
  )
  with pytest.raises(
    data.DataError,
    match=f"^{re.escape(path)}:1: expected 4 ','-separated columns .* found 1",
  ):
    movielens.read_movielens(path, 'ml-20m')


def test_the_reader_of_rows_to_predict_with_and_without_ratings():
  reader = movielens.Reader(',')
  assert not reader.for_rows(b'1,2\n').labeled
  assert reader.for_rows(b'1,2,5,0\n').labeled
  unlabeled = movielens.Reader(',', labeled=False)
  assert unlabeled.has_header(b'user,item\n', 'p')
  bad = []
  keys, labels = unlabeled.parse(
    [b'1,2\n', b'x,3\n', b'4,5\n'],
    7,
    'f:{}'.format,
    lambda where, problem: bad.append((where, problem)),
  )
  assert keys.tolist() == [[1, 2], [4, 5]]
  assert np.isnan(labels).all() and labels.shape == (2,)
  assert bad == [('f:8', "user id 'x' is not a number")]
  bad.clear()
  keys, labels = reader.parse(
    [b'1,2,5,0\n', b'1,2,5\n'],
    1,
    'f:{}'.format,
    lambda where, problem: bad.append((where, problem)),
  )
  assert keys.tolist() == [[1, 2]] and labels.tolist() == [1.0]
  assert bad[0][1].endswith(' (rows to predict may also have 2: user, item)')
  with pytest.raises(
    data.DataError, match=r'user then movie, rating, timestamp\. Reorder'
  ):
    reader.has_header(b'a,b,c,d\n', 'p')


def test_an_upper_case_md5_is_checked_and_an_md5_before_a_sha256(tmp_path):
  payload = b'archive bytes'
  md5 = hashlib.md5(payload).hexdigest().upper()
  dest = str(tmp_path / 'x.zip')
  with HttpServer(payload) as server:
    got = download.download(f'{server.url}/x.zip', dest, md5=md5, sha256='0')
  assert got == dest and (tmp_path / 'x.zip').read_bytes() == payload


if __name__ == '__main__':
  absltest.main()
