"""Batched, jitted, sharded generation with a KV cache, and the `python -m lvm.generate` CLI.

A trained run becomes a generator with `lvm.inference.from_run`, which also gives the
text-level `TextGenerator` (templates, stop strings) that the CLI and `lvm.evaluate` use.

Prompts are left-padded to a bucketed length (positions = cumsum(mask) - 1), the image
and prompt are prefilled in one pass into a cache of length prompt_bucket + new_bucket,
and a `lax.while_loop` decodes one token per step until every row hit a stop token or
`max_new_tokens` tokens exist. Prompt and output lengths are bucketed (`length_bucket`:
powers of two and the half steps between them), batch size and image count to powers of
two, and the sampling knobs and `max_new_tokens` are traced values, so new inputs rarely
recompile. Anyres models (LLaVA-NeXT / OneVision) take
each image as its tiles and size (`lvm.anyres_inputs`): the tile count is bucketed and the
tower runs on the real tiles only, or every image is padded to the maximum (`bucket_tiles`).
`Generator.score` gives teacher-forced log-likelihoods of chosen tokens (right-padded,
bucketed the same way): lmms-eval's `loglikelihood` (`lvm/lmms_eval_model.py`).

Letters: B batch, N image slots, H/W image size, Lp prompt bucket, Ln new-token bucket,
S = Lp + Ln cache length, V vocabulary.

CLI:
  python -m lvm.generate --workdir=DIR --image=cat.jpg --prompt="What is this?"
  python -m lvm.generate --workdir=DIR --image=cat.jpg --chat
"""

import dataclasses
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lvm import anyres_inputs
from lvm import config as lvm_config
from lvm import losses
from lvm import models
from lvm import sharding as lvm_sharding
from lvm.models import anyres_model
from lvm.sampling import SamplingParams, sample


def bucket(n: int, buckets: Sequence[int] | None = None, minimum: int = 16) -> int:
  """The smallest bucket >= n: from `buckets` if given, else a power of two >= minimum."""
  if buckets:
    for b in sorted(buckets):
      if b >= n:
        return int(b)
    raise ValueError(f'Length {n} exceeds the largest bucket {max(buckets)}; add a larger '
                     'bucket or shorten the input')
  size = minimum
  while size < n:
    size *= 2
  return size


def length_bucket(n: int, buckets: Sequence[int] | None = None) -> int:
  """The padded length of n tokens: from `buckets` if given, else the smallest of 16, 24,
  32, 48, 64, 96, ... (powers of two and 1.5 times them) >= n.

  Half steps between powers of two bound the padding at 50% instead of 100% for two
  compiled shapes an octave: LLaVA-1.5's evaluation prompts (576 visual + ~50 text tokens)
  pad to 768 rather than 1024, which the prefill computes and every decode step reads back
  from the KV cache.
  """
  if buckets:
    return bucket(n, buckets)
  size = 16
  while size < n:
    size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
  return size


@dataclasses.dataclass
class Output:
  """One row's result.

  Attributes:
    tokens: generated ids, without the stop token.
    finish: 'stop' (a stop token or stop string) or 'length' (max_new_tokens reached).
    text: the decoded answer when generated through a tokenizer, else None.
  """
  tokens: list[int]
  finish: str
  text: str | None = None


class Generator:
  """Holds a model, its (sharded) parameters and the compiled generation loops.

  Example:
    gen = Generator(config, params)
    outs = gen.generate([ids_a, ids_b], images=[img_a, None], max_new_tokens=32,
                        stop_ids=[tokenizer.eos_id])
  """

  def __init__(self, config, params, mesh=None, prompt_buckets: Sequence[int] | None = None,
               new_token_buckets: Sequence[int] | None = None, bucket_tiles: bool = True):
    """Args:
      config: the full run config (uses .model and .mesh), or a bare model config (then
        the mesh is data-parallel over all devices).
      params: the model's parameter tree (boxed or plain; any placement).
      mesh: a jax Mesh; default: built from config.mesh over all devices.
      prompt_buckets / new_token_buckets: allowed padded lengths (default `length_bucket`'s).
      bucket_tiles: anyres models only: the tile count bucketed to powers of two and the
        tower run on the real tiles only (True), or every image padded to the config's
        maximum tiles, all through the tower (False); see `lvm.anyres_inputs`.
    """
    if 'model' not in config:  # a bare model config (e.g. from lvm.hf.load)
      full = lvm_config.get_config()
      full.model = config
      config = full
    self.config = config
    self.model = models.build(config)
    self.mesh = mesh if mesh is not None else lvm_sharding.make_mesh(config.mesh)
    self.rules = lvm_sharding.rules(config)
    self.prompt_buckets = prompt_buckets
    self.new_token_buckets = new_token_buckets
    self.pad_id = int(config.model.pad_token_id)
    self.image_token_id = int(config.model.image_token_id)
    self.anyres = anyres_model.layout(config.model)  # None: a fixed-size model
    self.bucket_tiles = bucket_tiles
    # Fixed-size models: visual tokens per image; anyres: per image size (`image_tokens`).
    self.tokens_per_image = None if self.anyres else models.num_image_tokens(config)
    self.image_size = int(config.model.vision.image_size)
    self.batch_multiple = int(np.prod([self.mesh.shape[a] for a in lvm_sharding.BATCH_AXES]))
    self.param_shardings = self._param_shardings()
    params = nn.unbox(params)
    self.params = jax.device_put(params, self.param_shardings)
    self.num_compiles = 0  # how many (shape) variants were traced; tests check bucketing
    self._jitted = jax.jit(self._generate, static_argnames=('new_bucket', 'tile_budget'))
    # The two halves of `_generate` as programs of their own, which lvm.bench times
    # (time to first token; one decode step). Call them under `jax.set_mesh(self.mesh)`.
    self.prefill = jax.jit(self._prefill, static_argnames=('new_bucket', 'tile_budget'))
    self.decode = jax.jit(self._decode, donate_argnums=(2,))
    self._jitted_score = jax.jit(self._score)

  def _param_shardings(self):
    images, ids, kw = models.example_inputs(self.config)
    abstract = jax.eval_shape(lambda k: self.model.init(k, images, ids, **kw), jax.random.key(0))
    return lvm_sharding.logical_shardings(abstract['params'], self.mesh, self.rules)

  def _batch_sharding(self, ndim):
    return NamedSharding(self.mesh, PartitionSpec(lvm_sharding.BATCH_AXES, *[None] * (ndim - 1)))

  def _suppress(self, logits):
    """Never emits the image placeholder: fed back, it would embed as token 0 (not itself)."""
    return logits.at[:, self.image_token_id].set(-jnp.inf)

  def image_tokens(self, image_size) -> int:
    """Image-token ids one image needs in a prompt (anyres: for its (height, width))."""
    if self.anyres is None:
      return self.tokens_per_image
    return self.anyres.num_image_tokens(image_size)

  def _prefill(self, params, images, input_ids, prompt_mask, rng, temperature, top_k, top_p,
               *, new_bucket, image_sizes=None, tile_budget=None):
    """Fills the KV cache with the images and prompts and samples each row's first token.

    Args: as `_generate`'s.

    Returns:
      (token int32[B], cache, full_mask bool[B, S], next_pos int32[B]: the position of the
      first new token, rng).
    """
    model, variables = self.model, {'params': params}
    b, lp = input_ids.shape
    cache = model.decoder.init_cache(b, lp + new_bucket)
    if self.config.model.decoder.kv_heads % self.mesh.shape['tensor'] == 0:
      # [L, B, S, K, Dh]: rows over the batch axes, kv heads over 'tensor' (as k/v_proj).
      spec = PartitionSpec(None, lvm_sharding.BATCH_AXES, None, 'tensor', None)
      cache = jax.lax.with_sharding_constraint(cache, NamedSharding(self.mesh, spec))
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((b, new_bucket), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = model.apply(variables, images, input_ids, full_mask, positions, cache,
                                jnp.zeros((), jnp.int32), image_sizes=image_sizes,
                                tile_budget=tile_budget, tile_groups=self.batch_multiple,
                                method='forward')
    next_pos = positions[:, -1] + 1
    rng, key = jax.random.split(rng)
    token = sample(self._suppress(logits[:, -1]), key, temperature, top_k, top_p)
    return token, cache, full_mask, next_pos, rng

  def _decode(self, params, token, cache, index, full_mask, positions, rng, temperature, top_k,
              top_p):
    """One token per row from the KV cache.

    Args:
      token: int32[B], the last token of each row.
      cache: the KV cache; `index`: int32[], the cache slot `token` is written to.
      full_mask: bool[B, S]; positions: int32[B], the RoPE position of `token`.
      rng, temperature, top_k, top_p: as `_generate`'s.

    Returns:
      (new token int32[B], cache, rng).
    """
    logits, cache = self.model.apply({'params': params}, token[:, None], cache, index,
                                     full_mask, positions[:, None], method='decode')
    rng, key = jax.random.split(rng)
    new = sample(self._suppress(logits[:, 0]), key, temperature, top_k, top_p)
    return new, cache, rng

  def _generate(self, params, images, input_ids, prompt_mask, stop_ids, rng, temperature,
                top_k, top_p, max_new_tokens, *, new_bucket, image_sizes=None,
                tile_budget=None):
    """The jitted core: `_prefill` then a while_loop of `_decode` steps.

    Args:
      params: the parameter tree.
      images: float[B, N, H, W, 3] (anyres: tiles float[B, N, T, H, W, 3]) or None.
      input_ids: int32[B, Lp] left-padded prompts.
      prompt_mask: bool[B, Lp], True on real prompt tokens.
      stop_ids: int32[K] ids that end a row (padded with -1).
      rng: PRNG key.
      temperature, top_k, top_p: sampling scalars.
      max_new_tokens: int32 scalar <= new_bucket.
      new_bucket: static Ln, the token buffer and cache tail size.
      image_sizes: anyres only: int32[B, N, 2] original (height, width) of each image.
      tile_budget: anyres only, static: tower slots for the real tiles (None: all tiles).

    Returns:
      (tokens int32[B, Ln] (pad after a row stops), num_tokens int32[B] up to and
      including the stop token, stopped bool[B]).
    """
    self.num_compiles += 1  # runs only while tracing
    b, lp = input_ids.shape
    token, cache, full_mask, next_pos, rng = self._prefill(
        params, images, input_ids, prompt_mask, rng, temperature, top_k, top_p,
        new_bucket=new_bucket, image_sizes=image_sizes, tile_budget=tile_budget)
    tokens = jnp.full((b, new_bucket), self.pad_id, jnp.int32).at[:, 0].set(token)
    stopped = jnp.isin(token, stop_ids)
    num_tokens = jnp.ones((b,), jnp.int32)

    def cond(state):
      i, _, _, _, stopped, _, _ = state
      return (i < max_new_tokens) & ~jnp.all(stopped)

    def body(state):
      i, token, cache, tokens, stopped, num_tokens, rng = state
      new, cache, rng = self._decode(params, token, cache, lp + i - 1, full_mask,
                                     next_pos + i - 1, rng, temperature, top_k, top_p)
      new = jnp.where(stopped, self.pad_id, new)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], i, axis=1)
      num_tokens = num_tokens + (~stopped).astype(jnp.int32)
      stopped = stopped | jnp.isin(new, stop_ids)
      return i + 1, new, cache, tokens, stopped, num_tokens, rng

    state = (jnp.ones((), jnp.int32), token, cache, tokens, stopped, num_tokens, rng)
    _, _, _, tokens, stopped, num_tokens, _ = jax.lax.while_loop(cond, body, state)
    return tokens, num_tokens, stopped

  def generate(self, prompts: Sequence[Sequence[int]], images: Sequence[Any] | None = None,
               max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
               stop_ids: Sequence[int] = (), min_batch: int = 1) -> list[Output]:
    """Generates a continuation for each prompt, in one batch.

    Args:
      prompts: token ids per row (with `image_tokens(size)` image-token ids per image).
      images: per row, None or float[n, H, W, 3] / float[H, W, 3] normalized images (n may
        differ between rows); None for an all-text batch. An anyres model takes per row
        None, an `lvm.anyres_inputs.AnyresImage` or a list of them.
      max_new_tokens: the most tokens to generate per row.
      sampling: temperature / top-k / top-p / seed.
      stop_ids: token ids that end a row (e.g. the eos id); not included in the output.
      min_batch: pad the batch to at least this many rows (a harness passes its batch
        size so that a short last batch reuses the compiled loop).

    Returns:
      One Output per prompt.
    """
    if not prompts:
      return []
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    rows = len(prompts)
    if any(len(p) == 0 for p in prompts):
      raise ValueError('Every prompt needs at least one token (e.g. BOS)')
    b = self.padded_batch(rows, min_batch)
    lp = length_bucket(max(len(p) for p in prompts), self.prompt_buckets)
    ln = length_bucket(max_new_tokens, self.new_token_buckets)
    ids = np.full((b, lp), self.pad_id, np.int32)
    mask = np.zeros((b, lp), bool)
    for r, p in enumerate(prompts):
      ids[r, lp - len(p):] = p
      mask[r, lp - len(p):] = True
    mask[rows:, -1] = True  # padding rows attend to one token so their softmax is defined
    if self.anyres is None:
      image_array, image_kw = self._image_batch(images, prompts, b), {}
    else:
      image_array, image_kw = self._tile_batch(images, ids, rows, b)
    stop = np.full((max(8, len(stop_ids)),), -1, np.int32)
    stop[:len(stop_ids)] = list(stop_ids)
    # From host arrays every process holds (images: its own rows filled), each process puts
    # only the shards its devices hold, so this also runs on a multi-process mesh.
    put = lambda x: _global_array(x, self._batch_sharding(x.ndim))
    rep = lambda x: _global_array(np.asarray(x), lvm_sharding.replicated(self.mesh))
    key = jax.random.wrap_key_data(rep(jax.random.key_data(jax.random.key(sampling.seed))))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      tokens, num_tokens, stopped = self._jitted(
          self.params, None if image_array is None else put(image_array), put(ids), put(mask),
          rep(stop), key, rep(np.float32(sampling.temperature)),
          rep(np.int32(sampling.top_k)), rep(np.float32(sampling.top_p)),
          rep(np.int32(max_new_tokens)), new_bucket=ln,
          **{k: put(v) if isinstance(v, np.ndarray) else v for k, v in image_kw.items()})
    tokens, num_tokens, stopped = map(_to_host, (tokens, num_tokens, stopped))
    outputs = []
    for r in range(rows):
      n = int(num_tokens[r])
      if stopped[r]:
        outputs.append(Output(tokens[r, :n - 1].tolist(), 'stop'))
      else:
        outputs.append(Output(tokens[r, :n].tolist(), 'length'))
    return outputs

  def padded_batch(self, rows: int, min_batch: int = 1) -> int:
    """The batch size `generate` pads `rows` prompts to (a multiple of the batch shards)."""
    b = bucket(max(rows, min_batch), minimum=1)
    return -(-b // self.batch_multiple) * self.batch_multiple

  def local_rows(self, rows: int, min_batch: int = 1) -> range:
    """The rows of a `rows`-prompt batch whose images this process's devices hold.

    With several processes each one passes images for these rows only (None for the
    others): a harness decodes only its share of every batch.
    """
    b = self.padded_batch(rows, min_batch)
    spans = [index[0].indices(b) for index in
             self._batch_sharding(2).addressable_devices_indices_map((b, 1)).values()]
    return range(min(s[0] for s in spans), min(max(s[1] for s in spans), rows))

  def _tile_batch(self, images, ids, rows, b):
    """Anyres: (tiles float32[B, N, T', S, S, 3], {image_sizes, tile_budget}), or (None, {}).

    Checks each row's image-token runs against its images' sizes before compiling.
    """
    batch = anyres_inputs.tile_batch(images, rows, b, self.anyres,
                                     anyres_model.num_tiles(self.config.model),
                                     self.bucket_tiles, self.batch_multiple)
    sizes = np.zeros((b, 1, 2), np.int32) if batch is None else batch[1]
    anyres_model.check_image_tokens(ids, sizes, self.image_token_id, self.anyres)
    if batch is None:
      return None, {}
    tiles, sizes, budget = batch
    return tiles, {'image_sizes': sizes, 'tile_budget': budget}

  def _image_batch(self, images, prompts, b):
    """Stacks per-row images into float32[B, N, H, W, 3] (zero padding), or None.

    Rows outside `local_rows` are not checked and stay zero: another process feeds them.
    """
    counts = [sum(1 for t in p if t == self.image_token_id) for p in prompts]
    local = self.local_rows(len(prompts), b)
    per_row = []
    for r in range(len(prompts)):
      if r not in local:
        per_row.append(np.zeros((counts[r] // self.tokens_per_image, self.image_size,
                                 self.image_size, 3), np.float32))
        continue
      img = None if images is None else images[r]
      img = np.zeros((0, self.image_size, self.image_size, 3), np.float32) if img is None \
          else np.asarray(img, np.float32)
      if img.ndim == 3:
        img = img[None]
      if img.shape[1:] != (self.image_size, self.image_size, 3):
        raise ValueError(f'Row {r}: images must be [n, {self.image_size}, {self.image_size}, 3]'
                         f' after preprocessing, got {img.shape}')
      if counts[r] != img.shape[0] * self.tokens_per_image:
        raise ValueError(
            f'Row {r}: the prompt has {counts[r]} image tokens but {img.shape[0]} image(s) '
            f'x {self.tokens_per_image} tokens per image were given')
      per_row.append(img)
    most = max(x.shape[0] for x in per_row)
    if most == 0:
      return None
    n = bucket(most, minimum=1)
    out = np.zeros((b, n, self.image_size, self.image_size, 3), np.float32)
    for r, img in enumerate(per_row):
      out[r, :img.shape[0]] = img
    return out

  def _score(self, params, images, input_ids, loss_mask):
    """The jitted core of `score`: per-row sums over the targets of a right-padded batch.

    Returns:
      (nll float32[B]: summed over each row's targets, count int32[B], greedy bool[B]: the
      argmax is the target at every one of the row's targets).
    """
    self.num_compiles += 1  # runs only while tracing
    batch = {'images': images, 'input_ids': input_ids, 'loss_mask': loss_mask}
    nll, _, correct, mask = losses.token_losses(
        losses.apply_model(self.model, params, batch), batch)
    return (jnp.sum(jnp.where(mask, nll, 0.0), axis=1), jnp.sum(mask, axis=1, dtype=jnp.int32),
            jnp.all(correct | ~mask, axis=1))

  def score(self, sequences: Sequence[Sequence[int]], targets: Sequence[Sequence[bool]],
            images: Sequence[Any] | None = None, min_batch: int = 1):
    """Teacher-forced log-likelihood of chosen tokens of each sequence, in one batch.

    Rows are right-padded to a bucketed length (under the causal mask padding after a
    token never changes its logits) and the batch to a bucketed size, as `generate` does.

    Args:
      sequences: token ids per row (with `tokens_per_image` image-token ids per image).
      targets: per row, one bool per token: True where that token is scored (predicted
        from the tokens before it), as a training batch's `loss_mask`.
      images: as `generate`'s.
      min_batch: as `generate`'s.

    Returns:
      (nll float64[rows]: minus the summed log-probability of each row's targets,
      count int[rows]: its targets, greedy bool[rows]: whether greedy decoding from each
      target's prefix gives every target).
    """
    rows = len(sequences)
    if rows == 0:
      return np.zeros((0,)), np.zeros((0,), int), np.zeros((0,), bool)
    for r, (seq, tgt) in enumerate(zip(sequences, targets, strict=True)):
      if len(seq) != len(tgt):
        raise ValueError(f'Row {r}: {len(seq)} tokens but {len(tgt)} target flags')
      if len(tgt) and tgt[0]:
        raise ValueError(f'Row {r}: the first token has no prefix to be predicted from')
    b = bucket(max(rows, min_batch), minimum=1)
    b = -(-b // self.batch_multiple) * self.batch_multiple
    length = length_bucket(max(len(s) for s in sequences), self.prompt_buckets)
    ids = np.full((b, length), self.pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    for r, (seq, tgt) in enumerate(zip(sequences, targets)):
      ids[r, :len(seq)] = seq
      mask[r, :len(tgt)] = tgt
    image_array = self._image_batch(images, sequences, b)
    put = lambda x: jax.device_put(x, self._batch_sharding(x.ndim))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      out = self._jitted_score(self.params, None if image_array is None else put(image_array),
                               put(ids), put(mask))
    nll, count, greedy = map(np.asarray, jax.device_get(out))
    return nll[:rows].astype(np.float64), count[:rows], greedy[:rows]


def _global_array(x: np.ndarray, sharding) -> jax.Array:
  """`x` (the same global host array on every process) as a jax.Array on `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole of a batch-sharded array on every process (gathered across processes)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------------
# Text level: templates, tokenizer, stop strings.


# ----------------------------------------------------------------------------------------
# CLI.


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'A training run directory (latest checkpoint).')
  flags.DEFINE_string('checkpoint', None, 'A checkpoint step directory (or workdir).')
  flags.DEFINE_multi_string('image', [], 'Image file(s); each becomes one <image>.')
  flags.DEFINE_string('prompt', None, 'The question; with --chat, the first message.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Most tokens per answer.')
  flags.DEFINE_float('temperature', 0.0, '0: greedy.')
  flags.DEFINE_integer('top_k', 0, '0: off.')
  flags.DEFINE_float('top_p', 1.0, '1: off.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_bool('chat', False, 'Multi-turn conversation on the terminal (empty line or '
                    'EOF ends it).')
  return flags.FLAGS


def _read_line(prompt: str) -> str | None:
  try:
    line = input(prompt)
  except EOFError:
    print()
    return None
  if not sys.stdin.isatty():  # piped input: echo it so the transcript reads as typed
    print(line)
  return line


def main(argv):
  from lvm import checkpoint, cli, inference  # pylint: disable=g-import-not-at-top
  from lvm.data import images as images_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {argv[1:]}')
  flags = _define_flags.flags
  path = flags.checkpoint or flags.workdir
  if not path:
    cli.fail('Give --workdir=DIR or --checkpoint=PATH')
  if not flags.chat and not flags.prompt:
    cli.fail('Give --prompt="..." (or --chat)')
  try:
    # Images first (with the run's preprocessing): a bad file fails before the model loads.
    run_config = checkpoint.load_config(path, log=lambda _: None)
    images = (inference.stack_images([inference.load_image(run_config, p) for p in flags.image])
              if flags.image else None)
    _, _, text_gen = inference.from_run(path)
  except images_lib.ImageError as e:
    cli.fail(f'--image: {e}')
  except (FileNotFoundError, RuntimeError) as e:  # no checkpoint, or none restores
    cli.fail(str(e))
  sampling = SamplingParams(flags.temperature, flags.top_k, flags.top_p, flags.seed)
  image_prefix = '<image>\n' * len(flags.image)
  turns = []
  message = flags.prompt
  if flags.chat:
    print('Chat: type a message, an empty line or Ctrl-D ends.', flush=True)
  while True:
    if message is None:
      message = _read_line('USER: ')
      if not message:
        break
    elif flags.chat:
      print(f'USER: {message}')
    turns.append({'from': 'human', 'value': (image_prefix if not turns else '') + message})
    out = text_gen.answer([turns], None if images is None else [images],
                          flags.max_new_tokens, sampling)[0]
    print(f'ASSISTANT: {out.text}' if flags.chat else out.text, flush=True)
    if not flags.chat:
      break
    turns.append({'from': 'gpt', 'value': out.text})
    message = None


def run():
  from lvm import cli  # pylint: disable=g-import-not-at-top
  _define_flags.flags = _define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
