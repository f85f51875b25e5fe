#!/usr/bin/env bash
# The GPU measurements still owed (docs/performance.md, "Next GPU session"), as one device
# call: each part in its own processes with its own time limit, reports under $OUT (the
# device tool's folder; ./gpu_out elsewhere), the short tables last.
#
#   bash benchmarks/gpu_session.sh generate train7b      # parts in the order given
#
# Parts, with the device seconds each is expected to take:
#   generate  lvm vs transformers' generate on the evaluation workload: LLaVA-1.5-7B shapes,
#             random bf16 weights, 627-token prompts (576 image tokens), batch 1/8/32/64 x
#             16/128 new tokens, questions/s and TTFT (~300 s)
#   static    the same against transformers' static cache, batch 1 and 32, 128 tokens (~300 s)
#   train7b   LLaVA-1.5-7B stage-2 steps on one card: remat full at batch 6 and 4, saved dots
#             at batch 2, and at batch 4 without the bf16 weight copy (~4 x 100 s)
#   infer7b   time to first token (image + 64-token prompt), batch-1 decode against its
#             bandwidth roofline, scanned and unrolled (~3 x 70 s)
#   train2b   the fastest H100 setting (53.5% MFU there) on this card (~100 s)
#   packed    train2b beside the same step on packed LLaVA-665K-like rows, with cuDNN's and
#             XLA's attention, MFU on the real tokens (~3 x 100 s)
#   next      a LLaVA-NeXT-shaped 2.4 B stage 2 (anyres tiles, 4096-token rows, tower
#             trained), MFU on the images' own tiles (~120 s)
#
# The GPU image has no ml-collections: carry it as a wheel. Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
# then the device call: command "bash benchmarks/gpu_session.sh generate train7b",
# carry [".whl"], a timeout that leaves room to rerun (the device README).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw \
    --format=csv > "$OUT/nvidia_smi.csv" 2>&1
python3 -c 'import jax, torch, transformers; print("jax", jax.__version__, "torch",
torch.__version__, "transformers", transformers.__version__, jax.devices())' \
    | tee "$OUT/versions.txt"

suite() {  # suite NAME,NAME,... LIMIT_S
  python3 -m benchmarks.gpu_suite --only="$1" --out="$OUT/suite" --timeout="$2" \
      | tee -a "$OUT/suite.txt"
}

for part in "$@"; do
  start=$(date +%s)
  case "$part" in
    generate)
      timeout 540 python3 benchmarks/generate_speed.py --size=7b --batches=1,8,32,64 \
          --new_tokens=16,128 --new_token_buckets=128 --repeats=2 \
          --out="$OUT/generate_7b.json" 2>"$OUT/generate_7b.log" | tee "$OUT/generate_7b.txt" ;;
    static)
      timeout 540 python3 benchmarks/generate_speed.py --size=7b --batches=1,32 \
          --new_tokens=128 --new_token_buckets=128 --repeats=2 --hf_cache=dynamic,static \
          --out="$OUT/generate_7b_static.json" 2>"$OUT/generate_7b_static.log" \
          | tee "$OUT/generate_7b_static.txt" ;;
    train7b)
      suite train_7b_full_b6,train_7b_full_b4,train_7b_flash_b2,train_7b_flash_b4_nocast 240 ;;
    infer7b)
      suite prefill_7b_cublas,decode_7b_cublas,decode_7b_unscanned_cublas 200 ;;
    train2b)
      suite train_2b 300 ;;
    packed)
      suite train_2b,train_2b_packed,train_2b_packed_xla_attention 240 ;;
    next)
      suite train_2b_next 300 ;;
    *)
      echo "unknown part '$part': generate, static, train7b, infer7b, train2b, packed," \
           "next" >&2; exit 2 ;;
  esac
  echo "== $part: $(( $(date +%s) - start )) s" | tee -a "$OUT/parts.txt"
done
