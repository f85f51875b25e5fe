"""LoRA demo: a trained shapes model learns a changed answer vocabulary through adapters alone.

  python -m lvm.main --config=configs/shapes.py:steps=300,data_dir=D --workdir=BASE
  python -m benchmarks.shapes_lora --base=BASE --workdir=OUT [--steps=150]

The changed vocabulary: the count answers say the next number word (one -> two, two ->
three, three -> four, four -> one) and the yes/no answers are swapped, in the training and
the test split alike (a token permutation at the supervised positions; every word here is
one token of the shapes tokenizer). The fine-tune is LoRA only (`config.lora`: rank 8 on the
decoder's attention and MLP; tower, projector and base weights frozen), started from BASE's
checkpoint (`config.init.kind='checkpoint'`).

Printed: teacher-forced exact match on the test split, per answer (a maximal run of
supervised tokens), for the answers whose words changed and for the others, of the base
model and of the LoRA model (evaluated with unmerged adapters, `lvm.checkpoint.load_params`).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lvm import checkpoint
from lvm import models
from lvm import sharding
from lvm import train
from lvm.data import pipeline
from lvm.data import tokenizer as tokenizer_lib

# Answer word -> the word the changed vocabulary uses instead.
NEW_WORDS = {'one': 'two', 'two': 'three', 'three': 'four', 'four': 'one', 'yes': 'no',
             'no': 'yes'}


def permutation(config) -> np.ndarray:
  """int[V]: the token each supervised token becomes (identity but for NEW_WORDS)."""
  tok = tokenizer_lib.load(config)
  perm = np.arange(config.model.decoder.vocab_size)
  for old, new in NEW_WORDS.items():
    (a,), (b,) = tok.encode(old), tok.encode(new)  # each a single token (checked here)
    perm[a] = b
  return perm


class Remapped:
  """A data iterator whose batches have their supervised tokens permuted."""

  def __init__(self, inner, perm):
    self.inner, self.perm = inner, jnp.asarray(perm, jnp.int32)

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.inner))
    ids = batch['input_ids']
    batch['input_ids'] = jnp.where(batch['loss_mask'], self.perm[ids], ids)
    return batch

  def __getattr__(self, name):  # get_state, set_state, skipped counts...
    return getattr(self.inner, name)


def make_iterator_with(perm):
  def make(config, split, mesh, **kw):
    return Remapped(pipeline.make_iterator(config, split, mesh, **kw), perm)
  return make


def exact_match(workdir, perm, split='test') -> dict:
  """Teacher-forced exact match per answer on `split` with the changed vocabulary, apart
  for the answers holding a changed token and the rest."""
  config, params = checkpoint.load_params(workdir)  # a LoRA run: base + unmerged adapters
  mesh = sharding.make_mesh(config.mesh)
  model = models.build(config)
  apply = jax.jit(lambda p, b: jnp.argmax(model.apply(
      {'params': p}, b['images'], b['input_ids']), -1))
  changed_tokens = np.flatnonzero(perm != np.arange(len(perm)))
  perm_inv = np.argsort(perm)
  hits = {'changed': [0, 0], 'unchanged': [0, 0]}
  iterator = make_iterator_with(perm)(config, split, mesh, shuffle=False, num_epochs=1)
  for batch in iterator:
    pred = np.asarray(apply(params, batch))
    ids, mask = np.asarray(batch['input_ids']), np.asarray(batch['loss_mask'])
    for row in range(ids.shape[0]):
      t = 1
      while t < ids.shape[1]:
        if not mask[row, t]:
          t += 1
          continue
        end = t
        while end < ids.shape[1] and mask[row, end]:
          end += 1
        target = ids[row, t:end]
        ok = bool(np.all(pred[row, t - 1:end - 1] == target))
        # An answer of the changed vocabulary holds a token that the permutation produced.
        kind = ('changed' if np.isin(perm_inv[target], changed_tokens).any() else 'unchanged')
        hits[kind][0] += ok
        hits[kind][1] += 1
        t = end
  return {k: {'exact_match': round(c / max(n, 1), 4), 'answers': n} for k, (c, n) in hits.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--base', required=True, help="a trained shapes run's workdir")
  parser.add_argument('--workdir', required=True, help='where the LoRA run writes')
  parser.add_argument('--steps', type=int, default=150)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--rank', type=int, default=8)
  args = parser.parse_args()

  config = checkpoint.load_config(args.base)
  config.init.kind, config.init.path = 'checkpoint', args.base
  config.lora.enable, config.lora.rank, config.lora.alpha = True, args.rank, 2.0 * args.rank
  config.lora.train_full = ''  # adapters only
  config.train.stage = 'finetune'
  config.train.num_steps = args.steps
  config.train.log_every = 25
  config.optimizer.lr = args.lr
  config.optimizer.warmup_steps = 10
  config.optimizer.module_lr = {}
  config.data.eval_split = config.data.test_split = ''  # scored below, per answer kind
  config.checkpoint.interval = args.steps

  perm = permutation(config)
  start = time.time()
  before = exact_match(args.base, perm)
  print('base model, changed vocabulary:', json.dumps(before))
  train.train_and_evaluate(config, args.workdir, make_iterator=make_iterator_with(perm))
  after = exact_match(args.workdir, perm)
  print('LoRA model, changed vocabulary:', json.dumps(after))
  print(json.dumps({'steps': args.steps, 'rank': args.rank, 'lr': args.lr, 'before': before,
                    'after': after, 'seconds': round(time.time() - start)}))


if __name__ == '__main__':
  main()
