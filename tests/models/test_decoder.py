"""lvm/models/decoder.py: RoPE scaling against transformers, GQA, unrolled vs scanned, remat."""

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvm.models import decoder as decoder_lib
from lvm.models import layers
from lvm.models import rope as rope_lib
import lvm.hf

SCALINGS = [
    None,
    {'type': 'linear', 'factor': 4.0},
    {'type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
     'original_max_position_embeddings': 64},
    {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 64, 'beta_fast': 16.0},
]


@pytest.mark.parametrize('scaling', SCALINGS, ids=['none', 'linear', 'llama3', 'yarn'])
def test_rope_inv_freq_matches_transformers(scaling):
  transformers = pytest.importorskip('transformers')
  rope_utils = pytest.importorskip('transformers.modeling_rope_utils')
  rope = {'rope_type': 'default', 'rope_theta': 10000.0}
  if scaling:
    rope.update({k: v for k, v in scaling.items() if k != 'type'}, rope_type=scaling['type'])
  config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope,
                                    max_position_embeddings=4096)
  if scaling:
    ref, _ = rope_utils.ROPE_INIT_FUNCTIONS[scaling['type']](config, 'cpu')
  else:
    ref = 1.0 / (10000.0 ** (np.arange(0, 128, 2) / 128))
  ours = rope_lib.inv_freq(128, 10000.0, scaling)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6)
  if scaling:  # the scaling really changed something
    assert not np.allclose(ours, rope_lib.inv_freq(128, 10000.0, None))


def _decoder(kv_heads, scan=True, remat_policy='none'):
  return decoder_lib.Decoder(vocab_size=64, width=32, depth=2, heads=4, kv_heads=kv_heads,
                             mlp_dim=48, scan_layers=scan, remat_policy=remat_policy)


def test_gqa_equals_mha_with_repeated_kv_heads():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 32)), jnp.float32)
  gqa = _decoder(kv_heads=2, scan=False)
  params = nn.unbox(jax.jit(gqa.init)(jax.random.PRNGKey(0), x)['params'])
  mha_params = jax.tree.map(lambda a: a, params)
  for i in range(2):
    attn = mha_params[f'layers_{i}']['self_attn']
    for name in ('k_proj', 'v_proj'):  # [D, K, Dh] -> [D, H, Dh], each kv head twice
      attn[name]['kernel'] = jnp.repeat(attn[name]['kernel'], 2, axis=1)
  a = jax.jit(gqa.apply)({'params': params}, x)[0]
  b = jax.jit(_decoder(kv_heads=4, scan=False).apply)({'params': mha_params}, x)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_scanned_and_unrolled_layers_give_the_same_logits():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 32)), jnp.float32)
  unrolled = _decoder(kv_heads=2, scan=False)
  params = nn.unbox(jax.jit(unrolled.init)(jax.random.PRNGKey(0), x)['params'])
  flat = {k: np.asarray(v) for k, v in
          lvm.hf.traverse_util.flatten_dict(params, sep='/').items()}
  stacked = lvm.hf.traverse_util.unflatten_dict(lvm.hf.stack_layers(
      {f'decoder/{k}': v for k, v in flat.items()}), sep='/')['decoder']
  mask = jnp.array([[True] * 10, [True] * 7 + [False] * 3])
  a = jax.jit(unrolled.apply)({'params': params}, x, attention_mask=mask)[0]
  b = jax.jit(_decoder(kv_heads=2, scan=True).apply)({'params': stacked}, x,
                                                    attention_mask=mask)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kv_heads_must_divide_heads():
  with pytest.raises(ValueError, match='multiple of kv_heads'):
    _decoder(kv_heads=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 32)))


def _decoder_grads(remat_policy, x, params):
  model = _decoder(2, remat_policy=remat_policy)
  loss = lambda p: jnp.sum(model.apply({'params': p}, x)[0] ** 2)
  return jax.jit(jax.grad(loss))(params)


@pytest.fixture(scope='module')
def no_remat_grads():
  """(input, params, gradients without remat), computed once for every policy's test."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 32)), jnp.float32)
  params = nn.unbox(jax.jit(_decoder(2).init)(jax.random.PRNGKey(0), x)['params'])
  return x, params, _decoder_grads('none', x, params)


@pytest.mark.parametrize('policy', sorted(set(layers.REMAT_POLICIES) - {'none'}))
def test_remat_policies_give_the_gradients_of_no_remat(policy, no_remat_grads):
  x, params, want = no_remat_grads
  got = _decoder_grads(policy, x, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), want, got)


def test_flash_policy_saves_cudnn_attention_outputs_and_dots():
  policy = layers.REMAT_POLICIES['dots_no_batch_flash']
  cudnn_fwd = jax.extend.core.Primitive('dot_product_attention_fwd_wrapper')
  assert policy(cudnn_fwd)
  assert not policy(jax.lax.exp_p, jax.ShapeDtypeStruct((4,), jnp.float32))


def _residual_names(policy, capsys) -> str:
  """What `jax.ad_checkpoint.print_saved_residuals` lists for a bf16 decoder under `policy`."""
  model = decoder_lib.Decoder(vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48,
                              scan_layers=False, remat_policy=policy, dtype=jnp.bfloat16)
  x = jnp.ones((2, 10, 32), jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(0), x)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda p: model.apply(p, x)[0].astype(jnp.float32).sum(), params)
  return capsys.readouterr().out


def test_activations_policy_saves_the_named_block_activations(capsys):
  names = ("named 'normed'", "named 'query'", "named 'key'", "named 'mlp_hidden'")
  saved = _residual_names('dots_flash_activations', capsys)
  assert all(n in saved for n in names), saved
  assert not any(n in _residual_names('dots_no_batch', capsys) for n in names)


@pytest.mark.parametrize('scan', [True, False], ids=['scanned', 'unrolled'])
def test_precast_weights_keeps_the_logits_and_float32_parameters(scan):
  """Casting the layers' weights once before the loop: same bf16 logits, same gradients up to
  where XLA rounds a weight gradient to bf16 (on CPU it can fold the per-layer cast away)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 32)), jnp.float32)
  kw = dict(vocab_size=64, width=32, depth=3, heads=4, kv_heads=2, mlp_dim=48, scan_layers=scan,
            remat_policy='dots_no_batch', dtype=jnp.bfloat16)
  per_layer = decoder_lib.Decoder(precast_weights=False, **kw)
  precast = decoder_lib.Decoder(precast_weights=True, **kw)
  params = per_layer.init(jax.random.PRNGKey(0), x)
  precast_params = precast.init(jax.random.PRNGKey(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, precast_params)
  assert {a.dtype for a in jax.tree.leaves(precast_params)} == {jnp.dtype(jnp.float32)}

  def loss_and_grads(model):
    loss = lambda p: jnp.square(model.apply(p, x)[0].astype(jnp.float32)).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  np.testing.assert_array_equal(jax.jit(per_layer.apply)(params, x)[0],
                                jax.jit(precast.apply)(params, x)[0])
  (want_loss, want), (got_loss, got) = loss_and_grads(per_layer), loss_and_grads(precast)
  assert want_loss == got_loss
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * float(np.abs(a).max()))


@pytest.mark.parametrize('scan,remat', [(True, 'dots_no_batch'),
                                        (False, 'dots_flash_activations')],
                         ids=['scanned', 'unrolled'])
def test_fused_projections_keep_the_parameters_logits_and_gradients(scan, remat):
  """q/k/v (grouped-query: 4 heads, 2 kv heads) and gate/up as one matmul each: the same
  parameter tree, the same logits and gradients as the separate projections (float32)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, 32)), jnp.float32)
  kw = dict(vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48, scan_layers=scan,
            remat_policy=remat)
  separate = decoder_lib.Decoder(fuse_projections=False, **kw)
  fused = decoder_lib.Decoder(fuse_projections=True, **kw)
  params = separate.init(jax.random.PRNGKey(0), x)
  fused_params = fused.init(jax.random.PRNGKey(0), x)
  jax.tree.map(np.testing.assert_array_equal, params, fused_params)

  def loss_and_grads(model):
    loss = lambda p: jnp.square(model.apply(p, x)[0]).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  dots = lambda model: str(jax.make_jaxpr(model.apply)(params, x)).count('dot_general')
  assert dots(separate) - dots(fused) == 3 * (1 if scan else 2)  # q/k/v: 3 -> 1, gate/up: 2 -> 1
  np.testing.assert_allclose(jax.jit(fused.apply)(params, x)[0],
                             jax.jit(separate.apply)(params, x)[0], rtol=1e-5, atol=1e-5)
  (want_loss, want), (got_loss, got) = loss_and_grads(separate), loss_and_grads(fused)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  got = traverse_util.flatten_dict(nn.unbox(got), sep='/')
  for path, a in traverse_util.flatten_dict(nn.unbox(want), sep='/').items():
    b = got[path]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()),
                               err_msg=path)


GEMMA2_LIKE = dict(vocab_size=64, width=32, depth=3, heads=4, kv_heads=2, mlp_dim=48,
                   head_dim=16, norm_offset=1.0, mlp_act='gelu_tanh', embed_scale=True,
                   tie_embeddings=True, sliding_window=4, global_every=2, post_norms=True,
                   query_scale=12.0, attn_softcap=1.0, final_softcap=2.0)


@pytest.mark.parametrize('softcap', [1.0, 0.0], ids=['softcapped', 'kernel'])
def test_windowed_cache_decode_equals_the_full_forward(softcap):
  """Token-by-token decoding through the KV cache (what lvm.generate runs) gives the logits
  of one forward over the sequence, with windowed and global layers, scanned or not."""
  kw = dict(GEMMA2_LIKE, attn_softcap=softcap)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
  scanned = decoder_lib.Decoder(**kw)
  params = nn.unbox(scanned.init(jax.random.PRNGKey(0), jnp.zeros((2, 12, 32)))['params'])
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  forward = lambda m, p, x: m.apply({'params': p}, x)[0]
  x = scanned.apply({'params': params}, ids, method='embed')
  full = forward(scanned, params, x)
  # The window matters here: without it the logits differ.
  no_window = decoder_lib.Decoder(**dict(kw, sliding_window=0))
  assert np.abs(forward(no_window, params, x) - full).max() > 1e-3
  cache = scanned.init_cache(2, 16)
  steps = []
  for i in range(12):
    logits, cache = scanned.apply({'params': params}, x[:, i:i + 1], cache=cache,
                                  cache_index=jnp.int32(i))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
  # Unrolled layers with the same weights: the per-layer window pattern is the same.
  unrolled = decoder_lib.Decoder(**dict(kw, scan_layers=False))
  flat = {f'decoder/{k}': np.asarray(v) for k, v in
          lvm.hf.traverse_util.flatten_dict(params, sep='/').items()}
  split = lvm.hf.traverse_util.unflatten_dict(lvm.hf.unstack_layers(flat), sep='/')['decoder']
  np.testing.assert_allclose(forward(unrolled, split, x), full, rtol=1e-5, atol=1e-5)
