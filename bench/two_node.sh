#!/usr/bin/env bash
# Two "nodes" on one machine: two torchrun launchers (--nnodes 2, c10d rendezvous on 127.0.0.1) train one
# tiny GPT together on CPU (gloo), then one plain process continues the run from its sharded checkpoint.
# On two real machines run the same launcher line on each, with --node-rank 0/1 and the first machine's
# address as --rdzv-endpoint (see README, "Scale out").
#
#   bash bench/two_node.sh            # prints each launcher's result and the time taken; exit 0 on success
#   NPROC=2 bash bench/two_node.sh    # 2 processes per "node" (world size 4)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python
NPROC="${NPROC:-1}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

"$PY" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from _corpus import write_corpus; \
write_corpus(Path('$WORK/corpus'))"
"$PY" -m pretrain prepare "$WORK/corpus" --out "$WORK/data" --tokenizer char --val-fraction 0.2 >/dev/null 2>&1
PORT="$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
ARGS=(--out "$WORK/run" --data.path "$WORK/data" --data.seq_len 32 --model.n_layer 2 --model.n_head 2
      --model.d_model 32 --train.batch_size 4 --train.global_batch_size $((8 * NPROC)) --train.max_steps 20
      --train.warmup_steps 5 --train.lr 3e-3 --train.eval_interval 10 --train.eval_batches 4
      --train.log_interval 5 --train.ckpt_interval 10 --train.stop_at_step 10 --train.plot false
      --train.device cpu --train.threads 1 --train.parallelism fsdp)

SECONDS=0
for node in 0 1; do
  OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nnodes 2 --node-rank "$node" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$PORT" --rdzv-id two-node-bench \
    -m pretrain train "${ARGS[@]}" > "$WORK/node$node.log" 2>&1 &
  pids[$node]=$!
done
status=0
for node in 0 1; do
  wait "${pids[$node]}" || { status=$?; echo "node $node failed:"; tail -n 30 "$WORK/node$node.log"; }
done
[ "$status" -eq 0 ] || exit "$status"
echo "2 nodes x $NPROC process(es): $(grep -h '^trained' "$WORK"/node*.log) in ${SECONDS} s"
# the sharded checkpoint (world size 2*NPROC) continues in one process, same global batch
"$PY" -m pretrain train "${ARGS[@]}" --train.stop_at_step 0 --train.parallelism ddp --quiet
"$PY" -c "import json; rows = [json.loads(l) for l in open('$WORK/run/metrics.jsonl')]; \
print('steps', [r['step'] for r in rows if 'train_loss' in r], 'final val loss', rows[-1].get('val_loss'))"
