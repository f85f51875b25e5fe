"""Batch-1 decode speed against the memory-bandwidth limit, and time to first token.

Decoding one token at batch 1 reads every decoder weight once, so the fastest possible
rate is (measured memory bandwidth) / (decoder weight bytes). This script builds a model
with random weights directly on the accelerator (no download, no host copy), measures the
bandwidth with a large on-device copy, and reports:

  decode tokens/s = (N - 1) / (time(N new tokens) - time(1 new token)), batch 1, text only
  roofline        = bandwidth / (decoder weights read per token: all layers + final norm
                    + LM head; the embedding table contributes one row)
  TTFT            = time of a call with max_new_tokens=1 for one image + a short question
                    (vision tower + projector + prefill + one sample)

  python benchmarks/generate_roofline.py --size=7b            # on a GPU: LLaVA-1.5-7B shapes
  python benchmarks/generate_roofline.py --size=tiny          # a quick CPU check of the script

KV-cache reads are ignored in the bound (a 7B model at a few hundred tokens of context reads
~0.5 MB of cache per layer per token against ~400 MB of weights).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_bandwidth(mib: int, repeats: int) -> float:
  """Bytes/s of an on-device elementwise copy (read + write)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = mib * 2**20 // 2
  x = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda a: a * 2)
  f(x).block_until_ready()
  t = median_time(lambda: f(x).block_until_ready(), repeats)
  return 2 * x.nbytes / t


def make_config(size: str):
  from configs import llava15, tiny  # pylint: disable=g-import-not-at-top
  if size == 'tiny':
    config = tiny.get_config()
  else:
    config = llava15.get_config(f'size={size}')
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'bfloat16'
  config.model.remat_policy = 'none'
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='7b', help='7b | 13b (LLaVA-1.5 shapes) | tiny')
  parser.add_argument('--prompt_len', type=int, default=64, help='text prompt for decode')
  parser.add_argument('--new_tokens', type=int, default=256)
  parser.add_argument('--question_len', type=int, default=40, help='text after the image')
  parser.add_argument('--bandwidth_mib', type=int, default=4096)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lvm import models  # pylint: disable=g-import-not-at-top
  from lvm import sharding  # pylint: disable=g-import-not-at-top
  from lvm.generate import Generator  # pylint: disable=g-import-not-at-top

  config = make_config(args.size)
  device = jax.devices()[0]
  mesh = jax.sharding.Mesh(np.asarray([device]).reshape(1, 1, 1), sharding.MESH_AXES)
  model = models.build(config)
  h = config.model.vision.image_size
  init = lambda key: nn.unbox(model.init(key, jnp.zeros((1, 1, h, h, 3)),
                                         jnp.zeros((1, 8), jnp.int32))['params'])
  # Random weights created on the device: a 7B model never passes through host memory.
  params = jax.jit(init, out_shardings=jax.sharding.SingleDeviceSharding(device))(
      jax.random.key(0))
  gen = Generator(config, params, mesh=mesh)
  del params
  decoder = gen.params['decoder']
  per_token = sum(x.nbytes for x in jax.tree.leaves(decoder)) - decoder['embed_tokens'].nbytes
  per_token += decoder['embed_tokens'].nbytes // decoder['embed_tokens'].shape[0]
  bandwidth = measure_bandwidth(args.bandwidth_mib, args.repeats)

  rng = np.random.RandomState(0)
  vocab = min(config.model.image_token_id, config.model.pad_token_id)
  text = [[1] + list(rng.randint(3, vocab, args.prompt_len - 1))]
  n = args.new_tokens
  run = lambda k: gen.generate(text, None, max_new_tokens=k)
  run(n), run(1)  # compile both buckets
  t_n = median_time(lambda: run(n), args.repeats)
  t_1 = median_time(lambda: run(1), args.repeats)
  decode_tps = (n - 1) / (t_n - t_1)
  roofline_tps = bandwidth / per_token

  p = gen.tokens_per_image
  question = [[1] + [config.model.image_token_id] * p
              + list(rng.randint(3, vocab, args.question_len))]
  image = [rng.randn(1, h, h, 3).astype(np.float32)]
  first = lambda: gen.generate(question, image, max_new_tokens=1)
  first()
  ttft = median_time(first, args.repeats)

  result = {
      'size': args.size, 'device': device.device_kind, 'batch': 1,
      'decoder_bytes_per_token': per_token, 'bandwidth_gb_s': bandwidth / 1e9,
      'decode_tokens_per_s': decode_tps, 'roofline_tokens_per_s': roofline_tps,
      'fraction_of_roofline': decode_tps / roofline_tps,
      'ttft_ms': 1e3 * ttft, 'ttft_prompt_tokens': len(question[0]), 'image_tokens': p,
      'decode_prompt_tokens': args.prompt_len, 'new_tokens': n,
  }
  print(f"{args.size} on {device.device_kind}: decoder weights {per_token / 1e9:.2f} GB/token, "
        f"bandwidth {bandwidth / 1e9:.0f} GB/s")
  print(f"batch-1 decode {decode_tps:.1f} tokens/s = {100 * result['fraction_of_roofline']:.0f}%"
        f" of the {roofline_tps:.1f} tokens/s bandwidth limit")
  print(f"time to first token {1e3 * ttft:.1f} ms (1 image, {len(question[0])} prompt tokens)")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
