"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus).

All knobs are traced values (not static), so changing the temperature or k between
calls reuses the compiled generation loop. Letters: B batch, V vocabulary.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each token.

  Attributes:
    temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / T).
    top_k: keep only the k most likely tokens (0: no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches p
      (1.0: no limit).
    seed: PRNG seed; the same seed, inputs and shapes give the same tokens.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0 (0 = off), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')


def filter_logits(logits, top_k, top_p):
  """Sets logits outside the top-k / top-p set to -inf.

  Args:
    logits: float32[B, V].
    top_k: int scalar (0: off).
    top_p: float scalar in (0, 1] (1: off).

  Returns:
    float32[B, V]; the most likely token always survives.
  """
  vocab = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
  # top-k: the k-th largest logit is the threshold (ties at the threshold are kept).
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, logits.shape[:1])[:, None],
                            axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  # top-p over what top-k left: keep a sorted token while the mass before it is < p.
  sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  # The smallest kept sorted logit is the nucleus threshold.
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample(logits, rng, temperature, top_k, top_p):
  """Picks one token per row.

  Args:
    logits: float[B, V] (cast to float32 here).
    rng: a PRNG key.
    temperature: float scalar; <= 0 picks the argmax.
    top_k: int scalar (0: off).
    top_p: float scalar (1: off).

  Returns:
    int32[B].
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled():
    scaled = logits / jnp.maximum(temperature, 1e-6)
    filtered = filter_logits(scaled, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

  # lax.cond skips the sort on the greedy path (the common evaluation case).
  return jax.lax.cond(temperature > 0, sampled, lambda: greedy)
