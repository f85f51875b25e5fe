"""Token losses and evaluation sums (pure functions of logits and a batch).

Letters: B batch, L sequence length, P scored positions per row, V vocabulary.
"""

import jax
import jax.numpy as jnp


def scored_positions(loss_mask, count: int):
  """The first `count` positions of each row whose next token is a supervised target.

  Args:
    loss_mask: bool[B, L] (True where the token at t is a supervised target).
    count: P, a static bound on the supervised targets of a row.

  Returns:
    (positions int32[B, P], valid bool[B, P], unscored int32[]: supervised targets past
    the first P of their row, which a correct bound leaves at 0).
  """
  supervised = loss_mask[:, 1:].astype(bool)  # position t predicts token t + 1
  # A stable sort puts each row's supervised positions first, in order.
  positions = jnp.argsort(jnp.logical_not(supervised).astype(jnp.int8), axis=1,
                          stable=True)[:, :count].astype(jnp.int32)
  valid = jnp.take_along_axis(supervised, positions, axis=1)
  unscored = (jnp.sum(supervised, dtype=jnp.int32) - jnp.sum(valid, dtype=jnp.int32))
  return positions, valid, unscored


def first_argmax(logits):
  """jnp.argmax(logits, axis=-1) (the first index of the maximum) as a max and a min.

  Two plain reductions instead of XLA's variadic (value, index) one, which the CPU runs
  unvectorized: 2.5 against 6.5 ms on the cpu_small logits (docs/performance.md). The
  float32 index is exact below 2**24 entries; larger vocabularies take jnp.argmax.
  """
  if logits.shape[-1] >= 2 ** 24:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.float32, logits.shape, logits.ndim - 1)
  first = jnp.min(jnp.where(logits == top, index, float(logits.shape[-1])), axis=-1)
  return first.astype(jnp.int32)


def token_losses(logits, batch, scored=None):
  """Next-token cross-entropy terms in float32.

  Args:
    logits: float[B, L, V]; position t predicts token t+1. With `scored`: float[B, P, V],
      the logits at the scored positions only.
    batch: dict with `input_ids` int[B, L] and `loss_mask` bool[B, L] (True where the
      token at t is a supervised target).
    scored: optional (positions int[B, P], valid bool[B, P]) from `scored_positions`.

  Returns:
    (nll, log_z, correct, mask), float[B, L-1] / bool[B, L-1] each ([B, P] with `scored`).
  """
  logits = logits.astype(jnp.float32)
  ids = batch['input_ids']
  if scored is None:
    # Every position is scored against the next token (the last against a dummy 0) and
    # the [B, L] results are sliced, rather than slicing the [B, L, V] logits: their
    # gradient then needs no pad (a full extra pass over [B, L, V] on CPU).
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    mask = batch['loss_mask'][:, 1:].astype(bool)
  else:
    positions, mask = scored
    targets = jnp.take_along_axis(ids, positions + 1, axis=1)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = first_argmax(logits) == targets
  terms = (log_z - target_logit, log_z, correct)
  if scored is None:
    terms = tuple(x[:, :-1] for x in terms)
  return (*terms, mask)


def apply_model(model, params, batch, logit_positions=None, rngs=None):
  """Logits of a right-padded batch (what lvm.data makes: tokens first, padding after).

  No attention mask is passed: under the causal mask a real token never sees the padding
  after it, so its logits are the same with or without `attention_mask`, and without one
  fused attention (cuDNN flash) takes its causal path instead of reading a [B, 1, L, L] mask
  and computing the masked half (measured on an H100: docs/performance.md). A packed batch
  passes its `segment_ids` and `positions`, and attention stays within each sample.
  """
  images = batch.get('images')
  if images is not None and images.shape[1] == 0:
    images = None
  # Packed batches (lvm.data.packing) bring their segments and per-sample positions; anyres
  # batches each image's original (height, width); batches from a feature cache
  # (lvm.data.feature_cache) the tower's output in place of images.
  extra = {k: batch[k] for k in ('segment_ids', 'positions', 'image_sizes', 'image_features')
           if k in batch}
  if rngs is not None:  # LoRA dropout
    extra['rngs'] = rngs
  return model.apply({'params': params}, images, batch['input_ids'],
                     logit_positions=logit_positions, **extra)


def loss_fn(params, batch, *, model, num_tokens, z_loss: float = 0.0, scored_tokens: int = 0,
            rngs=None):
  """Summed supervised loss divided by the global supervised-token count.

  Args:
    params: the full model parameters.
    batch: a (micro)batch: images float[b, N, H, W, 3], input_ids int[b, L],
      loss_mask bool[b, L], attention_mask bool[b, L].
    model: the LLaVA module.
    num_tokens: the supervised-token count of the whole global batch (all
      microbatches), so that accumulation and sharding give the same normalization.
    z_loss: weight of the log(Z)^2 regularizer.
    scored_tokens: P > 0: the LM head runs only at each row's first P supervised
      positions (`scored_positions`); 0: at every position.
    rngs: flax rngs of the forward pass (LoRA dropout's 'dropout'), or None.

  Returns:
    (loss, aux) with aux = {'nll_sum', 'correct', 'unscored'}: sums over the (micro)batch.
  """
  scored, unscored = None, jnp.zeros((), jnp.int32)
  if scored_tokens:
    positions, valid, unscored = scored_positions(batch['loss_mask'], scored_tokens)
    scored = (positions, valid)
  logits = apply_model(model, params, batch, None if scored is None else scored[0], rngs)
  nll, log_z, correct, mask = token_losses(logits, batch, scored)
  nll_sum = jnp.sum(jnp.where(mask, nll, 0.0))
  total = nll_sum
  if z_loss:
    total = total + z_loss * jnp.sum(jnp.where(mask, log_z ** 2, 0.0))
  aux = {'nll_sum': nll_sum, 'correct': jnp.sum(correct & mask).astype(jnp.float32),
         'unscored': unscored.astype(jnp.float32)}
  return total / num_tokens, aux



def eval_sums(logits, batch):
  """Evaluation sums for one batch; answer exact match is teacher-forced.

  An answer is a maximal run of supervised positions (one assistant turn and its
  end-of-turn token). It is an exact match when the argmax at each of its positions is
  the target. With the true conversation history as prefix this is the same event as
  greedy decoding reproducing the answer exactly, because each decoding step then sees
  the right prefix. Rows without supervised tokens (padding rows) count for nothing.

  Args:
    logits: float[B, L, V].
    batch: input_ids int[B, L], loss_mask bool[B, L].

  Returns:
    dict of float32 sums: nll_sum, tokens, correct_tokens, answers, exact_answers,
    examples, exact_examples (rows whose every answer is exact).
  """
  nll, _, correct, mask = token_losses(logits, batch)
  b, t = mask.shape
  starts = mask & ~jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]
  # Id of each position's answer across the batch; unsupervised positions go to a spare id.
  answer = jnp.cumsum(starts, axis=1) - 1 + jnp.arange(b)[:, None] * t
  answer = jnp.where(mask, answer, b * t)
  wrong = (mask & ~correct).astype(jnp.int32)
  answer_wrong = jax.ops.segment_max(wrong.reshape(-1), answer.reshape(-1),
                                     num_segments=b * t + 1)[:-1]
  num_answers = jnp.sum(starts)
  has_answer = jnp.any(mask, axis=1)
  row_exact = jnp.all(correct | ~mask, axis=1) & has_answer
  f32 = lambda x: jnp.sum(x).astype(jnp.float32)
  return {'nll_sum': jnp.sum(jnp.where(mask, nll, 0.0)), 'tokens': f32(mask),
          'correct_tokens': f32(correct & mask), 'answers': f32(num_answers),
          'exact_answers': f32(num_answers) - f32(jnp.maximum(answer_wrong, 0)),
          'examples': f32(has_answer), 'exact_examples': f32(row_exact)}
