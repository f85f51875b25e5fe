"""A trained run, loaded for inference: sharded parameters, tokenizer and template.

`from_run(path)` restores a run's newest readable checkpoint straight onto the shardings
of a generation mesh (no full copy on one device) and returns the token-level
`lvm.generate.Generator` with the text-level `TextGenerator` that renders conversations with
the run's template and cuts answers at its stop strings. `python -m lvm.generate` and
`lvm.evaluate` both start here.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from lvm import anyres_inputs
from lvm import generate
from lvm import models
from lvm import lora
from lvm import quantize
from lvm import sharding as lvm_sharding
from lvm.models import layers
from lvm.sampling import SamplingParams


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
  """Cuts `text` at the earliest stop string; returns (text, whether one was found)."""
  cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


class TextGenerator:
  """Turns conversations (LLaVA turns with `<image>`) into answers with a run's template."""

  def __init__(self, generator: generate.Generator, tokenizer, template: str,
               system_prompt: str | None = None):
    from lvm.data import templates  # pylint: disable=g-import-not-at-top
    self.generator = generator
    self.tokenizer = tokenizer
    self.template = template
    self.system_prompt = system_prompt  # None: the template's own; as trained
    self._templates = templates
    self.stop_strings = tuple(templates.stop_strings(template))
    # Stop strings that are single tokens (</s>, <|eot_id|>) also end the loop on device;
    # the rest are cut on the host after decoding.
    ids = {int(tokenizer.eos_id)}
    for s in self.stop_strings:
      token_id = tokenizer.token_to_id(s) if hasattr(tokenizer, 'token_to_id') else None
      if token_id is not None:
        ids.add(int(token_id))
    self.stop_ids = tuple(sorted(ids))

  def prompt_ids(self, turns, image_sizes: Sequence[Sequence[int]] = ()) -> list[int]:
    """The prompt's ids, each `<image>` expanded to its image tokens (anyres: the count of
    the image of `image_sizes` (height, width) in the same order)."""
    gen = self.generator
    if gen.anyres is None:
      return list(self._templates.render_prompt(self.template, turns, self.tokenizer,
                                                gen.tokens_per_image, self.system_prompt))
    ids = self._templates.render_prompt(self.template, turns, self.tokenizer, 1,
                                        self.system_prompt)
    return anyres_inputs.expand_image_tokens(
        ids, [gen.image_tokens(s) for s in image_sizes], gen.image_token_id)

  def answer(self, conversations: Sequence[list[dict]], images: Sequence[Any] | None = None,
             max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
             min_batch: int = 1) -> list[generate.Output]:
    """Answers the last human turn of each conversation, in one batch.

    Args:
      conversations: per row, LLaVA turns ending with a human turn.
      images: per row, None or float[n, H, W, 3] preprocessed images for its `<image>`s
        (anyres: an `AnyresImage` or a list of them; `load_image` makes either).
      max_new_tokens: per row.
      sampling: decoding knobs.
      min_batch: see `Generator.generate`.

    Returns:
      Outputs whose `.text` is the answer, stripped and cut at the template's stop strings.
    """
    rows = images if images is not None else [None] * len(conversations)
    sizes = [[im.size for im in anyres_inputs.row_images(row)] if self.generator.anyres else ()
             for row in rows]
    prompts = [self.prompt_ids(turns, s) for turns, s in zip(conversations, sizes)]
    outs = self.generator.generate(prompts, images, max_new_tokens, sampling, self.stop_ids,
                                   min_batch)
    for out in outs:
      text, hit = cut_at_stop_strings(self.tokenizer.decode(out.tokens), self.stop_strings)
      out.text = text.strip()
      if hit:
        out.finish = 'stop'
    return outs


def load_image(config, image):
  """One image for generation with `config`'s model, preprocessed as the run does.

  Args:
    config: the run config (`model`, and `data` for the mean, std and aspect handling).
    image: a file path, encoded bytes, a PIL image or a uint8[H, W, 3] array.

  Returns:
    float32[H, W, 3] for a fixed-size model; an `lvm.anyres_inputs.AnyresImage` (tiles and
    original size) for an anyres one.

  Raises:
    ImageError: missing, unreadable or too large (`lvm.data.images.open_image`).
  """
  from lvm.data import images as images_lib  # pylint: disable=g-import-not-at-top
  if config.model.anyres.pinpoints:
    return anyres_inputs.load(config, image)
  return images_lib.load_image(image, config)


def stack_images(images: Sequence[Any]):
  """One row's images from `load_image`s, as `Generator.generate` takes them."""
  if images and isinstance(images[0], anyres_inputs.AnyresImage):
    return list(images)
  return np.stack(images)


def abstract_params(config, mesh):
  """The run's params as `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`, as
  its checkpoints hold them (frozen kernels quantized if it set `train.frozen_quantization`).

  Restoring against this tree puts each shard straight onto its devices (as training's
  StateFactory does); no full copy is made on one device.
  """
  model = models.build(config)
  rules = lvm_sharding.rules(config)
  images, ids, kw = models.example_inputs(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda k: model.init(k, images, ids, **kw),
                           jax.random.key(0))['params']
  shardings = lvm_sharding.logical_shardings(boxed, mesh, rules)
  # A run with train.frozen_quantization saved its frozen kernels quantized (lvm.quantize).
  mode = config.train.frozen_quantization
  axes = quantize.axes_tree(boxed, lora.trainable_regex(config), mode)  # LoRA: base frozen
  abstract = jax.eval_shape(lambda p: quantize.quantize_params(p, axes, mode), nn.unbox(boxed))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, quantize.quantized_shardings(shardings, axes))


def from_run(path: str, mesh=None, log=print):
  """(config, Generator, TextGenerator) for a workdir or checkpoint path.

  The newest checkpoint that restores is used (a corrupt newest one is reported through
  `log` and skipped), restored straight into the generator's shardings.
  """
  from lvm import checkpoint  # pylint: disable=g-import-not-at-top
  from lvm.data import tokenizer as data_tokenizer  # pylint: disable=g-import-not-at-top
  meshes = {}

  def target(config):
    meshes['mesh'] = mesh if mesh is not None else lvm_sharding.make_mesh(config.mesh)
    return abstract_params(config, meshes['mesh'])

  config, params = checkpoint.load_params(path, target, log=log)
  params = quantize.dequantize_params(params, layers.dtype(config.model.param_dtype))
  try:
    tok = data_tokenizer.load(config)
  except FileNotFoundError:
    from lvm import data  # pylint: disable=g-import-not-at-top
    if not hasattr(data.dataset(config), 'own_tokenizer'):
      raise
    # A dataset's own tokenizer (shapes) is generated, deterministically, at prepare time.
    data.prepare(config)
    tok = data_tokenizer.load(config)
  generator = generate.Generator(config, params, mesh=meshes['mesh'])
  return config, generator, TextGenerator(generator, tok, config.data.template,
                                          config.data.system_prompt)
