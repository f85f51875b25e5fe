"""Benchmarks: LLaVA-1.5's evaluation sets from local files, with their official scoring.

A benchmark is `load(data_dir, config) -> [Example]` (the prompt, image path and target of
each question, in the benchmark's official local layout) and `score(examples, predictions)
-> dict` (predictions: question_id -> raw answer text; a missing answer scores as wrong).
`headline(scores)` is the one number `python -m lvm.evaluate` prints first.

Each benchmark is a `Benchmark` registered with `lvm.registry.BENCHMARK` under the name
`--benchmark` takes; `get(name)` looks it up there.
"""

import dataclasses
from typing import Callable

from lvm import registry
from lvm.eval import gqa, mme, pope, scienceqa, shapes, vqa
from lvm.eval.base import Example


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  load: Callable  # (data_dir, config) -> list[Example]
  score: Callable  # (examples, predictions, config) -> dict
  headline: Callable  # scores -> (label, value)
  max_new_tokens: int = 16  # short answers; a longer answer would be wrong anyway


def _ignore_config(fn):
  return lambda first, second, config=None: fn(first, second)


for _benchmark in (
    Benchmark('vqav2', lambda d, c: vqa.load_vqav2(d), _ignore_config(vqa.score_vqav2),
              lambda s: ('accuracy', s['accuracy'])),
    Benchmark('textvqa', lambda d, c: vqa.load_textvqa(d), _ignore_config(vqa.score_textvqa),
              lambda s: ('accuracy', s['accuracy'])),
    Benchmark('gqa', lambda d, c: gqa.load(d), _ignore_config(gqa.score),
              lambda s: ('accuracy', s['accuracy'])),
    Benchmark('scienceqa', lambda d, c: scienceqa.load(d), _ignore_config(scienceqa.score),
              lambda s: ('accuracy', s['accuracy'])),
    Benchmark('pope', lambda d, c: pope.load(d), _ignore_config(pope.score),
              lambda s: ('f1_mean', s['f1_mean'])),
    Benchmark('mme', lambda d, c: mme.load(d), _ignore_config(mme.score),
              lambda s: ('perception', s['perception'])),
    Benchmark('shapes', shapes.load, shapes.score, lambda s: ('accuracy', s['accuracy'])),
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


__all__ = ['Benchmark', 'Example', 'get', 'names']
