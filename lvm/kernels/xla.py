"""The accelerator kernels: plain `dot_general` and `jax.nn.dot_product_attention`.

What 'auto' selects on GPU and TPU, whose compilers choose layouts and fusions well, and
whose dots remat policies see as dots. They run on the CPU too (the tests check them there
against the same references as the CPU kernels).
"""

import jax

from lvm import registry


@registry.MATMUL.register('xla')
def dense_matmul_xla(x, kernel, n_in: int):
  """Contracts the last `n_in` dims of x with the first `n_in` of kernel (one dot_general)."""
  contract = tuple(range(x.ndim - n_in, x.ndim))
  return jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())))


@registry.ATTENTION.register('xla')
def attention_xla(q, k, v, *, mask=None, is_causal=False):
  """jax.nn.dot_product_attention(implementation='xla'): the reference math."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation='xla')


# jax's own choice (implementation=None; 'xla' in jax 0.10). This was
# `attention_impl='auto'` before 'auto' came to mean the kernel for the backend.
@registry.ATTENTION.register('jax')
def attention_jax(q, k, v, *, mask=None, is_causal=False):
  """jax.nn.dot_product_attention(implementation=None)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


# cuDNN's flash attention takes these compute dtypes and head widths (a multiple of 8, at
# most 256 from Hopper on, 128 before); jax raises on anything else only when compiling.
_CUDNN_DTYPES = ('bfloat16', 'float16')
_CUDNN_MAX_HEAD_DIM = 256


def _head_dims(model) -> dict[str, int]:
  """Config key -> the head width the attention kernel sees, for both towers."""
  dims = {}
  v, d = model.vision, model.decoder
  if isinstance(v.get('width'), int) and isinstance(v.get('heads'), int) and v.heads > 0:
    dims['model.vision.heads'] = v.width // v.heads
  head_dim = d.get('head_dim') or (
      d.width // d.heads if isinstance(d.get('heads'), int) and d.heads > 0 else None)
  if isinstance(head_dim, int):
    dims['model.decoder.head_dim'] = head_dim
  return dims


def check_cudnn(config, problems: registry.Problems):
  """cuDNN flash attention needs a GPU, a 16-bit compute dtype and head widths it supports."""
  backend = jax.default_backend()
  if backend != 'gpu':
    problems.add('model.attention_impl', f"'cudnn' needs a GPU, but the backend is {backend!r}",
                 "use 'auto' (the CPU kernel on a CPU, 'xla' elsewhere) or 'xla'")
  if config.model.dtype not in _CUDNN_DTYPES:
    problems.add('model.attention_impl', f"'cudnn' runs only in {list(_CUDNN_DTYPES)}, but "
                 f'model.dtype is {config.model.dtype!r}',
                 "set model.dtype='bfloat16', or use attention_impl 'xla'")
  for key, dim in _head_dims(config.model).items():
    if dim % 8 or dim > _CUDNN_MAX_HEAD_DIM:
      problems.add(key, f"a head width of {dim} is not one cuDNN's flash attention takes "
                   f'(a multiple of 8, at most {_CUDNN_MAX_HEAD_DIM})',
                   "choose the heads so the head width fits, or use attention_impl 'xla'")


@registry.ATTENTION.register('cudnn', check=check_cudnn)
def attention_cudnn(q, k, v, *, mask=None, is_causal=False):
  """jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's flash attention."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation='cudnn')
