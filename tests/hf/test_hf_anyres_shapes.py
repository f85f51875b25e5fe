"""The anyres shapes demo's training path (`configs/shapes.py:anyres=1`) against transformers.

One training batch of the demo's own pipeline (scenes of aspect ratios 1/3 to 3, shuffled off)
and the same PNG scenes through transformers' `LlavaNextImageProcessor`: equal tiles (base tile
first, grid row-major) and `image_sizes` (height, width); each image's run of image tokens as
long as transformers' feature count; and the training loss (`lvm.losses.loss_fn`, the
demo's scored LM head included) equal to `LlavaNextForConditionalGeneration`'s loss on the
demo's model (random init, exported with `lvm.hf.save`; `qk_norm` goes out as Qwen3).
"""

import io

import jax
import numpy as np
from PIL import Image
import torch
import transformers

from configs import shapes as shapes_config
import hf_fixtures as F
import lvm.data
import lvm.hf
from lvm import losses
from lvm import models
from lvm import sharding
from lvm import train
from lvm.data import pipeline
from lvm.data import tokenizer as tokenizer_lib


def demo_batch(tmp_path, rows=8):
  """The demo's config and its first training batch of `rows`, with the records it came from."""
  config = shapes_config.get_config(f'anyres=1,train={rows},batch_size={rows},'
                                    f'data_dir={tmp_path / "data"}')
  config.data.shapes.validation = config.data.shapes.test = 2
  config.data.prefetch = 0
  lvm.data.prepare(config)
  source = pipeline.data_source(config, 'train')
  records = [source[i] for i in range(rows)]
  it = pipeline.DataIterator(config, 'train', sharding.make_mesh(config.mesh), shuffle=False,
                             num_epochs=1, source=records, tokenizer=tokenizer_lib.load(config))
  return config, records, jax.device_get(next(it))


def test_demo_batch_matches_transformers_processor_and_model(tmp_path):
  config, records, batch = demo_batch(tmp_path)
  pil = [Image.open(io.BytesIO(r['images'][0])).convert('RGB') for r in records]
  sizes = [im.size[::-1] for im in pil]
  assert len({pipeline.tiles_needed(s, pipeline.anyres_layout(config)) for s in sizes}) == 2
  tile = config.model.vision.image_size
  processor = transformers.LlavaNextImageProcessorPil(
      size={'shortest_edge': tile}, crop_size={'height': tile, 'width': tile},
      image_grid_pinpoints=[list(p) for p in config.model.anyres.pinpoints],
      image_mean=list(config.data.image_mean), image_std=list(config.data.image_std),
      resample=3)
  processed = processor(pil, return_tensors='np')
  np.testing.assert_array_equal(batch['image_sizes'][:, 0], processed['image_sizes'])
  np.testing.assert_array_equal(batch['image_sizes'][:, 0], sizes)
  for row, im in enumerate(pil):  # tiles: [T, 3, S, S] channels-first, zero-padded to the max
    want = processed['pixel_values'][row].transpose(0, 2, 3, 1)
    got = batch['images'][row, 0]
    used = pipeline.tiles_needed(sizes[row], pipeline.anyres_layout(config))
    np.testing.assert_array_equal(got[:used], want[:used])
    assert not got[used:].any()

  # The demo's model, random init, exported to transformers.
  model = models.build(config.model)
  params = jax.jit(lambda rng: models.random_params(
      config.model, rng, batch['images'][:1], batch['input_ids'][:1],
      image_sizes=batch['image_sizes'][:1]))(jax.random.PRNGKey(0))
  params = jax.tree.map(np.asarray, params)
  lvm.hf.save(config.model, params, str(tmp_path / 'hf'))
  ref = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / 'hf'))
  ref = ref.eval()
  ids, mask, loss_mask = batch['input_ids'], batch['attention_mask'], batch['loss_mask']
  image_token = config.model.image_token_id
  with torch.no_grad():
    features = ref.get_image_features(
        pixel_values=torch.from_numpy(processed['pixel_values']),
        image_sizes=torch.from_numpy(processed['image_sizes']))
  features = getattr(features, 'pooler_output', features)  # an output object in new versions
  counts = [f.shape[0] for f in features]
  assert [int(np.sum(row == image_token)) for row in ids] == counts
  for row, count in zip(ids, counts):  # one contiguous run per image
    run = np.flatnonzero(row == image_token)
    assert run[-1] - run[0] + 1 == count
  train.check_anyres_batch(model, jax.tree.map(jax.numpy.asarray, batch))

  labels = np.where(loss_mask, ids, -100).astype(np.int64)
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)),
              attention_mask=torch.from_numpy(mask.astype(np.int64)),
              pixel_values=torch.from_numpy(processed['pixel_values']),
              image_sizes=torch.from_numpy(processed['image_sizes']), labels=torch.from_numpy(labels))
  num_tokens = int(loss_mask[:, 1:].sum())
  loss, aux = jax.jit(lambda p, b: losses.loss_fn(
      p, b, model=model, num_tokens=num_tokens,
      scored_tokens=config.train.max_scored_tokens))(params, batch)
  assert aux['unscored'] == 0
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=2e-5)
  # Logits at every real position.
  logits = np.asarray(jax.jit(model.apply)({'params': params}, batch['images'], ids,
                                           image_sizes=batch['image_sizes']))
  assert F.rel_err(logits, out.logits.numpy(), mask) < 1e-4
  # The comparison sees the tile order: the grid tiles reversed move the loss past the tolerance.
  flipped = batch['images'].copy()
  for row, size in enumerate(sizes):
    used = pipeline.tiles_needed(size, pipeline.anyres_layout(config))
    flipped[row, 0, 1:used] = flipped[row, 0, used - 1:0:-1]
  moved, _ = jax.jit(lambda p, b: losses.loss_fn(
      p, b, model=model, num_tokens=num_tokens,
      scored_tokens=config.train.max_scored_tokens))(params, {**batch, 'images': flipped})
  print(f'lvm loss {float(loss):.7f} transformers {float(out.loss):.7f} grid reversed '
        f'{float(moved):.7f}; logits rel err {F.rel_err(logits, out.logits.numpy(), mask):.2e}')
  assert abs(float(moved) - float(out.loss)) > 1e-4 * float(out.loss)
