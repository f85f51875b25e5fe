"""Greedy generation speed: lvm's jitted KV-cache loop vs transformers' `generate`.

Builds a random transformers LLaVA locally (nothing downloaded), saves it, imports it with
`lvm.hf.load`, and times both on the same prompts (one image + text per row) on this
machine: decode tokens/s (generated tokens / wall time of the whole call) and time to
first token (a call with max_new_tokens=1: image encoding + prefill + one sample). Both
produce the same greedy tokens, which the script checks (both never emit the image
placeholder id: lvm by design, transformers through `suppress_tokens`). Compilation is excluded (one
warm-up call each, then the fastest of --repeats timed calls).

  python benchmarks/generate_speed.py                      # the tiny test model
  python benchmarks/generate_speed.py --width=256 --depth=4 --batch=8

Prints one table row per setting and writes --out (JSON) if given.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top


def build_hf(args, folder):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vision = transformers.CLIPVisionConfig(
      hidden_size=args.vision_width, intermediate_size=2 * args.vision_width,
      num_hidden_layers=2, num_attention_heads=4, image_size=args.image_size, patch_size=8)
  text = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.width, intermediate_size=2 * args.width,
      num_hidden_layers=args.depth, num_attention_heads=args.heads,
      num_key_value_heads=args.heads // 2, max_position_embeddings=4096, pad_token_id=0,
      bos_token_id=1, eos_token_id=2)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                    image_token_index=args.vocab - 2)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():
    model.lm_head.weight.mul_(50)  # sharp logits: both sides pick the same argmax
  model.save_pretrained(folder)
  return model


def best_time(fn, repeats):
  """The fastest of `repeats` calls: on a shared machine, the least disturbed one."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--prompt_len', type=int, default=32, help='text tokens per prompt')
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--width', type=int, default=64)
  parser.add_argument('--depth', type=int, default=2)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--vocab', type=int, default=512)
  parser.add_argument('--vision_width', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--torch_threads', type=int, default=0, help='0: torch default')
  parser.add_argument('--out', default='', help='write the results as JSON here')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import lvm.hf  # pylint: disable=g-import-not-at-top
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  from lvm.generate import Generator  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as folder:
    hf_model = build_hf(args, folder)
    model_config, params = lvm.hf.load(folder)
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                 ('data', 'fsdp', 'tensor'))
  gen = Generator(model_config, params, mesh=one_device)
  rng = np.random.RandomState(0)
  image_id = model_config.image_token_id
  prompts = [[1] + [image_id] * gen.tokens_per_image
             + list(rng.randint(3, image_id - 1, args.prompt_len)) for _ in range(args.batch)]
  images = rng.randn(args.batch, 1, args.image_size, args.image_size, 3).astype(np.float32)
  n = args.new_tokens

  def lvm_run(max_new):
    return gen.generate(prompts, list(images), max_new_tokens=max_new)

  ids = torch.tensor(prompts)
  pixels = torch.from_numpy(images[:, 0].transpose(0, 3, 1, 2).copy())

  def hf_run(max_new):
    with torch.no_grad():
      return hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values=pixels, max_new_tokens=max_new,
                               min_new_tokens=max_new, do_sample=False, eos_token_id=None,
                               pad_token_id=0, suppress_tokens=[image_id])

  lvm_tokens = [o.tokens for o in lvm_run(n)]  # also compiles
  lvm_run(1)
  hf_tokens = hf_run(n)[:, len(prompts[0]):].tolist()
  same = lvm_tokens == hf_tokens
  t_lvm = best_time(lambda: lvm_run(n), args.repeats)
  ttft_lvm = best_time(lambda: lvm_run(1), args.repeats)
  t_hf = best_time(lambda: hf_run(n), args.repeats)
  ttft_hf = best_time(lambda: hf_run(1), args.repeats)
  result = {
      'setting': {k: v for k, v in vars(args).items() if k != 'out'},
      'prompt_tokens': len(prompts[0]), 'image_tokens': gen.tokens_per_image,
      'lvm_tokens_per_s': args.batch * n / t_lvm, 'hf_tokens_per_s': args.batch * n / t_hf,
      'speedup': t_hf / t_lvm, 'lvm_ttft_ms': 1e3 * ttft_lvm, 'hf_ttft_ms': 1e3 * ttft_hf,
      'same_greedy_tokens': same, 'device': str(jax.devices()[0].device_kind),
      'torch_threads': torch.get_num_threads(),
  }
  print(f"batch {args.batch}, prompt {len(prompts[0])} tokens ({gen.tokens_per_image} image), "
        f"{n} new tokens, decoder width {args.width} x {args.depth} layers, vocab {args.vocab}")
  print(f"{'':8} {'tokens/s':>10} {'TTFT ms':>9}")
  print(f"{'lvm':8} {result['lvm_tokens_per_s']:10.1f} {result['lvm_ttft_ms']:9.1f}")
  print(f"{'hf':8} {result['hf_tokens_per_s']:10.1f} {result['hf_ttft_ms']:9.1f}")
  print(f"speedup {result['speedup']:.1f}x; same greedy tokens: {same}")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  if not same:
    sys.exit('lvm and transformers disagree on the greedy tokens')


if __name__ == '__main__':
  main()
