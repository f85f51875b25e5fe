"""Runs a Python module or snippet with unpickling forbidden in the whole process.

  python tests/reliability/no_pickle.py -m lvm.main --config=... --workdir=...
  python tests/reliability/no_pickle.py -c "from lvm import hf; hf.load('DIR')"

Any unpickling raises `UnpicklingForbidden`: `pickle.load`/`loads` and `Unpickler` are
replaced, and an audit hook refuses `pickle.find_class`, the event every unpickler
(the C one, torch.load's, numpy's `allow_pickle`) raises to import a class.
"""

import pickle
import runpy
import sys


class UnpicklingForbidden(RuntimeError):
  pass


def _refuse(*args, **kwargs):
  del args, kwargs
  raise UnpicklingForbidden('something tried to unpickle data')


class _RefusingUnpickler(pickle.Unpickler):

  def __init__(self, *args, **kwargs):
    _refuse()


def _audit(event, args):
  if event == 'pickle.find_class':
    raise UnpicklingForbidden(f'unpickling tried to load class {args}')


def install():
  sys.addaudithook(_audit)
  pickle.load = pickle.loads = _refuse
  pickle.Unpickler = _RefusingUnpickler


if __name__ == '__main__':
  install()
  mode, target, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
  if mode == '-m':
    sys.argv = [target] + rest
    runpy.run_module(target, run_name='__main__', alter_sys=True)
  elif mode == '-c':
    sys.argv = ['-c'] + rest
    exec(compile(target, '<no_pickle>', 'exec'), {'__name__': '__main__'})  # pylint: disable=exec-used
  else:
    raise SystemExit('usage: no_pickle.py -m MODULE ARGS... | -c CODE')
