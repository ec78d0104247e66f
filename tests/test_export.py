"""Tests of export.py: every model file exports, to jax.export and to ONNX.

For every file in models/ (new ones included), built with multi-hot and
numeric fields, the exported function of `ids`, `multi_ids` and `dense`
must agree with `model.apply` within 1e-5 on a batch of 1 and of 777:
model.jax in a subprocess in which flax and the project cannot be
imported, and model.onnx in onnxruntime. All models share one process and
one subprocess. A run's whole export (the command line, ids only) is
checked too.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
from model_tables import FIELD_DIMS
from model_tables import MODEL_NAMES
from model_tables import build
from model_testing import random_ids
import numpy as np
import onnx  # jax2onnx's dependency.
import onnxruntime
from predict_testing import ROOT
from predict_testing import command_error
from predict_testing import trained_run

import encoder
import export
import onnx_export
import predict
from utils import UserError

# Models that cannot go to ONNX, and why (the README lists them). A model
# listed here must fail the conversion, so the list stays true.
ONNX_UNSUPPORTED = {}

TOLERANCE = 1e-5

# The newest ONNX IR version and opset that onnxruntime 1.18 (May 2024)
# loads: model.onnx must not need a newer onnxruntime than that (jax2onnx
# stamps opset 23 by default, which onnxruntime 1.22 and older refuse).
MAX_IR_VERSION = 10
MAX_OPSET = 21

# The side inputs every model is built with.
MULTI_FIELD_DIMS = (6, 9)
NUM_DENSE = 2
MAX_LEN = 3

# Run in a subprocess with jax and numpy only: loads every model.jax and
# prints the largest difference from the expected probabilities per batch.
_JAX_ONLY = """
import sys
sys.modules['flax'] = None  # `import flax` raises ImportError.
import errno
import json
import jax
import numpy as np

try:
  import flax  # noqa: F401
  raise SystemExit('flax was importable')
except ImportError:
  pass
for project_module in ('models', 'export', 'predict', 'train'):
  try:
    __import__(project_module)
    raise SystemExit(project_module + ' was importable')
  except ImportError:
    pass
expected = np.load('expected.npz')
inputs = [expected[k] for k in ('ids', 'multi_ids', 'dense')]
errors = {}
for name in json.loads(sys.argv[1]):
  with open(name + '.jax', 'rb') as f:
    model = jax.export.deserialize(bytearray(f.read()))
  errors[name] = []
  for n in (1, len(inputs[0])):
    got = np.asarray(model.call(*(x[:n] for x in inputs)))
    errors[name].append(float(np.max(np.abs(got - expected[name][:n]))))
print(json.dumps(errors))
"""


def _side_inputs(batch, seed):
  """`ids`, `multi_ids` (lists of 0 to MAX_LEN ids, -1 padding) and
  `dense` of `batch` rows."""
  rng = np.random.default_rng(seed)
  multi = np.full((batch, len(MULTI_FIELD_DIMS), MAX_LEN), -1, np.int32)
  lengths = rng.integers(0, MAX_LEN + 1, multi.shape[:2])
  for m, dim in enumerate(MULTI_FIELD_DIMS):
    for b in range(batch):
      multi[b, m, : lengths[b, m]] = rng.integers(0, dim, lengths[b, m])
  return {
    'ids': random_ids(batch, FIELD_DIMS, seed=seed),
    'multi_ids': multi,
    'dense': rng.normal(size=(batch, NUM_DENSE)).astype(np.float32),
  }


def _variables(model, inputs, seed):
  """Random variables of `model`'s shapes (no zeros left, positive variances).

  Only the shapes are traced: a compiled `init` per model would cost more
  than the rest of the test.
  """
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  shapes = jax.eval_shape(
    lambda x: model.init(rngs, **x, train=False),
    {k: v[:2] for k, v in inputs.items()},
  )
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return (0.2 * rng.normal(size=x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _onnx_run(serialized, inputs):
  """Probabilities of onnxruntime; `inputs`: ids `[batch, fields]`, or a
  dict of named inputs."""
  if not isinstance(inputs, dict):
    inputs = {export.INPUT: inputs}
  session = onnxruntime.InferenceSession(serialized)
  return session.run([export.OUTPUT], inputs)[0]


def _ir_version_and_opset(serialized):
  """`(IR version, opset of the default domain)` of an ONNX model."""
  proto = onnx.load_from_string(serialized)
  domains = ('', 'ai.onnx')
  return proto.ir_version, max(
    o.version for o in proto.opset_import if o.domain in domains
  )


def _reference(model, variables):
  return jax.jit(
    lambda x: jax.nn.sigmoid(model.apply(variables, **x, train=False))
  )


def _files(directory):
  """`{relative path: SHA-256}` of every file under `directory`."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      found[os.path.relpath(os.path.join(root, name), directory)] = digest
  return found


class EveryModelTest(absltest.TestCase):
  def test_every_model_exports_to_jax_and_onnx(self):
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    inputs = _side_inputs(777, seed=3)
    expected = {}
    for seed, name in enumerate(MODEL_NAMES):
      with self.subTest(model=name):
        model = build(
          name, multi_field_dims=MULTI_FIELD_DIMS, num_dense=NUM_DENSE
        )
        specs = export.model_inputs(model, MAX_LEN)
        self.assertEqual(list(specs), list(inputs))
        variables = _variables(model, inputs, seed)
        expected[name] = np.asarray(_reference(model, variables)(inputs))
        fn = export.inference_function(model, variables, tuple(specs))
        serialized = export.export_jax(fn, specs)
        with open(os.path.join(tmp, f'{name}.jax'), 'wb') as f:
          f.write(serialized)
        if name in ONNX_UNSUPPORTED:
          try:
            export.export_onnx(fn, specs)
          except Exception:  # pylint: disable=broad-except
            continue
          self.fail(f'{name} goes to ONNX now: drop it from ONNX_UNSUPPORTED')
        # Checked in onnxruntime on sample rows, as export() does.
        feeds = export.sample_inputs(model, specs)
        serialized = export.export_onnx(fn, specs, feeds)
        ir_version, opset = _ir_version_and_opset(serialized)
        self.assertLessEqual(ir_version, MAX_IR_VERSION)
        self.assertLessEqual(opset, MAX_OPSET)
        for n in (1, len(expected[name])):
          got = _onnx_run(serialized, {k: v[:n] for k, v in inputs.items()})
          self.assertEqual(got.shape, (n,))
          self.assertEqual(got.dtype, np.float32)
          np.testing.assert_allclose(
            got, expected[name][:n], rtol=0, atol=TOLERANCE
          )
    np.savez(os.path.join(tmp, 'expected.npz'), **inputs, **expected)
    with open(os.path.join(tmp, 'jax_only.py'), 'w') as f:
      f.write(_JAX_ONLY)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    done = subprocess.run(
      [sys.executable, 'jax_only.py', json.dumps(sorted(expected))],
      cwd=tmp,
      env=env,
      capture_output=True,
      text=True,
    )
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    self.assertEqual(sorted(errors), sorted(MODEL_NAMES))
    for name, (one, many) in errors.items():
      with self.subTest(model=name):
        self.assertLessEqual(max(one, many), TOLERANCE)


class WithoutBatchNormTest(absltest.TestCase):
  def test_models_without_batchnorm_export_to_jax_and_onnx(self):
    # FinalMLP's and DCN-V2's configs: an MLP of biased Linear layers, no
    # statistics to fold in.
    inputs = _side_inputs(33, seed=4)
    names = [
      n for n in MODEL_NAMES if 'batch_norm' in build(n).__dataclass_fields__
    ]
    self.assertEqual(names, ['dcnv2', 'finalmlp'])
    for seed, name in enumerate(names):
      with self.subTest(model=name):
        model = build(
          name,
          multi_field_dims=MULTI_FIELD_DIMS,
          num_dense=NUM_DENSE,
          batch_norm=False,
        )
        specs = export.model_inputs(model, MAX_LEN)
        variables = _variables(model, inputs, seed)
        self.assertEqual(set(variables), {'params'})
        expected = np.asarray(_reference(model, variables)(inputs))
        fn = export.inference_function(model, variables, tuple(specs))
        exported = jax.export.deserialize(export.export_jax(fn, specs))
        got = np.asarray(exported.call(*inputs.values()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
        feeds = export.sample_inputs(model, specs)
        serialized = export.export_onnx(fn, specs, feeds)
        got = _onnx_run(serialized, inputs)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


class OnnxCheckTest(absltest.TestCase):
  def test_a_model_onnxruntime_refuses_or_that_differs_is_not_kept(self):
    run = trained_run()
    predictor = predict.load(run.workdir)
    model, variables = predictor.model, jax.device_get(predictor.variables)
    specs = export.model_inputs(model)
    fn = export.inference_function(model, variables, tuple(specs))
    feeds = export.sample_inputs(model, specs)
    self.assertEqual(feeds['ids'].shape, (8, len(model.field_dims)))
    self.assertTrue((feeds['ids'] < np.array(model.field_dims)).all())
    good = export.export_onnx(fn, specs, feeds)
    # The converter's plugins for other libraries load again afterwards.
    skips = [f for f in sys.meta_path if type(f).__name__ == '_SkipPlugins']
    self.assertEqual(skips, [])
    with self.assertRaisesRegex(ValueError, 'onnxruntime cannot run'):
      onnx_export.check(b'not a model', fn, feeds)
    with self.assertRaisesRegex(ValueError, 'other probabilities .* up to'):
      onnx_export.check(good, lambda ids: fn(ids) * 0.5, feeds)
    # ATOL (1e-4) is the bound: a gap of 1e-3 is refused, 1e-5 is not.
    with self.assertRaisesRegex(ValueError, r'by up to 0\.001 on 8 sample'):
      onnx_export.check(good, lambda ids: fn(ids) + 1e-3, feeds)
    onnx_export.check(good, lambda ids: fn(ids) + 1e-5, feeds)
    # A NaN is no gap within the bound.
    nan = np.where(np.arange(8) == 3, np.nan, 0).astype(np.float32)
    with self.assertRaisesRegex(ValueError, r'by up to nan on 8 sample'):
      onnx_export.check(good, lambda ids: fn(ids) + nan, feeds)
    # Rows of one value: an output of another shape broadcasts to a gap of 0.
    same = {'ids': np.repeat(feeds['ids'][:1], 8, axis=0)}
    with self.assertRaisesRegex(ValueError, 'other probabilities'):
      onnx_export.check(good, lambda ids: fn(ids)[:1], same)
    # In an export: both ways of converting are tried, then it is left out.
    out = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'x')
    refused = ValueError('onnxruntime cannot run the model: Einsum')
    with mock.patch.object(
      onnx_export, 'check', side_effect=refused
    ) as checked:
      signature = export.export(predictor, out)
    self.assertEqual(checked.call_count, 2)
    self.assertEqual(
      signature['onnx_error'],
      'ValueError: onnxruntime cannot run the model: Einsum',
    )
    self.assertEqual(
      sorted(os.listdir(out)), ['encoder', 'model.jax', 'signature.json']
    )
    # A converter's error without a message (jax2onnx's bare asserts) raised
    # IndexError out of export().
    with mock.patch.object(onnx_export, '_to_onnx', side_effect=AssertionError):
      signature = export.export(predictor, out)
    self.assertEqual(signature['onnx_error'], 'AssertionError')


class InputsTest(absltest.TestCase):
  def test_numeric_fields_without_multi_hot_and_ids_alone(self):
    inputs = _side_inputs(33, seed=4)
    del inputs['multi_ids']
    for model, given in (
      (build('fm', num_dense=NUM_DENSE), inputs),
      (build('fm'), {'ids': inputs['ids']}),
    ):
      specs = export.model_inputs(model, MAX_LEN)
      self.assertEqual(list(specs), list(given))
      variables = _variables(model, given, seed=5)
      expected = np.asarray(_reference(model, variables)(given))
      fn = export.inference_function(model, variables, tuple(specs))
      exported = jax.export.deserialize(export.export_jax(fn, specs))
      got = np.asarray(exported.call(*given.values()))
      np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
      got = _onnx_run(export.export_onnx(fn, specs), given)
      np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


class ExportRunTest(absltest.TestCase):
  def test_an_output_that_cannot_be_written_is_one_line(self):
    run = trained_run()
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    a_file = os.path.join(tmp, 'a_file')
    with open(a_file, 'w') as f:
      f.write('kept')
    out = os.path.join(a_file, 'export')  # Under a file: no directory.
    self.assertEqual(
      command_error(
        'export.py', tmp, f'--workdir={run.workdir}', f'--output={out}'
      ),
      (
        2,
        f'export.py: error: --output: cannot write {out} (Not a directory);'
        ' choose a directory you can write.',
      ),
    )
    with open(a_file) as f:
      self.assertEqual(f.read(), 'kept')

  def test_an_empty_path_flag_is_refused_by_name(self):
    # `--output=$OUT` with $OUT unset: `cannot write  (No such file or
    # directory)`, after the export was built.
    run = trained_run()
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    for flags, name, what in (
      (('--workdir=', '--output=out'), 'workdir', 'Workdir of a finished'),
      ((f'--workdir={run.workdir}', '--output='), 'output', 'Directory to'),
    ):
      rc, line = command_error('export.py', tmp, *flags)
      self.assertEqual(rc, 2)
      self.assertStartsWith(
        line,
        f'export.py: error: --{name} is empty: give the path it takes ({what}',
      )
    self.assertEqual(os.listdir(tmp), [])

  def test_an_output_that_holds_other_files_is_refused(self):
    run = trained_run()
    before = {
      name: os.path.getmtime(os.path.join(run.workdir, name))
      for name in os.listdir(run.workdir)
    }
    self.assertIn('checkpoints', before)
    self.assertEqual(
      command_error(
        'export.py', run.workdir, f'--workdir={run.workdir}', '--output=.'
      ),
      (
        2,
        'export.py: error: --output: . holds other files'
        f' ({", ".join(sorted(before)[:4])}, ...) and no earlier export;'
        ' give a new or empty directory, or an earlier export to replace.',
      ),
    )
    after = {
      name: os.path.getmtime(os.path.join(run.workdir, name))
      for name in os.listdir(run.workdir)
    }
    self.assertEqual(after, before)
    # Another export's staged copies (a thread publishing to a new output)
    # are not other files; a file of someone else's beside them is named.
    out = self.enter_context(tempfile.TemporaryDirectory())
    with open(os.path.join(out, 'model.jax.tmp-7-8'), 'w') as f:
      f.write('staged')
    export.check_output(out)
    with open(os.path.join(out, 'notes.txt'), 'w') as f:
      f.write('mine')
    with self.assertRaisesRegex(UserError, r'holds other files \(notes.txt\)'):
      export.check_output(out)
    # A file given as the output is refused before any work.
    with self.assertRaisesRegex(
      UserError, f'^--output: {out}/notes.txt is a file, not a directory;'
    ):
      export.check_output(os.path.join(out, 'notes.txt'))
    # An export removes what a killed one left an hour ago, not the copies
    # of one that may still run.
    # An earlier export's old files that are no copies stay.
    out = self.enter_context(tempfile.TemporaryDirectory())
    old, fresh = (os.path.join(out, n) for n in ('encoder.tmp-1-2', 'x.tmp-3'))
    os.makedirs(old)
    kept = [os.path.join(out, n) for n in ('signature.json', 'notes.txt')]
    for path in (fresh, *kept):
      with open(path, 'w') as f:
        f.write('{}')
    stale = time.time() - export.STALE_S - 60
    for path in (old, kept[1]):
      os.utime(path, (stale, stale))
    with mock.patch.object(export, 'export_onnx', return_value=b'onnx'):
      export.export(predict.load(run.workdir), out)
    self.assertFalse(os.path.exists(old))
    self.assertTrue(os.path.exists(fresh))
    self.assertTrue(os.path.exists(kept[1]))

  def test_without_onnx_the_signature_says_why(self):
    run = trained_run()
    out = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'x')
    signature = export.export(predict.load(run.workdir), out, onnx=False)
    self.assertEqual(
      sorted(os.listdir(out)), ['encoder', 'model.jax', 'signature.json']
    )
    with open(os.path.join(out, 'signature.json')) as f:
      self.assertEqual(json.load(f), signature)
    self.assertIsNone(signature['files']['onnx'])
    self.assertEqual(
      signature['onnx_error'], 'not asked for (onnx=False, --noonnx)'
    )

  def test_a_new_export_replaces_an_earlier_one_whole(self):
    # A server reading the earlier export found no model.onnx while the
    # new one converted (seconds), though signature.json listed it.
    run = trained_run()
    out = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'x')
    predictor = predict.load(run.workdir)
    fake = b'onnx bytes'
    with mock.patch.object(export, 'export_onnx', return_value=fake):
      export.export(predictor, out)
    onnx_path = os.path.join(out, 'model.onnx')
    seen = []

    def converting(fn, inputs, feeds):
      del fn, inputs, feeds
      seen.append(sorted(os.listdir(out)))
      with open(onnx_path, 'rb') as f:
        seen.append(f.read())
      return b'new ' + fake

    with mock.patch.object(export, 'export_onnx', converting):
      export.export(predictor, out)
    files = ['encoder', 'model.jax', 'model.onnx', 'signature.json']
    self.assertEqual(seen, [files, fake])
    self.assertEqual(sorted(os.listdir(out)), files)
    with open(onnx_path, 'rb') as f:
      self.assertEqual(f.read(), b'new ' + fake)
    # Without ONNX now: the file goes, after the signature that says so.
    signature = export.export(predictor, out, onnx=False)
    files.remove('model.onnx')
    self.assertEqual(sorted(os.listdir(out)), files)
    self.assertIsNone(signature['files']['onnx'])

  def test_a_reexport_renames_the_encoder_json_last_and_drops_old_files(self):
    # A server that reads encoder.json finds the files it names; a file of
    # an earlier encoder (one with side tables) does not stay beside it.
    run = trained_run()
    out = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'x')
    predictor = predict.load(run.workdir)
    export.export(predictor, out, onnx=False)
    encoder_dir = os.path.join(out, 'encoder')
    files = sorted(os.listdir(encoder_dir))
    self.assertEqual(files, ['encoder.json', 'vocabulary.npy'])
    with open(os.path.join(encoder_dir, 'side_item_dense.npy'), 'w') as f:
      f.write('an earlier encoder')
    renamed, replace = [], os.replace

    def renaming(source, target):
      if os.path.dirname(target) in (out, encoder_dir):
        renamed.append(os.path.relpath(target, out))
      replace(source, target)

    with mock.patch.object(os, 'replace', renaming):
      export.export(predictor, out, onnx=False)
    self.assertEqual(
      renamed,
      ['model.jax', 'encoder/vocabulary.npy', 'encoder/encoder.json']
      + ['signature.json'],
    )
    self.assertEqual(sorted(os.listdir(encoder_dir)), files)

  def test_no_platform_or_an_unknown_one_is_refused(self):
    # `--platforms=cpu,` or `cpu,cpu`: each platform once, as signature.json
    # lists them.
    got = export.check_platforms(['cpu', '', 'tpu', 'cpu'])
    self.assertEqual(got, ['cpu', 'tpu'])
    for platforms, named in (([''], 'none'), (['cpu', 'gpu'], 'gpu')):
      with self.assertRaisesRegex(
        UserError, f'^--platforms: {named}; choose among cpu,cuda,rocm,tpu'
      ):
        export.check_platforms(platforms)

  def test_two_threads_publishing_one_output_each_write_it_whole(self):
    # Both staged `<name>.tmp-<pid>`: the second overwrote the first's
    # copies and renamed them; the first then failed (FileNotFoundError).
    out = self.enter_context(tempfile.TemporaryDirectory())
    paused, go = threading.Event(), threading.Event()

    class Encoder:  # Writes encoder/ as `tag`; the first waits after it.
      def __init__(self, tag):
        self.tag = tag

      def write(self, directory):  # As encoder.Encoder.write does.
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, 'encoder.json'), 'w') as f:
          f.write(self.tag)
        if self.tag == 'first':
          paused.set()
          go.wait(60)

    def publish(tag):
      payloads = {'model.jax': tag.encode(), 'signature.json': tag}
      export._publish(out, payloads, Encoder(tag))

    errors = []

    def first():
      try:
        publish('first')
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)

    thread = threading.Thread(target=first)
    thread.start()
    self.assertTrue(paused.wait(60))
    publish('second')
    go.set()
    thread.join(60)
    self.assertEqual(errors, [])
    self.assertEqual(
      sorted(os.listdir(out)), ['encoder', 'model.jax', 'signature.json']
    )
    for name in ('model.jax', 'signature.json', 'encoder/encoder.json'):
      with open(os.path.join(out, name)) as f:
        self.assertEqual(f.read(), 'first', name)

  def test_weights_beyond_the_formats_2_gib_are_one_line(self):
    # jax.export's flatbuffer raised BuilderSizeError with a traceback.
    run = trained_run()
    out = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'x')
    with (
      mock.patch.object(export, 'MAX_WEIGHT_BYTES', 1000),
      self.assertRaisesRegex(
        UserError,
        r'^The model has 0.00 GiB of weights; model.jax and model.onnx embed'
        r' them and hold 0.00 GiB at most \(2 GiB with the program\). Serve'
        r' it with predict.py',
      ),
    ):
      export.export(predict.load(run.workdir), out)
    self.assertFalse(os.path.exists(out))
    # The bound is the first size refused.
    variables = {'w': np.zeros(250, np.float32)}  # 1000 bytes.
    with mock.patch.object(export, 'MAX_WEIGHT_BYTES', 1001):
      export.check_size(variables)
    with (
      mock.patch.object(export, 'MAX_WEIGHT_BYTES', 1000),
      self.assertRaisesRegex(UserError, 'GiB of weights'),
    ):
      export.check_size(variables)

  def test_a_reexport_the_disk_refuses_leaves_the_earlier_one(self):
    # model.jax was replaced before model.onnx found the disk full: the
    # new model then sat beside the earlier signature and encoder.
    run = trained_run()
    out = os.path.join(self.enter_context(tempfile.TemporaryDirectory()), 'x')
    predictor = predict.load(run.workdir)
    with mock.patch.object(export, 'export_onnx', return_value=b'onnx'):
      export.export(predictor, out)
    before = _files(out), sorted(os.listdir(out))
    real_open = open
    # The disk fills at model.onnx, or at the staged encoder's last file.
    for failing, count in (('model.onnx', 2), ('encoder.json', None)):
      written = []

      def full_open(path, mode='r', *args, failing=failing, seen=written, **kw):
        if 'w' in mode and str(path).startswith(out):
          seen.append(os.path.basename(path))
          if seen[-1].startswith(failing):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(path, mode, *args, **kw)

      with (
        mock.patch.object(export, 'export_onnx', return_value=b'new onnx'),
        mock.patch.object(export, 'export_jax', return_value=b'new jax'),
        mock.patch('builtins.open', full_open),
        self.assertRaises(OSError),
      ):
        export.export(predictor, out)
      if count:  # model.jax was written first.
        self.assertLen(written, count)
      # No copy left behind either, nor the staged encoder directory.
      self.assertEqual((_files(out), sorted(os.listdir(out))), before)
    # An encoder/ that is a file (a damaged export): refused before model.jax
    # and model.onnx were replaced beside the earlier signature.
    shutil.rmtree(os.path.join(out, 'encoder'))
    with open(os.path.join(out, 'encoder'), 'w') as f:
      f.write('not a directory')
    before = _files(out), sorted(os.listdir(out))
    with (
      mock.patch.object(export, 'export_onnx', return_value=b'new onnx'),
      mock.patch.object(export, 'export_jax', return_value=b'new jax'),
      self.assertRaises(FileExistsError),
    ):
      export.export(predictor, out)
    self.assertEqual((_files(out), sorted(os.listdir(out))), before)

  def test_command_line_exports_a_run(self):
    run = trained_run()
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    out = os.path.join(tmp, 'export')
    subprocess.run(
      [
        sys.executable,
        os.path.join(ROOT, 'export.py'),
        f'--workdir={run.workdir}',
        '--output=~/export',  # Unexpanded, as a shell leaves it after `=`.
        '--platforms=cpu,cuda',
      ],
      check=True,
      cwd=tmp,  # Unexpanded, `~/export` would be made here.
      capture_output=True,
      env=dict(os.environ, HOME=tmp),
    )
    self.assertEqual(
      sorted(os.listdir(out)),
      ['encoder', 'model.jax', 'model.onnx', 'signature.json'],
    )
    with open(os.path.join(out, 'signature.json')) as f:
      signature = json.load(f)
    dataset = run.dataset
    self.assertEqual(signature['field_names'], list(dataset.field_names))
    self.assertEqual(signature['field_dims'], list(dataset.field_dims))
    oov_ids = list(encoder.load(run.workdir).oov_ids)
    self.assertEqual(signature['oov_ids'], oov_ids)
    self.assertNotEqual(oov_ids, signature['field_dims'])
    self.assertEqual(signature['platforms'], ['cpu', 'cuda'])
    self.assertIsNone(signature['onnx_error'])
    self.assertEqual(
      signature['inputs'],
      [{'name': 'ids', 'dtype': 'int32', 'shape': ['batch', 39]}],
    )
    # A serving process encodes raw rows with the exported encoder alone.
    source = os.path.join(tmp, 'test.txt')
    with open(source, 'w') as f:
      f.writelines(line + '\n' for line in run.lines['test'])
    ids = encoder.load(out).encode(source).ids
    np.testing.assert_array_equal(ids, dataset.test.ids)
    expected = np.asarray(run.probabilities(ids))
    with open(os.path.join(out, 'model.jax'), 'rb') as f:
      model = jax.export.deserialize(bytearray(f.read()))
    self.assertEqual(model.platforms, ('cpu', 'cuda'))
    got = np.asarray(model.call(jnp.asarray(ids)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    with open(os.path.join(out, 'model.onnx'), 'rb') as f:
      got = _onnx_run(f.read(), ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    with self.assertRaisesRegex(  # Not "no best checkpoint ... train again".
      UserError,
      f'^{re.escape(out)} is an export \\(export.py\\), not a training run:'
      ' serve its model.jax or model.onnx, or give the workdir of the run',
    ):
      predict.load(out)
    # An earlier export may be replaced (its signature.json), with a file
    # of the user's beside it; without signature.json it is refused.
    export.check_output(out)
    with open(os.path.join(out, 'extra.txt'), 'w') as f:
      f.write('kept')
    export.check_output(out)
    os.remove(os.path.join(out, 'signature.json'))
    with self.assertRaisesRegex(UserError, 'holds other files'):
      export.check_output(out)


if __name__ == '__main__':
  absltest.main()
