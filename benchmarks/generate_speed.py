"""Batched greedy generation, lvm against transformers' `generate`: the evaluation workload.

Every question is one image and a text prompt (LLaVA-1.5 evaluation: 576 visual tokens and
~50 text tokens) answered greedily with exactly N new tokens (no stop token, so both sides
do the same work). Both sides run the same weights: a random transformers
`LlavaForConditionalGeneration` (nothing downloaded) saved with `save_pretrained` and
imported with `lvm.hf.load`, on the same device (a GPU when torch sees one: bf16 weights,
SDPA attention; else the CPU in float32), with the same pixel arrays and prompts.

  questions/s = batch / wall time of one whole call (image encoding, prefill, N decode
                steps, tokens back on the host); the best of --repeats calls after a
                warm-up call that compiles
  TTFT        = the same for max_new_tokens=1 at batch 1

transformers runs first, once per `--hf_cache` implementation ('dynamic': its default
cache; 'static': preallocated, which lets it compile the decode step), and its model is
freed before JAX takes the device. The generated tokens are compared row by row; with
float32 on the CPU they must be equal (the LM head is scaled so that the argmax is clear),
with bf16 on a GPU the first differing token is reported, not enforced.

  python benchmarks/generate_speed.py                                   # tiny, CPU: a check
  python benchmarks/generate_speed.py --size=7b --batches=1,8,32,64 --new_tokens=16,128 \\
      --new_token_buckets=128 --repeats=2 --out=generate_7b.json        # one GPU

Prints one table row per (batch, new tokens) and writes --out (JSON) if given.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

# transformers configs: 'tiny' checks the script on a CPU; '7b' is llava-1.5-7b-hf's shape
# (CLIP ViT-L/14-336, 576 visual tokens; Vicuna-7B).
SIZES = {
    'tiny': dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=8),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
        prompt_len=32),
    '7b': dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
        prompt_len=50),
}
# LLaVA-1.5 on a GPU: cuBLAS GEMMs, so that XLA's dynamic-slice fusion lets each scanned
# layer's GEMMs read their weights in place (docs/performance.md, "Inference").
GPU_XLA_FLAGS = '--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_dynamic_slice_fusion=true'


def hf_config(size: dict):
  """The transformers `LlavaConfig` of `size` (the image token: 32000 in the 7b's vocab)."""
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = size['text']['vocab_size']
  return transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(**size['vision']),
      text_config=transformers.LlamaConfig(
          **size['text'], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
          eos_token_id=2),
      image_token_index=vocab - 64 if vocab > 4096 else vocab - 2)


def build_hf(size: dict, device, dtype, folder: str):
  """A random transformers LLaVA of `size` on `device`, saved to `folder`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = hf_config(size)
  torch.manual_seed(0)
  default = torch.get_default_dtype()
  torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy of a 7B on the device
  try:
    with torch.device(device):
      model = transformers.LlavaForConditionalGeneration(config)
  finally:
    torch.set_default_dtype(default)
  model = model.eval()
  if hasattr(model, 'set_attn_implementation'):
    model.set_attn_implementation('sdpa')
  with torch.no_grad():
    model.lm_head.weight.mul_(50)  # sharp logits: both sides pick the same argmax
  model.save_pretrained(folder)
  return model


def questions(size: dict, rows: int, prompt_len: int, image_id: int, image_tokens: int):
  """`rows` prompts (BOS, the image's tokens, random text) and normalized images."""
  rng = np.random.RandomState(0)
  prompts = [[1] + [image_id] * image_tokens + list(rng.randint(3, image_id - 1, prompt_len))
             for _ in range(rows)]
  s = size['vision']['image_size']
  return prompts, rng.randn(rows, s, s, 3).astype(np.float32)


def best_time(fn, repeats: int):
  """The fastest of `repeats` calls (the least disturbed one); fn must wait for its result."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def time_hf(model, prompts, images, batches, new_tokens, cache, repeats, device, image_id):
  """{(batch, new): (seconds, tokens)} and TTFT seconds for one cache implementation."""
  import torch  # pylint: disable=g-import-not-at-top
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, suppress_tokens=[image_id])
  if cache != 'dynamic':
    kw['cache_implementation'] = cache

  def run(b, n):
    ids = torch.tensor(prompts[:b], device=device)
    pixels = torch.from_numpy(images[:b].transpose(0, 3, 1, 2).copy()).to(device)
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, **kw)
    tokens = out[:, ids.shape[1]:].cpu()
    sync()
    return tokens.tolist()

  results = {}
  for b in batches:
    for n in new_tokens:
      tokens = run(b, n)  # warm-up (and, with a static cache, compilation)
      results[(b, n)] = (best_time(lambda: run(b, n), repeats), tokens)  # pylint: disable=cell-var-from-loop
  run(1, 1)
  return results, best_time(lambda: run(1, 1), repeats)


def time_lvm(gen, prompts, images, batches, new_tokens, repeats):
  """{(batch, new): (seconds, tokens)} and TTFT seconds of `lvm.generate.Generator`."""
  def run(b, n):
    outs = gen.generate(prompts[:b], list(images[:b, None]), max_new_tokens=n, min_batch=b)
    return [o.tokens for o in outs]

  results = {}
  for b in batches:
    for n in new_tokens:
      tokens = run(b, n)  # compiles this (batch, prompt bucket, new-token bucket)
      results[(b, n)] = (best_time(lambda: run(b, n), repeats), tokens)  # pylint: disable=cell-var-from-loop
  run(1, 1)
  return results, best_time(lambda: run(1, 1), repeats)


def first_difference(a, b) -> int | None:
  """The first position where any row differs (None: all rows equal)."""
  for row_a, row_b in zip(a, b):
    for i, (x, y) in enumerate(zip(row_a, row_b)):
      if x != y:
        return i
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='tiny')
  parser.add_argument('--batches', default='1,8', help='comma-separated batch sizes')
  parser.add_argument('--new_tokens', default='16,64', help='comma-separated answer lengths')
  parser.add_argument('--prompt_len', type=int, default=0,
                      help="text tokens per prompt (0: the size's: 50 for 7b)")
  parser.add_argument('--hf_cache', default='dynamic',
                      help="transformers cache implementations to time: 'dynamic', 'static'")
  parser.add_argument('--prompt_buckets', default='',
                      help="lvm's padded prompt lengths, comma-separated (default: "
                      'lvm.generate.length_bucket)')
  parser.add_argument('--new_token_buckets', default='',
                      help="lvm's answer-length buckets, comma-separated: '128' times every "
                      'answer length with one compiled loop per batch (it stops at N)')
  parser.add_argument('--scan', type=int, default=1, help='lvm: scanned decoder layers')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--torch_threads', type=int, default=0, help='0: torch default')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  args = parser.parse_args()
  size = SIZES[args.size]
  batches = [int(x) for x in args.batches.split(',')]
  new_tokens = [int(x) for x in args.new_tokens.split(',')]
  caches = args.hf_cache.split(',')
  prompt_len = args.prompt_len or size['prompt_len']

  import torch  # pylint: disable=g-import-not-at-top
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if device == 'cuda':  # read when JAX starts its backend, which has not happened yet
    os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), GPU_XLA_FLAGS]).strip()
  dtype = torch.bfloat16 if device == 'cuda' else torch.float32
  import transformers  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as folder:
    start = time.perf_counter()
    hf_model = build_hf(size, device, dtype, folder)
    build_s = time.perf_counter() - start
    image_id = hf_model.config.image_token_index
    image_tokens = (size['vision']['image_size'] // size['vision']['patch_size']) ** 2
    prompts, images = questions(size, max(batches), prompt_len, image_id, image_tokens)
    hf = {c: time_hf(hf_model, prompts, images, batches, new_tokens, c, args.repeats, device,
                     image_id) for c in caches}
    del hf_model
    gc.collect()
    if device == 'cuda':
      torch.cuda.empty_cache()  # JAX takes its share of the device's memory next

    import jax  # pylint: disable=g-import-not-at-top
    import lvm.hf  # pylint: disable=g-import-not-at-top
    from lvm.generate import Generator, length_bucket  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    jax_dtype = 'bfloat16' if device == 'cuda' else 'float32'
    model_config, params = lvm.hf.load(folder, dtype=jax_dtype, param_dtype=jax_dtype,
                                       scan_layers=bool(args.scan))
    load_s = time.perf_counter() - start
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                 ('data', 'fsdp', 'tensor'))
  ints = lambda text: [int(x) for x in text.split(',')] if text else None
  buckets = ints(args.prompt_buckets)
  gen = Generator(model_config, params, mesh=one_device, prompt_buckets=buckets,
                  new_token_buckets=ints(args.new_token_buckets))
  assert gen.tokens_per_image == image_tokens, (gen.tokens_per_image, image_tokens)
  del params
  lvm_times, lvm_ttft = time_lvm(gen, prompts, images, batches, new_tokens, args.repeats)

  strict = device == 'cpu'  # float32 on both sides: the same greedy tokens
  rows = []
  for (b, n), (t, tokens) in lvm_times.items():
    row = {'batch': b, 'new_tokens': n, 'lvm_s': t, 'lvm_questions_per_s': b / t}
    best = min(caches, key=lambda c: hf[c][0][(b, n)][0])  # pylint: disable=cell-var-from-loop
    for c in caches:
      row[f'hf_{c}_s'] = hf[c][0][(b, n)][0]
      row[f'hf_{c}_first_difference'] = first_difference(tokens, hf[c][0][(b, n)][1])
    row['hf_best_cache'] = best
    row['hf_questions_per_s'] = b / hf[best][0][(b, n)][0]
    row['speedup'] = hf[best][0][(b, n)][0] / t
    rows.append(row)
  result = {
      'size': args.size, 'device': str(jax.devices()[0].device_kind), 'torch_device': device,
      'dtype': jax_dtype, 'prompt_tokens': len(prompts[0]), 'image_tokens': image_tokens,
      'prompt_bucket': length_bucket(len(prompts[0]), buckets),
      'new_token_buckets': args.new_token_buckets or 'default', 'scan_layers': bool(args.scan),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax': jax.__version__,
      'torch': torch.__version__, 'transformers': transformers.__version__,
      'hf_build_s': build_s, 'lvm_load_s': load_s, 'lvm_ttft_ms': 1e3 * lvm_ttft,
      'hf_ttft_ms': {c: 1e3 * hf[c][1] for c in caches}, 'rows': rows,
      'formula': 'questions/s = batch / best wall time of a whole generate call; speed-up = '
                 "transformers' best cache time / lvm time",
  }
  print(f"{args.size} LLaVA on {result['device']} ({jax_dtype}): {len(prompts[0])}-token "
        f"prompts ({image_tokens} image tokens, lvm bucket {result['prompt_bucket']}), greedy, "
        f'exactly N new tokens; best of {args.repeats}')
  print('| batch | new tokens | lvm questions/s | transformers questions/s (cache) | speed-up '
        '| first differing token |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    diff = r[f"hf_{r['hf_best_cache']}_first_difference"]
    print(f"| {r['batch']} | {r['new_tokens']} | {r['lvm_questions_per_s']:.2f} | "
          f"{r['hf_questions_per_s']:.2f} ({r['hf_best_cache']}) | {r['speedup']:.2f}x | "
          f"{'none' if diff is None else diff} |")
  print(f"TTFT (batch 1): lvm {result['lvm_ttft_ms']:.1f} ms, transformers "
        + ', '.join(f'{c} {v:.1f} ms' for c, v in result['hf_ttft_ms'].items()))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  if strict and any(r[f'hf_{c}_first_difference'] is not None for r in rows for c in caches):
    sys.exit('lvm and transformers disagree on the greedy tokens')


if __name__ == '__main__':
  main()
