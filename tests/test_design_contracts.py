"""Contracts of DESIGN.md that no other test guards, on the code's output."""

import os
import tomllib
import warnings

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages of our scripts rather than of the library.
SCRIPTS = ('benchmarks',)


def _project_modules() -> dict[str, str]:
  """{module name: path} of the library's modules: the files at the top and
  those of its packages (configs, datasets, models)."""
  out = {}
  for entry in sorted(os.listdir(ROOT)):
    path = os.path.join(ROOT, entry)
    if entry.endswith('.py'):
      out[entry[:-3]] = path
    elif entry not in SCRIPTS and os.path.exists(f'{path}/__init__.py'):
      for name in sorted(os.listdir(path)):
        if name.endswith('.py'):
          module = entry if name == '__init__.py' else f'{entry}.{name[:-3]}'
          out[module] = os.path.join(path, name)
  return out


class DeprecationFilterTest(absltest.TestCase):
  def test_deprecation_warnings_of_every_project_module_are_errors(self):
    # DESIGN.md 5: the tests run with DeprecationWarnings as errors for our
    # own code. pyproject.toml named 10 modules; programs.py (the pmap
    # programs), checkpoints.py (orbax), predict.py, export.py and 20 more
    # only warned. A DeprecationWarning raised in each module, under the
    # filters pyproject.toml gives pytest, must raise.
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
      filters = tomllib.load(f)['tool']['pytest']['ini_options']
    modules = _project_modules()
    self.assertIn('programs', modules)
    self.assertIn('datasets.core', modules)
    self.assertIn('models.fm', modules)
    with warnings.catch_warnings():
      warnings.resetwarnings()
      for entry in filters['filterwarnings']:
        action, message, category, module = (entry.split(':') + [''] * 4)[:4]
        self.assertEqual(category, 'DeprecationWarning', entry)
        warnings.filterwarnings(action, message, DeprecationWarning, module)
      warnings.simplefilter('ignore', DeprecationWarning, append=True)
      missed = []
      for name, path in sorted(modules.items()):
        try:
          warnings.warn_explicit(
            'deprecated', DeprecationWarning, path, 1, name
          )
        except DeprecationWarning:
          continue
        missed.append(name)
    self.assertEqual(missed, [], 'add them to pyproject.toml filterwarnings')


if __name__ == '__main__':
  absltest.main()
