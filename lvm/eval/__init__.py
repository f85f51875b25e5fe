"""Benchmarks: LLaVA-1.5's evaluation sets from local files, with their official scoring.

A benchmark is `load(data_dir, config) -> [Example]` (the prompt, image path and target of
each question, in the benchmark's official local layout) and `score(examples, predictions)
-> dict` (predictions: question_id -> raw answer text; a missing answer scores as wrong).
`headline(name, scores)` is the one number `python -m lvm.evaluate` prints first.
"""

import dataclasses
from typing import Callable

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


BENCHMARKS = {
    'vqav2': Benchmark('vqav2', lambda d, c: vqa.load_vqav2(d), _ignore_config(vqa.score_vqav2),
                       lambda s: ('accuracy', s['accuracy'])),
    'textvqa': Benchmark('textvqa', lambda d, c: vqa.load_textvqa(d),
                         _ignore_config(vqa.score_textvqa), lambda s: ('accuracy', s['accuracy'])),
    'gqa': Benchmark('gqa', lambda d, c: gqa.load(d), _ignore_config(gqa.score),
                     lambda s: ('accuracy', s['accuracy'])),
    'scienceqa': Benchmark('scienceqa', lambda d, c: scienceqa.load(d),
                           _ignore_config(scienceqa.score), lambda s: ('accuracy', s['accuracy'])),
    'pope': Benchmark('pope', lambda d, c: pope.load(d), _ignore_config(pope.score),
                      lambda s: ('f1_mean', s['f1_mean'])),
    'mme': Benchmark('mme', lambda d, c: mme.load(d), _ignore_config(mme.score),
                     lambda s: ('perception', s['perception'])),
    'shapes': Benchmark('shapes', shapes.load, shapes.score,
                        lambda s: ('accuracy', s['accuracy'])),
}


def get(name: str) -> Benchmark:
  if name not in BENCHMARKS:
    raise ValueError(f'Unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}')
  return BENCHMARKS[name]


__all__ = ['BENCHMARKS', 'Benchmark', 'Example', 'get']
