"""Command line for transformers interop.

  python -m lvm.hf import HF_DIR OUT_DIR         transformers LLaVA / LLaVA-NeXT / OneVision
                                                 folder -> lvm checkpoint
  python -m lvm.hf export CKPT_DIR HF_DIR        lvm checkpoint / run workdir -> transformers
                                                 (a LoRA run: adapters merged, or with
                                                 --adapters=DIR the base + a PEFT folder)
  python -m lvm.hf assemble VISION_DIR LLAMA_DIR OUT_DIR   CLIP/SigLIP + a decoder, new projector

`export` refuses a non-empty HF_DIR unless --overwrite (which replaces its model files as a
whole: old shards and index go; a tokenizer beside them stays).
"""

from absl import flags
import jax
import numpy as np

from lvm import cli

_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'export: replace the model files of a non-empty HF_DIR.')
_ADAPTERS = flags.DEFINE_string(
    'adapters', '', 'export of a LoRA run: write HF_DIR with the base weights (the modules '
    'trained in full included) and this folder with the adapters in PEFT format, which '
    'peft.PeftModel.from_pretrained loads onto HF_DIR. Default: adapters merged into HF_DIR.')
_UNSCANNED = flags.DEFINE_bool('unscanned', False, 'import/assemble: store layers as '
                               'layers_0, layers_1, ... instead of stacked.')
_PROJECTOR = flags.DEFINE_string('projector', 'mlp2x_gelu', 'assemble: projector kind.')
_FEATURE_LAYER = flags.DEFINE_integer('feature_layer', -2, 'assemble: vision hidden state.')
_SEED = flags.DEFINE_integer('seed', 0, 'assemble: projector initialization seed.')

# Subcommand -> its positional arguments.
COMMANDS = {'import': ('HF_DIR', 'OUT_DIR'), 'export': ('CKPT_DIR', 'HF_DIR'),
            'assemble': ('VISION_DIR', 'LLAMA_DIR', 'OUT_DIR')}


def _count(params) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


def _describe(model_config) -> str:
  v, d = model_config.vision, model_config.decoder
  a = model_config.anyres
  tiles = (f' {a.vision_aspect_ratio} on {len(a.pinpoints)} grids' if a.pinpoints else '')
  return (f'vision {v.kind} {v.depth}x{v.width} @{v.image_size}px/{v.patch_size}{tiles}, '
          f'projector {model_config.projector.kind}, decoder {d.kind} {d.depth}x{d.width} '
          f'(heads {d.heads}, kv {d.kv_heads}, vocab {d.vocab_size})')


def main(argv):
  args = argv[1:]
  if not args or args[0] not in COMMANDS or len(args) != len(COMMANDS[args[0]]) + 1:
    usage = '; '.join(f'{c} {" ".join(a)}' for c, a in COMMANDS.items())
    cli.fail(f'expected one of: {usage} (got {" ".join(args) or "nothing"})')
  command, paths = args[0], args[1:]

  import lvm.hf  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  if command == 'export':
    ckpt_dir, hf_dir = paths
    try:
      if _ADAPTERS.value:
        from lvm.hf import peft  # pylint: disable=g-import-not-at-top
        model_config, params = peft.export(ckpt_dir, hf_dir, _ADAPTERS.value,
                                           overwrite=_OVERWRITE.value)
        print(f'wrote the PEFT adapters to {_ADAPTERS.value}')
      else:
        model_config, params = lvm.hf.load_converted(ckpt_dir)
        lvm.hf.save(model_config, params, hf_dir, overwrite=_OVERWRITE.value)
    except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as e:
      cli.fail(str(e))
    print(f'exported {_count(params):,} parameters ({_describe(model_config)}) to {hf_dir}')
    return 0
  overrides = {'scan_layers': not _UNSCANNED.value}
  if command == 'import':
    hf_dir, out_dir = paths
    model_config, params = lvm.hf.load(hf_dir, **overrides)
  else:
    vision_dir, llama_dir, out_dir = paths
    model_config, params = lvm.hf.assemble(vision_dir, llama_dir, projector=_PROJECTOR.value,
                                           feature_layer=_FEATURE_LAYER.value,
                                           seed=_SEED.value, **overrides)
  lvm.hf.save_converted(out_dir, model_config, params)
  print(f'wrote {_count(params):,} parameters ({_describe(model_config)}) to {out_dir} '
        f'(state/ + config.json)')
  return 0


if __name__ == '__main__':
  cli.run(main)
