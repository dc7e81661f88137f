#!/usr/bin/env bash
# Every GPU measurement that docs/ records as open, in one command, each part under its own time limit.
#
#   tools/gpu_checks.sh OUT_DIR [PART ...]        # on the GPU machine; no PART: all, in this order
#   tools/gpu_checks.sh OUT_DIR --tiny [PART ...] # the same code paths at tiny sizes, on CPU, in minutes
#
# Parts, most important first, with their limits (seconds) on an H100 / H200:
#   70b      tools/bench_70b.py: Llama-3.1-70B's shape at a 24 GiB cap, streamed, then all resident at 48 GiB (260)
#   speed    tools/bench.py: the 8B shape at seq 2048 against the standard transformers + peft loop (300)
#   memory   tools/measure_memory.py: planner predictions against measured peaks (150)
#   pytest   the tests marked gpu: CUDA packed isolation, NF4 bit-exactness, paged state, plan within 10%,
#            FSDP2 (and its CPU offload) with one process on the GPU against a plain run,
#            layer streaming and layer-major steps on CUDA, pinned slabs (150)
#   resume   tools/check_exact_resume.py: exact resume with CUDA RNG and the paged 8-bit optimizer (120)
#   merge    tools/gpu_merge_check.py: the 8B-shaped merge on the GPU (150)
# Each part writes OUT_DIR/PART.json (where it has one) and OUT_DIR/PART.log; OUT_DIR/summary.txt gets
# one line per part with its exit code (124: ran past its limit). Parts do not stop each other.
set -u
out=${1:?usage: tools/gpu_checks.sh OUT_DIR [--tiny] [PART ...]}
shift
tiny=""
if [ "${1:-}" = "--tiny" ]; then tiny="--tiny"; shift; fi
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(70b speed memory pytest resume merge)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

run() {  # run NAME LIMIT COMMAND...
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
}

speed_model=recipes/models/llama-3.1-8b.json
speed_args=(--seq_len 2048 --batch_size 4 --steps 6 --warmup 1 --repeats 2)
if [ -n "$tiny" ]; then
    speed_model="$out/tiny-llama.json"
    python -c "from transformers import LlamaConfig; LlamaConfig(hidden_size=64, intermediate_size=128, \
num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512).to_json_file('$speed_model')"
    speed_args=(--seq_len 64 --batch_size 2 --steps 2 --warmup 1 --repeats 1)
fi

for part in "${parts[@]}"; do
    case $part in
        70b) run 70b 260 python tools/bench_70b.py $tiny --out "$out/70b.json" ;;
        speed) run speed 300 python tools/bench.py --model "$speed_model" "${speed_args[@]}" --out "$out/speed.json" ;;
        memory) run memory 150 python tools/measure_memory.py $tiny --out "$out/memory.json" ;;
        pytest) run pytest 150 python -m pytest -q -m gpu tests ;;
        resume) run resume 120 python tools/check_exact_resume.py $tiny --out "$out/resume.json" ;;
        merge) run merge 150 python tools/gpu_merge_check.py $tiny --out "$out/merge.json" ;;
        *) echo "unknown part: $part (70b speed memory pytest resume merge)" | tee -a "$out/summary.txt" ;;
    esac
done
