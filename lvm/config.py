"""The config schema: every field a run can set, with LLaVA-1.5 defaults.

Experiment configs (`configs/*.py`) derive from this one (`config = lvm.config.get_config();
config.model.decoder.depth = 2`) and every ablation is an override of it; a key that is not
here is an error (`lvm.validate`). `parse_arg` reads colon args such as
`--config=configs/llava15.py:size=7b,stage=finetune`.

Each dataset brings its own group, `config.data.<name>` (e.g. `config.data.shapes.train`),
whose defaults the dataset registers with `lvm.registry.DATASET`; this module only collects
them, so a new dataset adds its settings in its own module.
"""

import copy

import ml_collections

from lvm import registry

# Mean/std of the two tower families, in [0, 1] pixel units (CLIPImageProcessor,
# SiglipImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Logical axis name -> mesh axes. Parameters use embed/mlp/heads/kv_heads/vocab/...;
# activations use the act_* names so that they can be pinned independently.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_vocab', 'tensor'),
)


_TRUE, _FALSE = ('1', 'true', 'yes'), ('0', 'false', 'no')


def parse_arg(arg, lazy=False, **spec):
  """Parses `a=1,b=x` into a ConfigDict typed after the defaults in `spec`.

  A bare word with no `=` sets the first key of `spec` (`llava15.py:7b`). A boolean takes
  true/false/yes/no/1/0 (any case) and nothing else, so that a typo is not silently False.

  Raises:
    KeyError: an arg not in `spec` (unless `lazy`).
    ValueError: a value that does not parse as its default's type, naming the arg.
  """
  config = ml_collections.ConfigDict(spec)
  if not arg:
    return config
  first_key = next(iter(spec), None)
  for item in arg.split(','):
    if not item:
      continue
    key, sep, value = item.partition('=')
    if not sep:
      key, value = first_key, key
    if key not in spec and not lazy:
      raise KeyError(f'Unknown config arg {key!r}; known: {sorted(spec)}')
    default = spec.get(key)
    if isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f'Config arg {key}={value!r} is not a boolean; use one of '
                         f'{list(_TRUE + _FALSE)}')
      config[key] = value.lower() in _TRUE
    elif isinstance(default, (int, float)):
      try:
        config[key] = type(default)(value)
      except ValueError:
        raise ValueError(f'Config arg {key}={value!r} is not {type(default).__name__} (its '
                         f'default is {default!r})') from None
    else:
      config[key] = value
  return config


def vision_config(kind='clip', **overrides):
  """A vision tower config; defaults are CLIP ViT-L/14-336 (LLaVA-1.5)."""
  c = ml_collections.ConfigDict()
  c.kind = kind  # a registered vision tower (lvm.registry.VISION): clip | siglip
  c.image_size = 336
  c.patch_size = 14
  c.width = 1024
  c.depth = 24
  c.heads = 16
  c.mlp_dim = 4096
  c.norm_eps = 1e-5
  # Index into the hidden states (embeddings, layer 1, ..., layer depth), or a list of them to
  # concatenate; typed `object` so both `=-1` and `=[-3,-1]` work as overrides.
  c.feature_layer = ml_collections.FieldReference(-2, field_type=object)
  # patch: drop the class token (if any) | all | drop_first (HF 'default' on SigLIP)
  c.select = 'patch'
  c.update((registry.VISION.get(kind).defaults or dict)())  # what the kind sets otherwise
  c.update(overrides)
  return c


def decoder_config(kind='llama', **overrides):
  """A decoder config; defaults are Vicuna-7B v1.5 (LLaMA) with the llava-hf vocabulary, and
  what the family `kind` sets otherwise (registered with `lvm.registry.DECODER`)."""
  c = ml_collections.ConfigDict()
  c.kind = kind  # a registered decoder family: llama | qwen2 | qwen3 | mistral | gemma | gemma2
  c.vocab_size = 32064
  c.width = 4096
  c.depth = 32
  c.heads = 32
  c.kv_heads = 32
  c.head_dim = 0  # 0: width // heads
  c.mlp_dim = 11008
  c.rope_theta = 10000.0
  # None, or {'type': 'linear' | 'dynamic' | 'yarn' | 'llama3', ...its keys}: see
  # lvm/models/rope.py for each type's keys.
  c.rope_scaling = ml_collections.config_dict.placeholder(dict)
  c.norm_eps = 1e-5
  c.tie_embeddings = False
  c.qk_norm = False  # RMSNorm on each head's query and key (Qwen3-style); LLaMA has none
  c.attention_bias = False  # biases on the q/k/v projections (Qwen2)
  c.norm_offset = 0.0  # RMSNorm scale (offset + w): Gemma's (1 + w) is 1.0
  c.mlp_act = 'silu'  # the gate's activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
  c.embed_scale = False  # token embeddings x sqrt(width) (Gemma)
  c.query_scale = 0.0  # attention logits / sqrt(query_scale); 0: head_dim (Gemma 2: 256)
  c.attn_softcap = 0.0  # attention logits c * tanh(logits / c); 0: off (Gemma 2: 50)
  c.final_softcap = 0.0  # output logits c * tanh(logits / c); 0: off (Gemma 2: 30)
  c.sliding_window = 0  # attend to at most this many latest tokens (itself included); 0: off
  # With a window: layer i attends globally iff (i + 1) % global_every == 0 (Gemma 2: 2);
  # 0: every layer slides (Mistral).
  c.global_every = 0
  c.post_norms = False  # RMSNorm on the attention and MLP outputs too (Gemma 2)
  c.update((registry.DECODER.get(kind).defaults or dict)())  # what the family sets otherwise
  c.update(overrides)
  return c


def projector_config(kind='mlp2x_gelu', **overrides):
  c = ml_collections.ConfigDict()
  c.kind = kind  # linear | mlp{k}x_gelu | downsample_mlp | identity
  c.bias = True
  c.update(overrides)
  return c


def get_config(arg=None):
  """The full config tree with LLaVA-1.5-7B stage-2 defaults (locked: no new keys)."""
  del arg
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.vision = vision_config()
  config.model.projector = projector_config()
  config.model.decoder = decoder_config()
  # High resolution (LLaVA-NeXT / OneVision, lvm.models.anyres_model): images tiled on the
  # grids `pinpoints` ([height, width] pairs in pixels, multiples of vision.image_size; empty:
  # a fixed-size model); 'anyres' (LLaVA-NeXT) or 'anyres_max_N' (OneVision: features
  # downscaled past N tiles' worth); max_tiles: grid tiles per image slot besides the base
  # tile (0: the most any pinpoint grid needs).
  config.model.anyres = ml_collections.ConfigDict()
  config.model.anyres.pinpoints = []
  config.model.anyres.vision_aspect_ratio = 'anyres'
  config.model.anyres.max_tiles = 0
  config.model.image_token_id = 32000
  config.model.pad_token_id = 32001
  config.model.dtype = 'bfloat16'  # compute
  config.model.param_dtype = 'float32'  # storage
  config.model.scan_layers = True
  config.model.remat_policy = 'none'  # layers.REMAT_POLICIES: none | full | dots | ...
  # The kernels (lvm/kernels, registry.ATTENTION / MATMUL). 'auto' resolves once, in
  # lvm.models.build, from the default device's backend: the CPU custom-VJP kernels ('cpu')
  # on a CPU, 'xla' elsewhere. Attention: auto | cpu | xla | cudnn (flash, GPU, bf16/fp16)
  # | jax (jax.nn picks). Matmul: auto | cpu | xla (dot_general).
  config.model.attention_impl = 'auto'
  config.model.matmul_impl = 'auto'
  # Cast the decoder layers' weights to `dtype` once before the layer loop, not in every layer
  # (and again in the remat recompute). Same forward values; costs a `dtype` copy of them.
  config.model.precast_weights = True
  # The decoder's q/k/v projections as one matmul, and gate/up as another, over their kernels
  # concatenated at compute time (parameters and checkpoints unchanged): wider GEMMs.
  config.model.fuse_projections = False

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'llava_json'  # a registry.DATASET name: shapes | llava_json
  config.data.data_dir = ''  # TFDS data_dir ('' = the TFDS default)
  config.data.manual_dir = ''  # TFDS manual dir (llava_json: the JSON file(s) and images)
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.test_split = 'test'
  config.data.template = 'vicuna_v1'  # a registry.TEMPLATE name (docs/data.md, Templates)
  # The template's system prompt: None = its own (LLaVA's), '' = none, or any text. Training,
  # evaluation and generation all render with it.
  config.data.system_prompt = ml_collections.FieldReference(None, field_type=str)
  # Training split only: records with a caption get a last turn, this prompt answered by the
  # caption ('' = off). A dense target beside short answers (see configs/shapes.py).
  config.data.caption_prompt = ''
  config.data.tokenizer = ''  # path to tokenizer.model or tokenizer.json ('' = the dataset's own)
  config.data.seq_len = 2048
  config.data.max_images = 1  # images per sample (padded); more are dropped and counted
  config.data.image_aspect = 'pad'  # pad | resize
  # Anyres models (model.anyres.pinpoints set): each batch's tiles per image T is 'bucket'
  # (the most its images need, rounded up to a power of two, capped at the maximum: a few
  # compiled shapes) or 'max' (always 1 + the most grid tiles: one shape, more tower work).
  config.data.anyres_tiles = 'bucket'
  config.data.image_mean = CLIP_MEAN
  config.data.image_std = CLIP_STD
  config.data.shuffle_seed = 0
  config.data.num_workers = 0  # host-side parallel preprocessing workers
  config.data.prefetch = 2
  # Who runs the per-row work (read, decode, preprocess, tokenize, pack): 'threads'
  # (num_workers threads) or 'grain' (num_workers grain worker processes; same batches,
  # lvm.data.grain_rows).
  config.data.loader = 'threads'
  # Training split only. Several samples per row, attention kept within each
  # (lvm.data.packing); pack_max_images: image slots per packed row (0: as many images as
  # data.seq_len holds tokens for, at least data.max_images).
  config.data.packing = False
  config.data.pack_max_images = 0
  # LLaVA's --group_by_modality_length (lvm.data.length_groups): the alternative to packing.
  config.data.group_by_modality_length = False
  # Training split only: read the frozen tower's features from this cache (built by
  # `python -m lvm.features_cache`, lvm.data.feature_cache) instead of running the tower
  # ('' = run it). Refused when the tower trains or the cache was made for another config.
  config.data.vision_features_cache = ''
  # Training split only: a weighted mixture of datasets, each source a dict {'dataset',
  # 'weight', optional 'name', overrides of data_dir / manual_dir / train_split / dataset
  # group fields} (lvm.data.mixture; docs/data.md). () = config.data.dataset alone.
  config.data.mixture = ()
  _dataset_groups(config.data)

  config.train = ml_collections.ConfigDict()
  config.train.stage = 'finetune'  # pretrain | finetune | full | custom
  config.train.trainable = ''  # regex over '/'-joined param paths (used when stage=custom)
  config.train.batch_size = 128  # global
  config.train.grad_accum_steps = 1
  config.train.num_epochs = 1.0
  config.train.num_steps = -1  # > 0 overrides num_epochs
  config.train.seed = 0
  config.train.log_every = 10
  config.train.eval_every = 0  # 0: only at the end
  config.train.eval_batches = -1  # -1: the whole eval split
  # Generation-based benchmarks scored every eval_every steps and at the end (lvm.evaluate,
  # sharded like inference), e.g. ('pope=/data/pope', 'textvqa=/data/textvqa'); each entry
  # is NAME[:SPLIT][=DATA_DIR]. Scores go to metrics.jsonl as split 'bench/NAME'.
  config.train.eval_benchmarks = ()
  config.train.eval_benchmark_questions = 200  # the first N questions of each (0: all)
  config.train.eval_benchmark_batch_size = 16
  config.train.z_loss = 0.0
  # > 0: the LM head runs only at each row's first P supervised positions (image and prompt
  # positions need no logits); P must cover the longest row's supervised tokens, or the run
  # stops. 0: logits at every position.
  config.train.max_scored_tokens = 0
  config.train.profile_steps = ()  # e.g. (10, 12): jax.profiler trace of those steps
  # Frozen Dense kernels stored as 'int8' or 'int4' (absmax per channel; lvm.quantize).
  config.train.frozen_quantization = 'none'  # none | int8 | int4

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'
  config.optimizer.lr = 2e-5
  config.optimizer.schedule = 'cosine'  # cosine | linear | constant
  config.optimizer.warmup_steps = 0
  config.optimizer.warmup_ratio = 0.03
  config.optimizer.end_lr_ratio = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.clip_norm = 1.0  # 0: off
  config.optimizer.module_lr = ml_collections.ConfigDict()  # e.g. {'multi_modal_projector': 1e-4}

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.rules = DEFAULT_RULES

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.interval = 1000
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True

  config.init = ml_collections.ConfigDict()
  config.init.kind = 'random'  # random | hf | hf_parts | checkpoint
  config.init.path = ''  # hf: LLaVA folder; checkpoint: a run's workdir or checkpoint dir
  config.init.vision_path = ''  # hf_parts: CLIP/SigLIP folder
  config.init.decoder_path = ''  # hf_parts: LLaMA folder

  # LoRA (lvm/lora.py): low-rank adapters beside the Dense layers whose module path matches
  # `targets`; base weights frozen (no optimizer state). Trainable: the adapters and the
  # `train_full` parameters, within the stage's trainable set.
  config.lora = ml_collections.ConfigDict()
  config.lora.enable = False
  config.lora.targets = r'^decoder/layers(_\d+)?/(self_attn|mlp)/\w+_proj$'  # re.search
  config.lora.rank = 8
  config.lora.alpha = 16.0  # scale alpha / rank (rslora: alpha / sqrt(rank))
  config.lora.dropout = 0.0  # on the adapter's input, in training only
  config.lora.rslora = False
  config.lora.train_full = '^projector/'  # trained in full beside the adapters ('' = none)
  config.lora.save_base = False  # checkpoints hold only what trains; the base is config.init's

  config.lock()  # A mistyped key in a config file fails here, not silently later.
  return config


# Keys of configs saved before the dataset settings had groups of their own (checkpoints'
# config.json): old `config.data.` key -> (group, key).
_MOVED = {**{f'shapes_{k}': ('shapes', k) for k in ('train', 'validation', 'test', 'seed',
                                                     'image_size', 'turns', 'vocab_size')},
          **{k: ('llava_json', k) for k in ('json_files', 'image_folder', 'validation_fraction')}}


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved config in today's layout: moved data keys go to their dataset's group.

  For configs read back from a run (e.g. `lvm.checkpoint.load_config`) that were written
  before `config.data.shapes.*` / `config.data.llava_json.*`; a current config is returned
  as is (copied). Groups the saved config lacks get their registered defaults.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  data = config.get('data')
  if data is not None:
    for kind in registry.DATASET.kinds():
      if kind.defaults is not None and kind.name not in data:
        data[kind.name] = ml_collections.ConfigDict(kind.defaults())
    for old, (group, key) in _MOVED.items():
      if old in data:
        data[group][key] = data[old]
        del data[old]
  _add_missing(config, get_config())
  return config


def _add_missing(config, defaults):
  """Gives `config` every key of `defaults` it lacks (keys added to the schema after the
  config was saved), leaving the keys it has as they are."""
  for key in defaults.keys():
    if key not in config:
      config[key] = copy.deepcopy(defaults[key])
    elif (isinstance(defaults[key], ml_collections.ConfigDict)
          and isinstance(config[key], ml_collections.ConfigDict)):
      _add_missing(config[key], defaults[key])


def _dataset_groups(data):
  """Adds `data.<name>`, each registered dataset's own settings, with its defaults."""
  for kind in registry.DATASET.kinds():
    if kind.defaults is None:
      continue
    if kind.name in data:
      raise ValueError(f'dataset {kind.name!r} cannot bring a config group: config.data.'
                       f'{kind.name} is already a field of config.data')
    data[kind.name] = ml_collections.ConfigDict(kind.defaults())
