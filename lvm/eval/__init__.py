"""Benchmarks: LLaVA-1.5's evaluation sets from local files, with their official scoring.

A benchmark (`base.Benchmark`) is `load(data_dir, config, split, issues) -> [Example]` (the
prompt, image and target of each question, in the benchmark's official local layout) and
`score(examples, predictions) -> dict` (predictions: question_id -> raw answer text; a
missing answer scores as wrong), with an optional `submission` writer for questions whose
answers are not public (test-dev). `headline(scores)` is the one number
`python -m lvm.evaluate` prints first.

Each benchmark is registered with `lvm.registry.BENCHMARK` under the name `--benchmark`
takes (the newer ones where they are implemented); `get(name)` looks it up there.
"""

import os

from lvm import registry
from lvm.eval import gqa, mme, pope, scienceqa, shapes, vqa
from lvm.eval import llava_bench, mmbench, mmmu, seed, textvqa, vizwiz  # register themselves
from lvm.eval.base import Benchmark, Example

del llava_bench, mmbench, mmmu, seed, textvqa, vizwiz


def _ignore_config(fn):
  return lambda first, second, config=None: fn(first, second)


def _loader(fn):
  """(data_dir, split, issues) -> examples as the harness calls it (config unused)."""
  return lambda data_dir, config=None, split=None, issues=None: fn(data_dir, split, issues)


for _benchmark in (
    Benchmark('vqav2', _loader(vqa.load_vqav2), _ignore_config(vqa.score_vqav2),
              lambda s: ('accuracy', s['accuracy']), splits=vqa.VQAV2_SPLITS,
              submission=vqa.vqav2_submission),
    Benchmark('gqa', _loader(gqa.load), _ignore_config(gqa.score),
              lambda s: ('accuracy', s['accuracy']), splits=gqa.SPLITS,
              submission=gqa.submission),
    Benchmark('scienceqa', lambda d, c=None, split=None, issues=None: scienceqa.load(d),
              _ignore_config(scienceqa.score), lambda s: ('accuracy', s['accuracy'])),
    Benchmark('pope', lambda d, c=None, split=None, issues=None: pope.load(d),
              _ignore_config(pope.score), lambda s: ('f1_mean', s['f1_mean'])),
    Benchmark('mme', lambda d, c=None, split=None, issues=None: mme.load(d),
              _ignore_config(mme.score), lambda s: ('perception', s['perception'])),
    Benchmark('shapes', lambda d, c, split=None, issues=None: shapes.load(d, c), shapes.score,
              lambda s: ('accuracy', s['accuracy'])),
):
  registry.BENCHMARK.register(_benchmark.name, _benchmark)


def get(name: str) -> Benchmark:
  """The registered benchmark `name`; a ValueError naming the registered ones if none."""
  try:
    return registry.BENCHMARK.get(name).obj
  except ValueError:
    raise ValueError(f'Unknown benchmark {name!r}; registered: '
                     f'{list(registry.BENCHMARK.names())}') from None


def names() -> tuple[str, ...]:
  return registry.BENCHMARK.names()


def parse_spec(spec: str) -> tuple[str, str, str]:
  """A `config.train.eval_benchmarks` entry 'NAME[:SPLIT][=DATA_DIR]' -> (name, split, dir).

  E.g. 'pope=/data/pope', 'pope:adversarial=/data/pope', 'shapes' (no files needed).
  """
  head, _, data_dir = str(spec).partition('=')
  name, _, split = head.partition(':')
  return name.strip(), split.strip(), data_dir.strip()


def spec_problem(spec: str) -> str | None:
  """Why `spec` cannot run (unknown benchmark or split, missing data folder), or None."""
  if not isinstance(spec, str):
    return f'{spec!r} is not a string NAME[:SPLIT][=DATA_DIR]'
  name, split, data_dir = parse_spec(spec)
  if name not in names():
    return f'{spec!r}: unknown benchmark {name!r}; registered: {list(names())}'
  bench = get(name)
  if split and split not in bench.splits:
    return f'{spec!r}: {name} has no split {split!r}; splits: {list(bench.splits)}'
  if name != 'shapes' and not data_dir:
    return f"{spec!r}: give the benchmark's folder as {name}=DATA_DIR"
  if data_dir and '://' not in data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    return f'{spec!r}: {data_dir!r} is not a folder'
  return None


__all__ = ['Benchmark', 'Example', 'get', 'names', 'parse_spec', 'spec_problem']
