"""lvm.generate / lvm.sampling: cache vs recompute, transformers parity, sharding, buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from configs import tiny
from lvm import models
from lvm import sharding as lvm_sharding
from lvm.generate import Generator, bucket, length_bucket
from lvm.inference import cut_at_stop_strings
from lvm.sampling import SamplingParams, filter_logits, sample

NEW = 8  # tokens generated per test row


@pytest.fixture(scope='module')
def setup():
  """A tiny random LLaVA whose logits are sharp enough that greedy ties cannot flip."""
  config = tiny.get_config()
  model = models.build(config)
  h = config.model.vision.image_size
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1, h, h, 3)),
                               jnp.zeros((1, 8), jnp.int32))['params'])
  # Default init (std 0.02) gives near-uniform logits; scale the head for clear argmaxes.
  params['decoder']['lm_head']['kernel'] = params['decoder']['lm_head']['kernel'] * 50
  rng = np.random.RandomState(0)
  p = models.num_image_tokens(config)
  img = config.model.image_token_id
  prompts = [
      [1] + [img] * p + list(rng.randint(3, 500, 5)),  # one image
      list(rng.randint(3, 500, 11)),  # text only, longer
      [1] + [img] * (2 * p) + [7, 8],  # two images
  ]
  images = [rng.randn(h, h, 3), None, rng.randn(2, h, h, 3)]
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                 lvm_sharding.MESH_AXES)
  gen = Generator(config, params, mesh=one_device)  # the sharded case has its own test
  return dict(config=config, model=model, params=params, prompts=prompts, images=images,
              gen=gen, greedy=gen.generate(prompts, images, max_new_tokens=NEW))


def recompute_greedy(model, params, prompts, images, n):
  """Greedy tokens by running the full sequences again at every step (no cache).

  Rows are right-padded to one length (causal attention: padding after a token cannot
  change its logits), so a single jitted forward serves every step on one device.
  """
  h = model.vision.image_size
  slots = max(1, max(0 if x is None else np.reshape(x, (-1, h, h, 3)).shape[0] for x in images))
  batch_images = np.zeros((len(prompts), slots, h, h, 3), np.float32)
  for r, x in enumerate(images):
    if x is not None:
      x = np.reshape(x, (-1, h, h, 3))
      batch_images[r, :len(x)] = x
  length = max(map(len, prompts)) + n
  ids = np.zeros((len(prompts), length), np.int32)
  lens = np.asarray([len(p) for p in prompts])
  for r, p in enumerate(prompts):
    ids[r, :len(p)] = p
  def next_token(i):
    logits = model.apply({'params': params}, batch_images, i)
    # Generation never emits the image placeholder (see Generator._suppress).
    return jnp.argmax(logits.at[..., model.image_token_id].set(-jnp.inf), -1)

  forward = jax.jit(next_token)
  for _ in range(n):
    best = np.asarray(forward(ids))
    ids[np.arange(len(prompts)), lens] = best[np.arange(len(prompts)), lens - 1]
    lens = lens + 1
  return [ids[r, len(p):len(p) + n].tolist() for r, p in enumerate(prompts)]


def test_cache_matches_recompute(setup):
  s = setup
  ref = recompute_greedy(s['model'], s['params'], s['prompts'], s['images'], NEW)
  assert [o.tokens for o in s['greedy']] == ref
  assert all(o.finish == 'length' for o in s['greedy'])
  # Rows are independent of their batch: alone, a row gives the same tokens.
  alone = s['gen'].generate(s['prompts'][1:2], None, max_new_tokens=NEW)
  assert alone[0].tokens == ref[1]


def test_tensor_parallel_matches_one_device(setup):
  s = setup
  assert jax.device_count() == 8
  tp_config = tiny.get_config()
  tp_config.mesh.tensor = 2  # data 4 x tensor 2 over the 8 emulated devices
  tp = Generator(tp_config, s['params'])
  assert dict(tp.mesh.shape) == {'data': 4, 'fsdp': 1, 'tensor': 2}
  # The MLP kernels really are split over the tensor axis.
  gate = tp.params['decoder']['layers']['mlp']['gate_proj']['kernel']
  assert 'tensor' in gate.sharding.spec
  out = tp.generate(s['prompts'], s['images'], max_new_tokens=NEW)
  # recompute_greedy runs unsharded, on one device.
  ref = recompute_greedy(s['model'], s['params'], s['prompts'], s['images'], NEW)
  assert [o.tokens for o in out] == ref


def test_score_matches_unpadded_forward_on_one_and_eight_devices(setup):
  """Generator.score (lmms-eval's loglikelihood): each row alone, unpadded, gives the same."""
  s = setup
  h = s['config'].model.vision.image_size
  seqs = [p + o.tokens for p, o in zip(s['prompts'], s['greedy'])]
  targets = [[False] * len(p) + [True] * len(o.tokens) for p, o in zip(s['prompts'], s['greedy'])]
  seqs[1][-2] = (seqs[1][-2] + 1) % 500  # a non-greedy target in row 1
  forward = jax.jit(lambda images, ids: s['model'].apply({'params': s['params']}, images, ids))
  ref_nll, ref_greedy = [], []
  for seq, tgt, image in zip(seqs, targets, s['images']):
    image = None if image is None else np.reshape(image, (1, -1, h, h, 3)).astype(np.float32)
    logp = np.asarray(jax.nn.log_softmax(forward(image, jnp.asarray([seq]))[0], -1))
    t = np.flatnonzero(tgt)
    ref_nll.append(-logp[t - 1, np.asarray(seq)[t]].sum())
    ref_greedy.append(bool(np.all(logp[t - 1].argmax(-1) == np.asarray(seq)[t])))
  assert ref_greedy == [True, False, True]  # generated greedily, but for the changed token
  sharded = Generator(s['config'], s['params'])  # data-parallel over the 8 emulated devices
  assert sharded.batch_multiple == 8
  for gen in (s['gen'], sharded):
    nll, count, greedy = gen.score(seqs, targets, s['images'])
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
    assert count.tolist() == [NEW] * 3 and greedy.tolist() == ref_greedy
  with pytest.raises(ValueError, match='first token has no prefix'):
    s['gen'].score([[1, 2]], [[True, True]])


def test_buckets_avoid_recompiles(setup):
  gen, text = setup['gen'], setup['prompts'][1]
  gen.generate([text[:5]], None, max_new_tokens=3)
  before = gen.num_compiles
  gen.generate([text[:9]], None, max_new_tokens=7)  # same buckets
  gen.generate([text[:1]], None, max_new_tokens=16)
  assert gen.num_compiles == before
  out = gen.generate([text[:9]], None, max_new_tokens=20)  # a bigger output bucket (24)
  assert gen.num_compiles == before + 1 and len(out[0].tokens) == 20
  gen.generate([text[:9]], None, max_new_tokens=24)
  assert gen.num_compiles == before + 1
  assert bucket(17) == 32 and bucket(3) == 16 and bucket(5, [4, 8, 64]) == 8
  # Lengths: powers of two and the half steps between them (padding at most 50%).
  assert [length_bucket(n) for n in (3, 17, 25, 33, 513, 626, 769, 1025)] == [
      16, 24, 32, 48, 768, 768, 1024, 1536]
  assert length_bucket(5, [4, 8, 64]) == 8
  with pytest.raises(ValueError, match='largest bucket'):
    bucket(65, [4, 8, 64])


def test_stop_ids_end_rows_independently(setup):
  s = setup
  ref = s['greedy']
  stop = ref[0].tokens[3]
  assert stop not in ref[0].tokens[:3]
  outs = s['gen'].generate(s['prompts'], s['images'], max_new_tokens=NEW, stop_ids=[stop])
  assert outs[0].tokens == ref[0].tokens[:3] and outs[0].finish == 'stop'
  for o, r in zip(outs[1:], ref[1:]):  # other rows run on unless they hit the same id
    cut = r.tokens.index(stop) if stop in r.tokens else NEW
    assert o.tokens == r.tokens[:cut]


def test_image_placeholder_is_never_generated(setup):
  s = setup
  params = jax.tree.map(lambda x: x, s['params'])
  kernel = params['decoder']['lm_head']['kernel']
  # Make the image token every position's argmax by a wide margin.
  params['decoder']['lm_head']['kernel'] = kernel.at[:, s['config'].model.image_token_id].set(
      100 * jnp.abs(kernel).max())
  gen = Generator(s['config'], params, mesh=s['gen'].mesh)
  out = gen.generate(s['prompts'][1:2], None, max_new_tokens=NEW)[0].tokens
  assert s['config'].model.image_token_id not in out
  assert out == recompute_greedy(s['model'], params, s['prompts'][1:2], [None], NEW)[0]


def test_sampling_seeded_and_restricted(setup):
  s = setup
  gen, prompts, images = s['gen'], s['prompts'], s['images']
  before = gen.num_compiles
  # top_k=1 at any temperature is greedy.
  k1 = gen.generate(prompts, images, NEW, SamplingParams(temperature=5.0, top_k=1, seed=3))
  assert [o.tokens for o in k1] == [o.tokens for o in s['greedy']]
  hot = SamplingParams(temperature=10.0, seed=1)
  a = gen.generate(prompts, images, NEW, hot)
  b = gen.generate(prompts, images, NEW, hot)
  c = gen.generate(prompts, images, NEW, SamplingParams(temperature=10.0, seed=2))
  assert [o.tokens for o in a] == [o.tokens for o in b]
  assert [o.tokens for o in a] != [o.tokens for o in c]
  assert gen.num_compiles == before  # sampling knobs are traced, not static
  with pytest.raises(ValueError, match='top_p'):
    SamplingParams(top_p=0.0)


def test_filter_logits_hand_computed():
  logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]]))
  inf = -np.inf
  np.testing.assert_allclose(filter_logits(logits, 2, 1.0), [[inf, inf, np.log(.3), np.log(.4)]],
                             rtol=1e-6)
  # top_p 0.5: 0.4 alone (< 0.5) needs 0.3 too; 0.7 >= 0.5 stops there.
  np.testing.assert_allclose(filter_logits(logits, 0, 0.5), [[inf, inf, np.log(.3), np.log(.4)]],
                             rtol=1e-6)
  np.testing.assert_allclose(filter_logits(logits, 0, 0.4), [[inf, inf, inf, np.log(.4)]],
                             rtol=1e-6)
  np.testing.assert_allclose(filter_logits(logits, 0, 1.0), logits, rtol=1e-6)
  # top_k then top_p: among {0.3, 0.4} renormalized (3/7, 4/7), p=0.6 keeps both.
  np.testing.assert_allclose(filter_logits(logits, 2, 0.6), [[inf, inf, np.log(.3), np.log(.4)]],
                             rtol=1e-6)


def test_sample_frequencies_follow_filtered_softmax():
  logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 4000))
  draws = np.asarray(sample(logits, jax.random.key(0), 1.0, 2, 1.0))
  freq = np.bincount(draws, minlength=4) / draws.size
  assert freq[0] == 0 and freq[1] == 0
  np.testing.assert_allclose(freq[2:], [3 / 7, 4 / 7], atol=0.03)
  assert (np.asarray(sample(logits[:3], jax.random.key(0), 0.0, 0, 1.0)) == 3).all()


def test_cut_at_stop_strings():
  assert cut_at_stop_strings('a cat</s>USER: hi', ('</s>',)) == ('a cat', True)
  assert cut_at_stop_strings('x\ny<|eot_id|>', ('<|eot_id|>', '\n')) == ('x', True)
  assert cut_at_stop_strings('no stop', ('</s>',)) == ('no stop', False)


def test_bad_inputs_raise_clear_errors(setup):
  gen, prompts = setup['gen'], setup['prompts']
  with pytest.raises(ValueError, match='image tokens'):
    gen.generate(prompts[:1], [None], max_new_tokens=2)
  with pytest.raises(ValueError, match='max_new_tokens'):
    gen.generate(prompts[:1], None, max_new_tokens=0)


def _tiny_hf_llava(tmp_path):
  """A seeded random transformers LLaVA saved as safetensors (nothing downloaded)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         image_size=32, patch_size=8)
  text = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                    image_token_index=500)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
    model.lm_head.weight.mul_(50)  # sharp logits: float noise cannot flip an argmax
  model.save_pretrained(str(tmp_path))
  return model


def test_greedy_matches_transformers_generate(tmp_path):
  torch = pytest.importorskip('torch')
  lvm_hf = pytest.importorskip('lvm.hf')
  hf_model = _tiny_hf_llava(tmp_path)
  model_config, params = lvm_hf.load(str(tmp_path))
  gen = Generator(model_config, params)
  rng = np.random.RandomState(1)
  p = gen.tokens_per_image  # 16 patches (CLS dropped)
  prompts = [[1] + [500] * p + list(rng.randint(3, 400, 6)), list(rng.randint(3, 400, 10))]
  images = [rng.randn(1, 32, 32, 3).astype(np.float32), None]
  outs = gen.generate(prompts, images, max_new_tokens=NEW)
  for prompt, imgs, out in zip(prompts, images, outs):
    kw = {}
    if imgs is not None:
      kw['pixel_values'] = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy())
    ids = torch.tensor([prompt])
    with torch.no_grad():
      ref = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0, suppress_tokens=[500], **kw)
    assert out.tokens == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize('scan', [True, False])
def test_a_decode_step_writes_only_the_new_slots_of_the_cache(scan):
  """The cache passes along the layers (the scan's carry) and each layer writes its new key
  and value in place: the compiled step holds no cache-sized temporary (it held two, a
  zero-filled output stack and its copy, when the cache was the scan's per-layer output)."""
  config = tiny.get_config(f'scan={int(scan)}')
  with config.unlocked():
    config.mesh.data = -1
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                 lvm_sharding.MESH_AXES)
  model = models.build(config)
  h = config.model.vision.image_size
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1, h, h, 3)),
                               jnp.zeros((1, 8), jnp.int32))['params'])
  gen = Generator(config, params, mesh=one_device)
  ids = np.random.RandomState(0).randint(3, 500, (8, 64)).astype(np.int32)
  rep = lambda x: jax.device_put(x, lvm_sharding.replicated(one_device))
  knobs = (rep(np.float32(0.0)), rep(np.int32(0)), rep(np.float32(1.0)))
  with jax.set_mesh(one_device), nn.logical_axis_rules(gen.rules):
    token, cache, full_mask, next_pos, rng = gen.prefill(
        gen.params, None, rep(ids), rep(np.ones((8, 64), bool)), rep(jax.random.key(0)),
        *knobs, new_bucket=64)
    compiled = gen.decode.lower(gen.params, token, cache, rep(np.int32(64)), full_mask,
                                next_pos, rng, *knobs).compile()
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  memory = compiled.memory_analysis()
  assert memory.alias_size_in_bytes >= cache_bytes  # the donated cache is the new one
  assert memory.temp_size_in_bytes < cache_bytes
