#!/usr/bin/env bash
# Everything a session with one CUDA GPU should run, in one short command (about 6-8 minutes on an H100/H200):
#
#   1. the GPU figures of issue 7: GPT-2-small size (124M, seq 1024, batch 16, bf16 autocast, compiled) tokens/s
#      and MFU, ours against transformers' LlamaForCausalLM with its best settings (bf16, sdpa, compiled, fused
#      AdamW), side by side in one process (bench/train_throughput.py --preset gpt2-small);
#   2. the same size through `pretrain train` itself (bench/trainer_mfu.py: the trainer's own logged tokens/s
#      and MFU, prefetching loader, clipping and metrics included);
#   3. images: ViT-B/16 MAE at 224 px through `pretrain train` (bench/image_trainer.py: images/s and MFU) and
#      our ViT-B/16 against transformers' in one process (bench/image_throughput.py --preset vit-b16);
#   4. the GPU test suite (pytest -m gpu): bf16 + compiled training, MFU logging, resume, eval/generate/
#      fill-mask/embed/export/finetune on the GPU vs the CPU, DDP/FSDP on NCCL, the bench's CUDA path.
#
# Results go to $OUT (default ./gpu_out): throughput_gpt2_small.json (+ .log), trainer_mfu.json (+ .log),
# image_trainer.json, image_throughput.json (+ .log),
# pytest_gpu.log, env.txt.
# Needs torch with CUDA, transformers, tokenizers, safetensors, pyarrow, pyyaml, pytest; runs from a checkout
# without installing it (PYTHONPATH). `bash bench/gpu_check.sh --smoke` runs the same steps at a tiny size on
# whatever device there is (a CPU too), to check the script itself.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0

if [[ "${1:-}" == "--smoke" ]]; then
    device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    size=(--d-model 64 --n-layer 2 --n-head 2 --seq-len 32 --batch-size 2 --vocab 128 --steps 1 --rounds 2
          --warmup 1 --device "$device")
    trainer=(--config configs/tiny.yaml --vocab 0 --steps 30 --batch-size 4 --device "$device")
    images=(--config configs/vit-mae-cpu.yaml --size 28 --channels 1 --images 128 --steps 8 --log-interval 2
            --set train.batch_size=16 --device "$device")
    img_pair=(--device "$device" --only vit --steps 1 --rounds 2 --warmup 1 --batch-size 4)
else
    size=(--preset gpt2-small --device cuda)
    trainer=(--device cuda)  # configs/gpt2-small.yaml, vocab 50304, batch 16 x 1024, 60 steps
    images=(--device cuda)   # configs/vit-b16-mae.yaml, micro-batch 256, 60 steps
    img_pair=(--device cuda --preset vit-b16 --compile --rounds 4)
fi

"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >>"$OUT/env.txt" 2>/dev/null || true

echo "== 1. training throughput, ours vs transformers Llama (bf16, compiled both sides)"
timeout 330 "$PY" bench/train_throughput.py "${size[@]}" --only gpt --dtype bf16 --compile --hf-compile --json \
    >"$OUT/throughput_gpt2_small.json" 2> >(tee "$OUT/throughput_gpt2_small.log" >&2) || status=1
"$PY" - "$OUT/throughput_gpt2_small.json" <<'EOF' || status=1
import json, sys
r = json.load(open(sys.argv[1]))
g = r["gpt"]
print(f"ours {g['ours_tok_s']:,.0f} tok/s, HF {g['hf_tok_s']:,.0f} tok/s, ratio {g['ratio']:.3f} "
      f"(median {g['ratio_median']:.3f}); MFU ours {g.get('ours_mfu')}, HF {g.get('hf_mfu')}")
EOF

echo "== 2. the trainer: pretrain train at the same size"
timeout 240 "$PY" bench/trainer_mfu.py "${trainer[@]}" --json \
    >"$OUT/trainer_mfu.json" 2> >(tee "$OUT/trainer_mfu.log" >&2) || status=1
"$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); print('pretrain train:', r['tok_s_median'], 'tok/s',
'(median), MFU', r['mfu_median'])" "$OUT/trainer_mfu.json" || status=1

echo "== 3. images: ViT-B/16 MAE at 224 px (bf16, compiled) through pretrain train; ours vs transformers ViT-B/16"
timeout 300 "$PY" bench/image_trainer.py "${images[@]}" --json \
    >"$OUT/image_trainer.json" 2> >(tee "$OUT/image_trainer.log" >&2) || status=1
timeout 240 "$PY" bench/image_throughput.py "${img_pair[@]}" --json \
    >"$OUT/image_throughput.json" 2> >(tee "$OUT/image_throughput.log" >&2) || status=1

echo "== 4. GPU tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests -x 2>&1 | tee "$OUT/pytest_gpu.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
exit $status
