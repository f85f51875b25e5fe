"""transformers interop: import and export LLaVA checkpoints, assemble a new LLaVA.

  model_config, params = lvm.hf.load(HF_DIR)          # a Llava / LlavaNext / LlavaOnevision
                                                       # ...ForConditionalGeneration folder
  model_config, params = lvm.hf.assemble(CLIP_DIR, LLAMA_DIR)  # fresh projector (stage 1)
  lvm.hf.save(model_config, params, HF_DIR)            # loads with from_pretrained

Params are nested dicts of host numpy arrays in the layout `lvm.models.build(model_config)`
expects (scanned `layers` or unscanned `layers_i`, per `model_config.scan_layers`).
Only safetensors are read or written; pickled weights are refused.
"""

import json

from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lvm import config as lvm_config
from lvm.hf import configs as hf_configs
from lvm.hf import io
from lvm.hf import keymap
from lvm.models.layout import stack_layers, unstack_layers

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'


def read_config(folder: str) -> dict:
  path = epath.Path(folder) / CONFIG_FILE
  if not path.exists():
    raise ValueError(f'No {CONFIG_FILE} in {folder!r}: not a transformers checkpoint folder')
  return json.loads(path.read_text())


def abstract_params(model_config, scan_layers: bool | None = None) -> dict:
  """See `lvm.models.abstract_params`."""
  import lvm.models  # pylint: disable=g-import-not-at-top
  return lvm.models.abstract_params(model_config, scan_layers)


def params_from_tensors(tensors: dict, model_config, canonical, parts=None) -> dict:
  """Checkpoint tensors -> flat unscanned lvm params for `parts` of the model.

  Args:
    tensors: checkpoint name -> array.
    model_config: the lvm `config.model` the params are for.
    canonical: maps a checkpoint name to (part, name) or None (see `keymap`).
    parts: the model parts to fill ('vision', 'projector', 'decoder'); default all.

  Raises:
    ValueError: a missing parameter, an unexpected tensor, or a shape mismatch.
  """
  parts = set(parts or ('vision', 'projector', 'decoder', 'image_newline'))
  by_name = {}
  for key, value in tensors.items():
    c = canonical(key)
    if c is not None:
      by_name[c] = (key, value)
  import lvm.models  # pylint: disable=g-import-not-at-top
  param_dtype = np.dtype(lvm.models.dtype(model_config.param_dtype))
  out, used, missing = {}, set(), []
  for path, shape in abstract_params(model_config, scan_layers=False).items():
    if path.split('/')[0] not in parts:
      continue
    part, name, transform, n_in = keymap.hf_name(path)
    if (part, name) not in by_name:
      missing.append(f'{part}:{name}')
      continue
    key, value = by_name[(part, name)]
    try:
      out[path] = keymap.to_lvm(np.asarray(value), transform, n_in, shape.shape).astype(param_dtype)
    except ValueError as e:
      raise ValueError(f'Tensor {key!r} for lvm param {path!r}: {e}') from None
    used.add((part, name))
  if missing:
    raise ValueError(f'{len(missing)} parameter(s) missing from the checkpoint: '
                     f'{", ".join(missing[:10])}')
  wanted = parts | ({'lm_head'} if 'decoder' in parts else set())
  unexpected = sorted(
      key for (part, name), (key, _) in by_name.items()
      if part in wanted and (part, name) not in used and not keymap.is_ignored(part, name)
      and not (part == 'lm_head' and model_config.decoder.tie_embeddings))
  if unexpected:
    raise ValueError(f'{len(unexpected)} checkpoint tensor(s) have no place in the lvm model '
                     f'(config mismatch?): {", ".join(unexpected[:10])}')
  return out


def _finish(flat: dict, model_config) -> dict:
  if model_config.scan_layers:
    flat = stack_layers(flat)
  return traverse_util.unflatten_dict(flat, sep='/')


def load(hf_dir: str, **overrides):
  """A transformers LLaVA folder (config.json + *.safetensors) -> (model_config, params).

  Args:
    hf_dir: folder written by `save_pretrained` of `LlavaForConditionalGeneration`,
      `LlavaNextForConditionalGeneration` or `LlavaOnevisionForConditionalGeneration` (any
      of the key layouts in `lvm.hf.keymap`); the last two give an anyres model.
    **overrides: `config.model` keys to set, e.g. dtype='bfloat16', scan_layers=False.

  Returns:
    (lvm `config.model` ConfigDict, nested dict of numpy params).
  """
  cfg = read_config(hf_dir)
  if cfg.get('model_type') in hf_configs.ANYRES_ARCHITECTURES:
    model_config = hf_configs.anyres_from_hf(cfg, **overrides)
  else:
    model_config = hf_configs.llava_from_hf(cfg, **overrides)
  flat = params_from_tensors(io.read_folder(hf_dir), model_config, keymap.canonical_llava)
  return model_config, _finish(flat, model_config)


def to_tensors(model_config, params) -> dict[str, np.ndarray]:
  """lvm params -> transformers tensors in the llava-hf key layout."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  flat = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
  if any('/layers/' in k for k in flat):
    flat = unstack_layers(flat)
  prefix = {'vision': 'vision_tower.vision_model.', 'projector': 'multi_modal_projector.',
            'decoder': 'language_model.model.', 'lm_head': 'language_model.',
            'image_newline': ''}
  tensors = {}
  for path, value in flat.items():
    part, name, transform, n_in = keymap.hf_name(path)
    tensors[prefix[part] + (name if part != 'lm_head' else 'lm_head.weight')] = keymap.to_hf(
        value, transform, n_in)
  if model_config.vision.kind == 'siglip':
    # transformers' SigLIP tower always has post_layernorm (for its pooled output, which
    # LLaVA never reads); write an identity so from_pretrained finds every weight.
    width = model_config.vision.width
    dtype = tensors[prefix['vision'] + 'embeddings.patch_embedding.weight'].dtype
    tensors[prefix['vision'] + 'post_layernorm.weight'] = np.ones(width, dtype)
    tensors[prefix['vision'] + 'post_layernorm.bias'] = np.zeros(width, dtype)
  return tensors


# A transformers folder's model files (weights of every format, their indexes, the model
# config); `save(..., overwrite=True)` replaces exactly these and keeps the rest (tokenizer).
MODEL_FILE_PATTERNS = ('config.json', 'generation_config.json', '*.safetensors',
                       '*.safetensors.index.json', 'pytorch_model*.bin', '*.bin.index.json',
                       'tf_model*.h5', 'flax_model*.msgpack')


def _model_files(folder: epath.Path) -> list[epath.Path]:
  return sorted({p for pattern in MODEL_FILE_PATTERNS for p in folder.glob(pattern)})


def save(model_config, params, hf_dir: str, overwrite: bool = False):
  """Writes a folder that `LlavaForConditionalGeneration.from_pretrained` loads (anyres
  models: `LlavaNextForConditionalGeneration`, or `LlavaOnevisionForConditionalGeneration`
  for 'anyres_max_N').

  Args:
    model_config: the lvm `config.model`.
    params: its parameters (any placement).
    hf_dir: the folder; created if missing.
    overwrite: replace the model files of a non-empty `hf_dir` as a whole (old shards and
      index included; other files such as a tokenizer stay). Without it a non-empty
      folder is refused.

  Raises:
    FileExistsError: `hf_dir` is not empty and `overwrite` is False.
  """
  import lvm.models  # pylint: disable=g-import-not-at-top
  hf_dir = epath.Path(hf_dir)
  if hf_dir.exists() and any(hf_dir.iterdir()) and not overwrite:
    raise FileExistsError(f'{hf_dir} is not empty; pass --overwrite (overwrite=True) to replace '
                          'its model files, or choose an empty or new folder.')
  if model_config.anyres.pinpoints:
    hf_config = hf_configs.anyres_to_hf(model_config)
  else:
    hf_config = hf_configs.llava_to_hf(model_config)
    hf_config['image_seq_length'] = lvm.models.num_image_tokens(model_config)
  # Written beside the target first, so a failed export leaves the old model whole.
  staging = hf_dir.parent / f'.{hf_dir.name}.export-tmp'
  if staging.exists():
    staging.rmtree()
  staging.mkdir(parents=True)
  io.write_file(str(staging / WEIGHTS_FILE), to_tensors(model_config, params),
                metadata={'format': 'pt'})
  (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
  hf_dir.mkdir(parents=True, exist_ok=True)
  for old in _model_files(hf_dir):
    old.unlink()
  for new in staging.iterdir():
    new.rename(hf_dir / new.name)
  staging.rmtree()


def _mean_resize(embedding: np.ndarray, rows: int) -> np.ndarray:
  """Grows an embedding/lm-head matrix [V, D] to `rows`, new rows at the mean (as LLaVA does)."""
  extra = rows - embedding.shape[0]
  if extra < 0:
    raise ValueError(f'vocab_size {rows} is smaller than the LLaMA vocabulary '
                     f'({embedding.shape[0]})')
  mean = embedding.astype(np.float32).mean(axis=0, keepdims=True).astype(embedding.dtype)
  return np.concatenate([embedding, np.repeat(mean, extra, axis=0)])


def assemble(vision_dir: str, llama_dir: str, *, projector: str = 'mlp2x_gelu',
             feature_layer=-2, select: str | None = None, image_token_id: int | None = None,
             pad_token_id: int | None = None, vocab_size: int | None = None, seed: int = 0,
             **overrides):
  """A new LLaVA from a CLIP/SigLIP folder and a LLaMA folder, with a fresh projector.

  Defaults follow llava-hf: the image token is appended after the LLaMA vocabulary
  (32000 for Vicuna), the pad token after it, and the vocabulary rounded up to a
  multiple of 64 (32064); new embedding rows start at the mean embedding.

  Args:
    vision_dir: CLIPVisionModel / CLIPModel / SiglipVisionModel / SiglipModel folder.
    llama_dir: a decoder folder of any family `lvm.hf.configs.decoder_from_hf` reads
      (LlamaForCausalLM, Qwen2/Qwen3/Mistral/Gemma/Gemma2ForCausalLM).
    projector: projector kind (lvm.models.projector).
    feature_layer: vision hidden state(s) to use, as in transformers.
    select: 'patch' | 'all' | 'drop_first' (default: 'patch').
    image_token_id, pad_token_id, vocab_size: see above.
    seed: projector initialization seed.
    **overrides: other `config.model` keys (dtype, scan_layers, ...).

  Returns:
    (model_config, params).
  """
  from lvm.models.projector import Projector  # pylint: disable=g-import-not-at-top
  vision_cfg = read_config(vision_dir)
  vision = hf_configs.vision_from_hf(vision_cfg, feature_layer, 'default')
  vision.select = select or 'patch'
  llama_cfg = read_config(llama_dir)
  decoder = hf_configs.decoder_from_hf(llama_cfg)
  base_vocab = decoder.vocab_size
  image_token_id = base_vocab if image_token_id is None else image_token_id
  pad_token_id = image_token_id + 1 if pad_token_id is None else pad_token_id
  if vocab_size is None:
    needed = max(base_vocab, image_token_id + 1, pad_token_id + 1)
    vocab_size = needed if needed == base_vocab else -(-needed // 64) * 64
  decoder.vocab_size = vocab_size
  model_config = hf_configs.model_config(
      vision, lvm_config.projector_config(projector), decoder, image_token_id,
      pad_token_id, **overrides)

  flat = params_from_tensors(io.read_folder(vision_dir), model_config, keymap.canonical_vision,
                             parts=('vision',))
  llama_tensors = dict(io.read_folder(llama_dir))
  for key in ('model.embed_tokens.weight', 'lm_head.weight'):
    if key in llama_tensors:
      llama_tensors[key] = _mean_resize(np.asarray(llama_tensors[key]), vocab_size)
  flat.update(params_from_tensors(llama_tensors, model_config, keymap.canonical_llama,
                                  parts=('decoder',)))
  import lvm.models  # pylint: disable=g-import-not-at-top
  vision_tower = lvm.models.build(model_config).vision
  proj = Projector(kind=projector, width=decoder.width, bias=model_config.projector.bias,
                   param_dtype=lvm.models.dtype(model_config.param_dtype))
  feats = jnp.zeros((1, vision_tower.num_tokens, vision_tower.out_features), jnp.float32)
  proj_params = nn.unbox(proj.init(jax.random.PRNGKey(seed), feats)['params'])
  for path, value in traverse_util.flatten_dict(proj_params, sep='/').items():
    flat[f'projector/{path}'] = np.asarray(value)
  return model_config, _finish(flat, model_config)


def config_to_json(model_config) -> str:
  """The full lvm config (common defaults, this model) as JSON."""
  config = lvm_config.get_config()
  config.model = model_config
  return config.to_json_best_effort(indent=2)


def save_converted(out_dir: str, model_config, params):
  """Writes (model_config, params) as one lvm checkpoint step folder, through lvm.checkpoint.

  The layout is `lvm.checkpoint.save_params`'s: `out_dir/state` (`{'params': ...}`) and
  `out_dir/config` (the full lvm config), plus a readable copy at `out_dir/config.json`.
  So `lvm.checkpoint.load_params(out_dir)`, `config.init.kind='checkpoint'` with
  `config.init.path=out_dir`, generation and evaluation all read it.
  """
  from lvm import checkpoint  # pylint: disable=g-import-not-at-top
  text = config_to_json(model_config)
  config = ml_collections.ConfigDict(json.loads(text))
  out = checkpoint.save_params(out_dir, config, nn.unbox(params))
  (out / CONFIG_FILE).write_text(text)


def load_converted(path: str, log=print, merge_adapters: bool = True):
  """(model_config, params) from `save_converted`'s folder or any lvm training checkpoint.

  Args:
    path: an imported folder, a run's workdir (its newest checkpoint that restores), its
      `checkpoints/` folder or a step folder.
    log: where a skipped (corrupt) newest checkpoint is reported.
    merge_adapters: for a LoRA run, each adapted kernel `W + scale * A @ B` (the model
      without adapters that gives the same logits); False: the base weights, adapters
      dropped (write them with `lvm.hf.peft.save`).

  Returns:
    (lvm `config.model`, nested dict of numpy params, without adapters).
  """
  from lvm import checkpoint  # pylint: disable=g-import-not-at-top
  from lvm import lora  # pylint: disable=g-import-not-at-top
  config, params = checkpoint.load_params(path, log=log)
  model_config = config.model if 'model' in config else config
  params = jax.tree.map(np.asarray, params)
  s = lora.spec(config)
  if s is not None:
    params = lora.merge(params, s) if merge_adapters else lora.strip(params)
  return model_config, params


__all__ = ['load', 'assemble', 'save', 'save_converted', 'load_converted', 'to_tensors',
           'params_from_tensors', 'stack_layers', 'unstack_layers']
