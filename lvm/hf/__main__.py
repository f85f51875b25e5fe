"""Command line for transformers interop.

  python -m lvm.hf import HF_DIR OUT_DIR         transformers LLaVA folder -> lvm checkpoint
  python -m lvm.hf export CKPT_DIR HF_DIR        lvm checkpoint / run workdir -> transformers
  python -m lvm.hf assemble VISION_DIR LLAMA_DIR OUT_DIR   CLIP/SigLIP + LLaMA, new projector
"""

import argparse
import sys

import jax
import numpy as np


def _count(params) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


def _describe(model_config) -> str:
  v, d = model_config.vision, model_config.decoder
  return (f'vision {v.kind} {v.depth}x{v.width} @{v.image_size}px/{v.patch_size}, '
          f'projector {model_config.projector.kind}, decoder llama {d.depth}x{d.width} '
          f'(heads {d.heads}, kv {d.kv_heads}, vocab {d.vocab_size})')


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m lvm.hf', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='transformers LLaVA folder -> lvm checkpoint folder')
  imp.add_argument('hf_dir')
  imp.add_argument('out_dir')
  exp = sub.add_parser('export', help='lvm checkpoint (or run workdir) -> transformers folder')
  exp.add_argument('ckpt_dir')
  exp.add_argument('hf_dir')
  asm = sub.add_parser('assemble', help='CLIP/SigLIP folder + LLaMA folder -> lvm checkpoint')
  asm.add_argument('vision_dir')
  asm.add_argument('llama_dir')
  asm.add_argument('out_dir')
  asm.add_argument('--projector', default='mlp2x_gelu')
  asm.add_argument('--feature_layer', type=int, default=-2)
  asm.add_argument('--seed', type=int, default=0)
  for p in (imp, asm):
    p.add_argument('--unscanned', action='store_true',
                   help='store layers as layers_0, layers_1, ... instead of stacked')
  args = parser.parse_args(argv)

  import lvm.hf  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  if args.command == 'export':
    model_config, params = lvm.hf.load_converted(args.ckpt_dir)
    lvm.hf.save(model_config, params, args.hf_dir)
    print(f'exported {_count(params):,} parameters ({_describe(model_config)}) '
          f'to {args.hf_dir}')
    return 0
  overrides = {'scan_layers': not args.unscanned}
  if args.command == 'import':
    model_config, params = lvm.hf.load(args.hf_dir, **overrides)
  else:
    model_config, params = lvm.hf.assemble(args.vision_dir, args.llama_dir,
                                           projector=args.projector,
                                           feature_layer=args.feature_layer, seed=args.seed,
                                           **overrides)
  lvm.hf.save_converted(args.out_dir, model_config, params)
  print(f'wrote {_count(params):,} parameters ({_describe(model_config)}) to {args.out_dir} '
        f'(state/ + config.json)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
