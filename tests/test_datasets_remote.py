"""Tests of dataset files named by URL (datasets/remote.py)."""

import contextlib
import dataclasses
import errno
import fcntl
import gzip
import hashlib
import http.server
import io
import os
import tarfile
import threading
import time
from unittest import mock
import zipfile

from absl.testing import absltest
from dataset_testing import DatasetTestCase
from dataset_testing import HttpServer
from dataset_testing import all_rows
from dataset_testing import criteo_rows
import numpy as np
from test_side_features import _write_ml100k

import data
from datasets import remote
import encoder_side


def _tar(members: dict[str, bytes], mode: str = 'w:gz') -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode=mode) as t:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      t.addfile(info, io.BytesIO(payload))
  return buffer.getvalue()


def _criteo_text(n: int, seed: int = 0) -> bytes:
  return ''.join('\t'.join(r) + '\n' for r in criteo_rows(n, seed)).encode()


def _files_under(root: str) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(d, f), root)
    for d, _, files in os.walk(root)
    for f in files
  )


class RemotePathTest(DatasetTestCase):
  @property
  def cache(self) -> str:
    return os.path.join(self.tmp, 'cache')

  def _local(self, name: str, payload: bytes) -> str:
    path = os.path.join(self.tmp, 'local', name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(payload)
    return path

  def _same(self, got, want):
    self.assertEqual(got.field_dims, want.field_dims)
    for a, b in zip(all_rows(got), all_rows(want), strict=True):
      np.testing.assert_array_equal(a, b)

  def test_a_criteo_archive_is_downloaded_once_unpacked_and_read(self):
    train = _criteo_text(300)
    archive = _tar(
      {'train.txt': train, 'test.txt': b'', 'readme.txt': b'Criteo'}
    )
    digest = hashlib.sha256(archive).hexdigest()
    want = data.load_dataset(
      self.config('criteo', self._local('train.txt', train))
    )
    with HttpServer(archive) as server:
      url = f'{server.url}/dac/dac.tar.gz'
      config = self.config('criteo', f'{url}#sha256={digest.upper()}')
      got = data.load_dataset(config)
    self._same(got, want)
    self.assertEqual(server.requests, ['/dac/dac.tar.gz'])
    # The archive went; its directory stays, named after it, read offline.
    downloads = os.path.join(self.tmp, 'cache', 'downloads')
    tag = hashlib.sha256(url.encode()).hexdigest()[:16]
    self.assertEqual(
      _files_under(downloads),
      [f'url-{tag}/{remote.RECORD}']
      + [f'url-{tag}/dac/{n}' for n in ('readme.txt', 'test.txt', 'train.txt')],
    )
    with mock.patch.object(remote.download, 'download') as fetched:
      self._same(data.load_dataset(config), want)  # Its cache.
      self.assertEqual(
        remote.fetch(url, config.cache_dir), f'{downloads}/url-{tag}/dac'
      )
    fetched.assert_not_called()

  def test_a_file_that_is_no_archive_is_kept_as_it_is(self):
    rows = [['clicked', 'user', 'city']] + [
      [str(i % 2), f'u{i % 7}', f'c{i % 3}'] for i in range(200)
    ]
    text = ''.join(','.join(r) + '\n' for r in rows).encode()
    csv = {'label_column': 'clicked'}
    want = data.load_dataset(
      self.config('csv', self._local('clicks.csv', text), csv=csv)
    )
    md5 = hashlib.md5(text).hexdigest()
    with HttpServer(text) as server:
      url = f'{server.url}/clicks.csv'
      got = data.load_dataset(self.config('csv', f'{url}#md5={md5}', csv=csv))
    self._same(got, want)
    tag = hashlib.sha256(url.encode()).hexdigest()[:16]
    self.assertEqual(
      _files_under(os.path.join(self.tmp, 'cache', 'downloads')),
      [f'url-{tag}/{remote.RECORD}', f'url-{tag}/clicks.csv'],
    )

  def test_an_archive_of_one_file_is_read_as_that_file(self):
    text = b'clicked,user\n' + b''.join(
      b'%d,u%d\n' % (i % 2, i % 5) for i in range(100)
    )
    csv = {'label_column': 'clicked'}
    want = data.load_dataset(
      self.config('csv', self._local('clicks.csv', text), csv=csv)
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as z:
      z.writestr('clicks.csv', text)
    with HttpServer(buffer.getvalue()) as server:
      url = f'{server.url}/clicks.zip'
      config = self.config('csv', url, csv=csv)
      self._same(data.load_dataset(config), want)
    tag = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = os.path.join(config.cache_dir, 'downloads', f'url-{tag}')
    self.assertEqual(
      remote.fetch(url, config.cache_dir), f'{local}/clicks/clicks.csv'
    )

  def test_an_archive_or_gzip_whose_url_names_none_is_told_by_content(self):
    train = _criteo_text(200, seed=3)
    want = data.load_dataset(
      self.config('criteo', self._local('train.txt', train))
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as z:
      z.writestr('day_0.txt', train)
    payloads = {  # What each URL serves, and what it is kept as.
      'tar': (_tar({'dac/train.txt': train}), 'train.txt'),  # Its folder.
      'zip': (buffer.getvalue(), 'day_0.txt'),
      'gz': (gzip.compress(train), '{}.gz'),
      'text': (train, None),
    }
    for kind, (payload, kept) in payloads.items():
      with self.subTest(kind), HttpServer(payload) as server:
        # A server that names the file in Content-Disposition only, and
        # one that redirects to it (another name, which is not looked at).
        for url in (
          f'{server.url}/{kind}/download?id=7',
          self._redirect(f'{server.url}/{kind}/download?id=7'),
        ):
          self._same(data.load_dataset(self.config('criteo', url)), want)
          tag = hashlib.sha256(url.encode()).hexdigest()[:16]
          root = os.path.join(self.cache, 'downloads', f'url-{tag}')
          name = url.split('?')[0].rsplit('/', 1)[1]  # The URL's.
          self.assertEqual(
            _files_under(root),
            [remote.RECORD, f'{name}/{kept.format(name)}' if kept else name],
          )
          with mock.patch.object(remote.download, 'download') as fetched:
            self._same(data.load_dataset(self.config('criteo', url)), want)
          fetched.assert_not_called()

  def _redirect(self, to: str) -> str:
    """A URL on 127.0.0.1 that answers 302 with `to`, while the test runs."""

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(302)
        self.send_header('Location', to)
        self.send_header('Content-Length', '0')
        self.end_headers()

      def log_message(self, *args):
        pass

    httpd = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    self.addCleanup(httpd.server_close)
    self.addCleanup(httpd.shutdown)
    return f'http://127.0.0.1:{httpd.server_port}/latest'

  def test_runs_unlocked_at_once_all_read_the_copy_the_first_put(self):
    # Without the lock (a filesystem without flock: core.building goes on
    # unlocked), a run downloads while another does all of it.
    text = _criteo_text(30)
    real, others = remote.download.download, []

    def racing(url, dest, **kwargs):
      real(url, dest, **kwargs)
      if not others:  # Another run, started at once, all of it now.
        others.append(None)
        others[0] = remote.fetch(url, self.cache)

    for name, payload, kept in (
      ('dac.tar.gz', _tar({'dac/train.txt': text}), 'dac/train.txt'),
      ('train.txt', text, 'train.txt'),
    ):
      others.clear()
      with (
        self.subTest(name),
        HttpServer(payload) as server,
        mock.patch.object(
          remote.core, 'building', lambda *_: contextlib.nullcontext()
        ),
        mock.patch.object(remote.download, 'download', side_effect=racing),
      ):
        url = f'{server.url}/{name}'
        got = remote.fetch(url, self.cache)
        tag = hashlib.sha256(url.encode()).hexdigest()[:16]
        root = os.path.join(self.cache, 'downloads', f'url-{tag}')
        self.assertEqual([got], others)
        self.assertEqual(got, os.path.join(root, kept))
        with open(got, 'rb') as f:
          self.assertEqual(f.read(), text)
        # The other run unpacked the archive this one downloaded (no
        # checksum to record); nothing half-done stays.
        self.assertEqual(_files_under(root), [kept])

  def test_a_url_whose_name_is_a_dot_or_none_is_kept_as_download(self):
    text = _criteo_text(5)
    with HttpServer(text) as server:
      for path in ('/a/..', '/a/.', '/', '/a/..?x=1'):
        with self.subTest(path):
          url = f'{server.url}{path}'
          tag = hashlib.sha256(url.encode()).hexdigest()[:16]
          got = remote.fetch(url, self.cache)
          self.assertEqual(
            got, os.path.join(self.cache, 'downloads', f'url-{tag}', 'download')
          )
          with open(got, 'rb') as f:
            self.assertEqual(f.read(), text)

  def test_valid_and_test_files_at_urls(self):
    text = _criteo_text(60, seed=1)
    with HttpServer(text) as server:
      dataset = data.load_dataset(
        self.config(
          'criteo',
          self._local('train.txt', _criteo_text(300)),
          valid_path=f'{server.url}/valid.txt',
          test_path=f'{server.url}/test.txt',
        )
      )
    self.assertEqual(server.requests, ['/valid.txt', '/test.txt'])
    self.assertEqual((len(dataset.valid), len(dataset.test)), (60, 60))
    np.testing.assert_array_equal(dataset.valid.ids, dataset.test.ids)

  def test_a_zip_of_a_movielens_set_with_side_files_at_a_url(self):
    # The encoder reads the side tables again (encoder_side.from_dataset):
    # from the downloaded copy too.
    local = os.path.join(self.tmp, 'local', 'ml-100k')
    _write_ml100k(local)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as z:
      for name in sorted(os.listdir(local)):
        z.write(os.path.join(local, name), f'ml-100k/{name}')
    features = ('genres', 'gender')
    want_config = self.config('ml-100k', local, side_features=features)
    want = data.load_dataset(want_config)
    with HttpServer(buffer.getvalue()) as server:
      config = self.config(
        'ml-100k', f'{server.url}/ml-100k.zip', side_features=features
      )
      got = data.load_dataset(config)
    self._same(got, want)
    self.assertEqual(got.multi_field_names, ('genres',))
    _, config, _ = data.resolve(config)
    _, want_config, _ = data.resolve(want_config)
    got = encoder_side.from_dataset(got, 'movielens', config)
    want = encoder_side.from_dataset(want, 'movielens', want_config)
    self.assertIsNotNone(got.item_multi)
    for field in dataclasses.fields(want):
      np.testing.assert_equal(
        getattr(got, field.name), getattr(want, field.name), field.name
      )

  def test_a_wrong_checksum_keeps_the_file_aside_for_a_corrected_one(self):
    archive = _tar({'train.txt': _criteo_text(20)})
    right = hashlib.sha256(archive).hexdigest()
    with HttpServer(archive) as server:
      url = f'{server.url}/dac.tar.gz'
      tag = hashlib.sha256(url.encode()).hexdigest()[:16]
      aside = f'downloads/url-{tag}/dac.tar.gz{remote.UNVERIFIED}'
      for gets in (1, 2):  # The same typo again: downloaded again.
        with self.assertRaisesRegex(
          data.DownloadError,
          f'^Checksum mismatch for {url}: SHA256 {right}, expected'
          f' {"0" * 64}\\. The file is kept aside as \\S+{aside}, used only'
          ' if a later checksum names it: run again, and if it persists,'
          ' config.dataset.path serves another file; or download',
        ):
          data.load_dataset(self.config('criteo', f'{url}#sha256={"0" * 64}'))
        self.assertEqual(_files_under(self.cache), [aside])
        self.assertEqual(len(server.requests), gets)
      config = self.config('criteo', f'{url}#sha256={right}')
      self.assertEqual(len(data.load_dataset(config).train), 16)
      self.assertEqual(len(server.requests), 2)  # The file kept aside.
      self.assertNotIn(aside, _files_under(self.cache))
      with self.assertRaisesRegex(data.DataError, 'has SHA256'):
        data.load_dataset(self.config('criteo', f'{url}#sha256={"1" * 64}'))
      # Aside, and no checksum: never read unchecked, downloaded again.
      other = f'{server.url}/b/dac.tar.gz'
      with self.assertRaisesRegex(data.DownloadError, 'kept aside'):
        remote.fetch(f'{other}#md5={"0" * 32}', self.cache)
      remote.fetch(other, self.cache)
      self.assertEqual(len(server.requests), 4)
    self.assertEqual(
      [f for f in _files_under(self.cache) if 'unverified' in f], []
    )

  def test_a_fragment_that_is_no_checksum_names_the_key(self):
    for fragment in ('sha256=abc', 'sha1=' + '0' * 40, 'md5=' + 'g' * 32):
      with self.subTest(fragment):
        with self.assertRaisesRegex(
          data.DataError,
          f'^config.dataset.valid_path: the URL fragment #{fragment} is not'
          ' a checksum; write #sha256=<64 hex digits> or #md5=<32 hex'
          ' digits>, or leave the fragment out.$',
        ):
          data.load_dataset(
            self.config(
              'criteo',
              self._local('train.txt', _criteo_text(20)),
              valid_path=f'http://127.0.0.1:9/valid.txt#{fragment}',
              test_path=self._local('test.txt', _criteo_text(20, 1)),
            )
          )

  def test_a_url_of_another_scheme_names_the_key(self):
    # `gs://bucket/train.txt` was read as a relative path and said not to
    # exist as `<cwd>/gs:/bucket/train.txt`.
    local = self._local('train.txt', _criteo_text(20))
    for key, url in (
      ('path', 'gs://bucket/train.txt'),
      ('path', 's3://bucket/train.txt'),
      ('valid_path', 'ftp://host/valid.txt'),
      ('test_path', 'file:///data/test.txt'),
    ):
      paths = {'valid_path': local, 'test_path': local, key: url}
      path = paths.pop('path', local)
      with self.subTest(url):
        with self.assertRaisesRegex(
          data.DataError,
          f'^config.dataset.{key}={url!r}: only http and https URLs are'
          ' downloaded; copy the file here yourself',
        ):
          data.load_dataset(self.config('criteo', path, **paths))

  def test_an_http_error_names_the_key(self):
    with HttpServer(b'', status=404) as server:
      url = f'{server.url}/train.txt'
      with self.assertRaisesRegex(
        data.DownloadError,
        f'^Could not download {url}: HTTP Error 404: Not Found. Check the'
        ' network and config.dataset.path, then run again',
      ):
        data.load_dataset(self.config('criteo', url))

  def test_an_archive_that_writes_outside_or_is_damaged_is_refused(self):
    escape = _tar({'../outside.txt': b'x', 'train.txt': _criteo_text(20)})
    damaged = _tar({'train.txt': _criteo_text(200)})[:-300]
    for filters in (True, False):
      for name, payload, reason in (
        ('escape', escape, 'outside.txt'),
        ('damaged', damaged, ''),
      ):
        with (
          self.subTest(name=name, filters=filters),
          mock.patch.object(remote, 'FILTERS', filters),
          HttpServer(payload) as server,
        ):
          url = f'{server.url}/{name}{filters}.tar.gz'
          with self.assertRaisesRegex(
            data.DownloadError,
            f'^Could not unpack {url} \\(config.dataset.path\\): .*{reason}.*'
            ' The archive was deleted: run again; or unpack it yourself and'
            ' set config.dataset.path to its directory.$',
          ):
            data.load_dataset(self.config('criteo', url))
    self.assertEqual(_files_under(os.path.join(self.tmp, 'cache')), [])
    self.assertFalse(os.path.exists(os.path.join(self.tmp, 'outside.txt')))

  def test_an_archive_the_disk_cannot_take_is_kept_and_unpacked_later(self):
    train = _criteo_text(300)
    archive = _tar({'train.txt': train, 'test.txt': b''})
    want = data.load_dataset(
      self.config('criteo', self._local('train.txt', train))
    )
    full = OSError(errno.ENOSPC, 'No space left on device')
    with HttpServer(archive) as server:
      url = f'{server.url}/dac.tar.gz'
      config = self.config('criteo', url)
      tag = hashlib.sha256(url.encode()).hexdigest()[:16]
      kept = os.path.join(self.tmp, 'cache', 'downloads', f'url-{tag}')
      with (
        mock.patch.object(remote, '_unpack', side_effect=full),
        self.assertRaisesRegex(
          data.DownloadError,
          rf'^Could not unpack {url} into {kept}: \[Errno 28\] No space left'
          rf' on device\. The downloaded archive is kept \({kept}/dac\.tar'
          r'\.gz\): free space there \(or restore write access\) and run'
          r' again, and it is unpacked without being downloaded again\.$',
        ),
      ):
        data.load_dataset(config)
      self.assertEqual(os.listdir(kept), ['dac.tar.gz'])
      self._same(data.load_dataset(config), want)
    self.assertEqual(server.requests, ['/dac.tar.gz'])  # Downloaded once.
    self.assertEqual(os.listdir(kept), ['dac'])

  def test_a_kept_archive_is_checked_against_a_checksum_given_later(self):
    train = _criteo_text(100)
    archive = _tar({'train.txt': train, 'test.txt': b''})
    right = hashlib.sha256(archive).hexdigest()
    full = OSError(errno.ENOSPC, 'No space left on device')
    with HttpServer(archive) as server:
      for name, fragment, gets in (('a', right, 1), ('b', '0' * 64, 2)):
        with self.subTest(fragment=fragment):
          url = f'{server.url}/{name}/dac.tar.gz'
          with (
            mock.patch.object(remote, '_unpack', side_effect=full),
            self.assertRaisesRegex(data.DownloadError, 'archive is kept'),
          ):
            data.load_dataset(self.config('criteo', url))  # No checksum.
          config = self.config('criteo', f'{url}#sha256={fragment}')
          if gets == 1:  # The kept archive is the file named: no download.
            self.assertEqual(len(data.load_dataset(config).train), 80)
          else:  # Another file: downloaded again, and refused.
            with self.assertRaisesRegex(data.DownloadError, 'Checksum'):
              data.load_dataset(config)
            tag = hashlib.sha256(url.encode()).hexdigest()[:16]
            root = os.path.join(self.tmp, 'cache', 'downloads', f'url-{tag}')
            # Neither copy stays as if good; the download is kept aside.
            self.assertEqual(
              os.listdir(root), [f'dac.tar.gz{remote.UNVERIFIED}']
            )
          self.assertEqual(server.requests.count(f'/{name}/dac.tar.gz'), gets)

  def test_a_kept_copy_is_checked_against_the_checksum_of_each_run(self):
    archive = _tar({'train.txt': _criteo_text(100), 'test.txt': b''})
    sha256 = hashlib.sha256(archive).hexdigest()
    with HttpServer(archive) as server:
      url = f'{server.url}/a/dac.tar.gz'
      config = self.config('criteo', f'{url}#sha256={sha256}')
      self.assertEqual(len(data.load_dataset(config).train), 80)
      tag = hashlib.sha256(url.encode()).hexdigest()[:16]
      root = os.path.join(self.tmp, 'cache', 'downloads', f'url-{tag}')
      md5 = hashlib.md5(archive).hexdigest()
      for fragment, error in (
        (f'sha256={"0" * 64}', f'has SHA256 {sha256}, not the #sha256=0{{64}}'),
        (f'md5={md5}', 'was unpacked from a download whose md5 was not'),
      ):
        with self.subTest(fragment=fragment):
          with self.assertRaisesRegex(
            data.DataError,
            f'^config.dataset.path: the copy of {url} in {root} {error}',
          ):
            data.load_dataset(self.config('criteo', f'{url}#{fragment}'))
      self.assertEqual(server.requests, ['/a/dac.tar.gz'])  # Once.
    text = _criteo_text(100, seed=2)
    with HttpServer(text) as server:  # A file kept as it is: hashed.
      url = f'{server.url}/f/train.txt'
      self.assertEqual(
        len(data.load_dataset(self.config('criteo', url)).train), 80
      )
      with self.assertRaisesRegex(data.DataError, 'has MD5 .*, not the #md5='):
        data.load_dataset(self.config('criteo', f'{url}#md5={"0" * 32}'))
      md5 = hashlib.md5(text).hexdigest()
      config = self.config('criteo', f'{url}#md5={md5}')
      self.assertEqual(len(data.load_dataset(config).train), 80)
      self.assertEqual(server.requests, ['/f/train.txt'])

  def test_a_part_left_7_days_goes_when_another_url_is_fetched(self):
    downloads = os.path.join(self.tmp, 'cache', 'downloads')
    ages = {  # Days since each file was written.
      'url-old/x.tar.gz.part': 8,  # Abandoned: goes, with what describes it.
      'url-old/x.tar.gz.part.json': 8,
      'url-recent/y.zip.part': 1,  # Cut yesterday: resumed soon.
      'url-recent/y.zip.part.json': 1,
      'url-week/w.csv.part': 6.9,  # Not quite 7 days: resumed yet, maybe.
      'url-held/z.csv.part': 8,  # A download resumes it now.
      # A download that failed its checksum, never fetched again: as a part.
      f'url-bad/v.csv{remote.UNVERIFIED}': 8,
      f'url-new/u.csv{remote.UNVERIFIED}': 1,
      'url-done/train.txt': 30,  # Complete: stays, however old.
      'url-mixed/a.csv': 30,  # And keeps its directory.
      'url-mixed/b.csv.part': 8,
      'ml-100k.zip.part': 8,  # Not a URL's directory: not the sweep's.
      'other/c.part': 8,
      'url-file': 8,  # A file, where a URL's directory would be.
    }

    def write(name, days):
      path = os.path.join(downloads, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(b'kept bytes')
      os.utime(path, (time.time() - days * 24 * 3600,) * 2)
      return path

    for name, days in ages.items():
      write(name, days)
    # flock holds an open file, not a path: this one is the test's own.
    held = self.enter_context(open(f'{downloads}/url-held/z.csv.part', 'rb'))
    fcntl.flock(held, fcntl.LOCK_EX)
    text = b'clicked,user\n1,u1\n'
    with (
      HttpServer(text) as server,
      mock.patch.object(remote.logging, 'info') as info,
    ):
      url = f'{server.url}/clicks.csv'
      tag = hashlib.sha256(url.encode()).hexdigest()[:16]
      self.assertEqual(
        remote.fetch(url, os.path.join(self.tmp, 'cache')),
        f'{downloads}/url-{tag}/clicks.csv',
      )
      # The fetched URL's own directory is not swept: its part is resumed.
      write(f'url-{tag}/more.part', 8)
      remote.fetch(url, os.path.join(self.tmp, 'cache'))
    gone = ['url-old/x.tar.gz.part', 'url-old/x.tar.gz.part.json']
    gone += ['url-mixed/b.csv.part', f'url-bad/v.csv{remote.UNVERIFIED}']
    self.assertEqual(
      _files_under(downloads),
      sorted(
        (set(ages) - set(gone))
        | {f'url-{tag}/{n}' for n in ('clicks.csv', 'more.part', remote.RECORD)}
      ),
    )
    self.assertEqual(os.listdir(f'{downloads}/url-old'), [])  # It stays.
    logged = [args[0] % args[1:] for args, _ in info.call_args_list]
    for part in ('url-old/x.tar.gz.part', 'url-mixed/b.csv.part'):
      self.assertIn(
        f'Removing {downloads}/{part}: a download not resumed for 8 days',
        logged,
      )

  def test_a_part_written_or_replaced_as_it_is_swept_stays(self):
    part = os.path.join(self.tmp, 'url-a', 'x.csv.part')
    os.makedirs(os.path.dirname(part))
    flock = fcntl.flock

    def write(path, days):
      with open(path, 'wb') as f:
        f.write(b'kept bytes')
      os.utime(path, (time.time() - days * 24 * 3600,) * 2)

    # Between the sweep's look at its age and its lock, a download ...
    def written(fd, how):  # ... resumed it,
      os.utime(part, None)
      flock(fd, how)

    def replaced(fd, how):  # ... or another sweep deleted it and a download
      os.remove(part)  # started it again.
      write(part, 0)
      flock(fd, how)

    for race in (written, replaced):
      with self.subTest(race.__name__):
        write(part, 8)
        write(part + '.json', 8)
        with mock.patch.object(remote.fcntl, 'flock', race):
          remote._remove_abandoned(part)
        self.assertTrue(os.path.exists(part + '.json'))
        with open(part, 'rb') as f:  # Left, and not held.
          self.assertEqual(f.read(), b'kept bytes')
          fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    write(part, 8)
    denied = PermissionError(errno.EACCES, 'Permission denied')
    with mock.patch.object(remote.os, 'remove', side_effect=denied):
      remote._remove_abandoned(part)  # A cache this process cannot write.
    self.assertTrue(os.path.exists(part))
    remote._remove_abandoned(part)
    self.assertEqual(os.listdir(os.path.dirname(part)), [])
    remote._remove_abandoned(part)  # Gone since it was listed: nothing.
    remote._sweep_parts(os.path.join(self.tmp, 'none'), 'url-b')  # No cache.

  def test_a_local_archive_is_refused_with_what_to_do(self):
    # The Criteo Kaggle archive, downloaded by hand: read as text, its tar
    # header was line 1 ("label 'train.txt\x00\x00...' is not 0 or 1"),
    # a MovieLens zip's signature 'PK\x03\x04' was a line of 1 column.
    tar = self._local('dac.tar.gz', _tar({'train.txt': _criteo_text(30)}))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as z:
      z.writestr('ml/ratings.csv', 'userId,movieId,rating,timestamp\n')
    zipped = self._local('ml.zip', buffer.getvalue())
    text = self._local('train.txt', _criteo_text(30))
    for name, key, archive in (
      ('criteo', 'path', tar),
      ('criteo', 'test_path', tar),
      ('ml-latest-small', 'path', zipped),
    ):
      paths = {'path': text, 'valid_path': text, 'test_path': text}
      if name != 'criteo':
        paths = {'path': ''}
      paths[key] = archive
      config = self.config(name, paths.pop('path'), **paths)
      with self.subTest(name=name, key=key):
        with self.assertRaisesRegex(
          data.DataError,
          rf'^config\.dataset\.{key}: {archive} is an archive, which only an'
          r' http\(s\) URL unpacks .* name the file or directory it holds\.$',
        ):
          data.load_dataset(config)
    self.assertFalse(os.path.exists(os.path.join(self.tmp, 'cache', 'encoded')))

  def test_local_paths_are_left_as_they_are(self):
    config = self.config('criteo', '/data/train.txt', test_path='x.txt')
    self.assertIs(remote.localize(config), config)
    self.assertTrue(remote.is_url('HTTPS://host/x'))
    self.assertFalse(remote.is_url('ftp://host/x'))
    self.assertFalse(remote.is_url(None))


if __name__ == '__main__':
  absltest.main()
