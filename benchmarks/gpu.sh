#!/usr/bin/env bash
# The GPU figures in one command: on one CUDA GPU (sized for an H200, at most 10 minutes) it prints
# one line per figure on stdout, the machine first:
#   machine: ...
#   synthesis fp32: batched/loop speedup: N.Nx (...)   benchmarks/synthesis.py --setting real, fp32 (dry run: embedded)
#   synthesis bf16: batched/loop speedup: N.Nx (...)   the same under bf16 autocast (the stage's CUDA default)
#   loader_speed: ...                                  benchmarks/loader_speed.py's figure (ResNet-18 student at 224 px
#                                                      fed by the streaming loader vs device-resident tensors)
#   torchrun synthesis 2 processes == 1 process: yes   stages/synthesize.py under torchrun on tests/tiny_params.yaml
#   pipeline on <device>, every stage: yes             the stages after synthesize (distill, evaluate, export) on
#                                                      its 1-process output: with the torchrun step, every
#                                                      stage of dvc.yaml has run on the device
#
# Usage (from anywhere; it runs from the repo root):
#   bash benchmarks/gpu.sh [--out DIR]     on a CUDA machine
#   bash benchmarks/gpu.sh --dry-run       every step at tiny size on the CPU (what tests/test_gpu_script.py runs)
# --out DIR: logs (DIR/logs/<step>.log, each step's full output) and the tiny pipeline (DIR/pipeline);
# default a fresh temporary folder, named on stderr at the end. PYTHON=... picks the interpreter.
#
# A step that fails prints `<step>: FAILED ...` (or, for a missing benchmarks/loader_speed.py,
# `loader_speed: benchmarks/loader_speed.py missing`) and the others still run; the exit status is
# then 1 and the last stderr line is `gpu.sh: failed: <step> ...`. Each step runs under `timeout`
# so the whole script stays inside its time budget even if one hangs.
#
# The torchrun step runs the stage under plain torchrun: with 2 or more GPUs one per rank (NCCL);
# on one GPU both ranks share it over gloo (clipdistill/runtime.py, init_distributed).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (usage: bash benchmarks/gpu.sh [--dry-run] [--out DIR])" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
export DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
if [ -z "$OUT" ]; then
    OUT="$(mktemp -d "${TMPDIR:-/tmp}/clipdistill-gpu.XXXXXX")"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
PIPE="$OUT/pipeline"
rm -rf "$LOGS" "$PIPE"  # only this script's own folders inside DIR
mkdir -p "$LOGS"

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    # synthesis.py on tests/tiny_params.yaml's embedded models: 2 images, 1 step, 1 cutout. (The real
    # architectures at their smallest, --setting real --batch 2 --steps 1 --cutn 1 --image-size 16,
    # take 20 s in fp32 and 50 s in bf16 on 2 cores: too slow for a test.)
    SETTING=(--setting embedded --params tests/tiny_params.yaml)
    SYNTH_ARGS=(--batch 2 --steps 1 --cutn 1 --repeats 1)
    SYNTH_TIMEOUT=(120 120)
    # loader_speed.py: one step per run (batch >= 2 for BatchNorm; --warmup 0: its default 2 untimed
    # steps would triple the steps), one worker process. About 20 s on 2 cores: a ResNet-18 step at
    # 224 px takes seconds there.
    LOADER=(--images 2 --batch 2 --workers 1 --warmup 0)
    LOADER_TIMEOUT=120
    TORCHRUN_TIMEOUT=300  # all of the torchrun step: its pipeline stages, 1 process, 2 processes
    PIPELINE_TIMEOUT=300  # the stages after synthesize
else
    DEVICE=cuda
    # The real defaults (8 images of 256 px, 8 cutouts), 5 steps, fastest of 3 runs per mode; on an
    # H200 each run should take well under a minute. The timeouts (25 s for the machine line) add
    # up to 590 s: under 10 minutes however slow a step is.
    SETTING=(--setting real)
    SYNTH_ARGS=(--batch 8 --steps 5 --repeats 3)
    SYNTH_TIMEOUT=(115 100)
    LOADER=(--images 4096 --batch 256 --workers 8)  # loader_speed.py's defaults: 16 steps per run
    LOADER_TIMEOUT=90
    TORCHRUN_TIMEOUT=140
    PIPELINE_TIMEOUT=120
fi

FAILED=()
fail() {  # fail STEP LINE LOG: the step's one stdout line, the end of its log on stderr
    FAILED+=("$1")
    echo "$2"
    if [ -n "${3:-}" ] && [ -s "$3" ]; then
        { echo "--- last lines of $3:"; tail -n 15 "$3" | sed 's/^/    /'; } >&2
    fi
}

# --- the machine
if [ "$DRY_RUN" = 1 ]; then
    echo "machine: cpu (dry run), $(nproc) CPU cores"
else
    if ! timeout -k 5 25 "$PY" - >"$LOGS/machine.log" 2>&1 <<'EOF'
import os
import torch
if not torch.cuda.is_available():
    raise SystemExit("error: torch sees no CUDA GPU; on a CPU machine run bash benchmarks/gpu.sh --dry-run")
p = torch.cuda.get_device_properties(0)
n = torch.cuda.device_count()
print(f"machine: {p.name} ({p.total_memory / 2**30:.0f} GiB){f' x {n}' if n > 1 else ''}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores")
EOF
    then
        cat "$LOGS/machine.log" >&2
        exit 1
    fi
    line="$(cat "$LOGS/machine.log")"
    if command -v nvidia-smi >/dev/null 2>&1; then
        driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0 2>/dev/null || true)"
        [ -n "$driver" ] && line="$line, driver $driver"
    fi
    echo "$line"
fi

# --- 1. batched vs one-image synthesis, real architectures, fp32 and bf16
i=0
for precision in fp32 bf16; do
    log="$LOGS/synthesis_$precision.log"
    status=0
    timeout -k 10 "${SYNTH_TIMEOUT[$i]}" "$PY" benchmarks/synthesis.py "${SETTING[@]}" --device "$DEVICE" \
        --precision "$precision" "${SYNTH_ARGS[@]}" >"$log" 2>&1 || status=$?
    figure="$(grep -E '^batched/loop speedup: ' "$log" | tail -n 1 || true)"
    if [ "$status" = 0 ] && [ -n "$figure" ]; then
        # rows: mode calls images/call seconds images*steps/s GFLOP/s [peak GiB]
        batched="$(awk '$1 == "batched" && $2 ~ /^[0-9]+$/ {print $5}' "$log")"
        loop="$(awk '$1 == "loop" {print $5}' "$log")"
        sizes="$(grep -E '^[0-9]+ images of ' "$log" | sed 's/ (latents [^)]*)//; s/ per image per step, on .*//' || true)"
        echo "synthesis $precision: $figure (batched $batched vs loop $loop images*steps/s; $sizes)"
    else
        fail "synthesis_$precision" "synthesis $precision: FAILED (exit $status$([ "$status" = 124 ] && echo ", timed out after ${SYNTH_TIMEOUT[$i]} s"); log $log)" "$log"
    fi
    i=$((i + 1))
done

# --- 2. distill images/s of a ResNet-18 student fed by the streaming loader vs device-resident tensors
log="$LOGS/loader_speed.log"
if [ ! -f benchmarks/loader_speed.py ]; then
    fail loader_speed "loader_speed: benchmarks/loader_speed.py missing"
else
    status=0
    # stdout alone is the figure's source (its last non-empty line); stderr (warnings) joins the log after
    timeout -k 10 "$LOADER_TIMEOUT" "$PY" benchmarks/loader_speed.py --device "$DEVICE" "${LOADER[@]}" \
        >"$log" 2>"$log.stderr" || status=$?
    figure="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true)"
    cat "$log.stderr" >>"$log" && rm -f "$log.stderr"
    if [ "$status" = 0 ] && [ -n "$figure" ]; then
        echo "loader_speed: ${figure#loader_speed: }"
    else
        fail loader_speed "loader_speed: FAILED (exit $status$([ "$status" = 124 ] && echo ", timed out after $LOADER_TIMEOUT s"); log $log)" "$log"
    fi
fi

# --- 3. synthesize on 2 processes under torchrun writes the same files as on 1
# A tiny pipeline in DIR/pipeline: this checkout's stages/ and clipdistill/ copied (the stage
# scripts import the package beside them), dvc.yaml, and tests/tiny_params.yaml as params.yaml with
# this run's device. The stages synthesize depends on run from dvc.yaml's commands, in its order.
torchrun_step() {
    local log="$LOGS/torchrun.log"
    DEADLINE=$((SECONDS + TORCHRUN_TIMEOUT))
    : >"$log"
    mkdir -p "$PIPE" && cp -R clipdistill stages dvc.yaml "$PIPE/" || return 1
    # Stage commands from dvc.yaml: every stage synthesize needs, then synthesize itself into its own
    # output (1 process) and into <output>_2p (2 processes). Lines: kind, output, script and arguments.
    "$PY" - "$DEVICE" "$ROOT/tests/tiny_params.yaml" "$PIPE" >"$PIPE/commands.tsv" 2>>"$log" <<'EOF' || return 1
import shlex
import sys
from pathlib import Path

import yaml

device, tiny, pipe = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
params = yaml.safe_load(tiny.read_text())
params["device"] = device
(pipe / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

stages = yaml.safe_load((pipe / "dvc.yaml").read_text())["stages"]
def paths(stage, *keys):
    return [p if isinstance(p, str) else next(iter(p)) for k in keys for p in stages[stage].get(k) or []]
def inside(a, b):  # one path equal to or inside the other
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")
order, seen = [], set()
def visit(stage):  # depth first: a stage after every stage whose outputs it reads
    if stage in seen:
        return
    seen.add(stage)
    for dep in paths(stage, "deps"):
        for other in stages:
            if other != stage and any(inside(dep, out) for out in paths(other, "outs", "metrics", "plots")):
                visit(other)
    order.append(stage)
visit("synthesize")
def args(stage):
    words = shlex.split(stages[stage]["cmd"])
    if words[0] not in ("python", "python3") or any(c.isspace() for w in words for c in w):
        raise SystemExit(f"dvc.yaml stage {stage}: expected `python script args` without spaces in paths: {words}")
    return words[1:]
for stage in order[:-1]:
    print("stage", stage, " ".join(args(stage)), sep="\t")
synth = args("synthesize")
out = synth[synth.index("--out") + 1]
print("synth1", out, " ".join(synth), sep="\t")
synth[synth.index("--out") + 1] = out + "_2p"
print("synth2", out + "_2p", " ".join(synth), sep="\t")
for stage in stages:  # then every other stage, each after the stages it reads (the 1-process synthesis)
    visit(stage)
for stage in order[order.index("synthesize") + 1:]:
    print("after", stage, " ".join(args(stage)), sep="\t")
EOF
    local kind out words synth1=() synth2=() one="" two="" w
    while IFS=$'\t' read -r kind out words; do
        read -ra words <<<"$words"
        case "$kind" in
            stage) run_logged "$log" "$PY" "${words[@]}" || return 1 ;;
            synth1) one="$out"; synth1=("${words[@]}") ;;
            synth2) two="$out"; synth2=("${words[@]}") ;;
        esac
    done <"$PIPE/commands.tsv"
    [ -n "$one" ] && [ -n "$two" ] || { echo "no synthesize command in $PIPE/commands.tsv" >>"$log"; return 1; }
    run_logged "$log" "$PY" "${synth1[@]}" || return 1
    # One node: gloo over the loopback interface (a container's hostname need not resolve to a reachable one)
    GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" run_logged "$LOGS/torchrun_2p.log" \
        "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "${synth2[@]}"
    w=$?
    cat "$LOGS/torchrun_2p.log" >>"$log"
    [ "$w" = 0 ] || return 1
    if ! grep -q "rank 1/2" "$LOGS/torchrun_2p.log"; then
        echo "the 2-process run printed no 'rank 1/2' line: did torchrun start 2 ranks?" >>"$log"
        return 1
    fi
    # Every file of both outputs, whatever its format (.pt or .tar shards, index, metrics, preview).
    sha256_list "$PIPE/$one" >"$LOGS/sha256_1p.txt" && sha256_list "$PIPE/$two" >"$LOGS/sha256_2p.txt" || return 1
    if diff "$LOGS/sha256_1p.txt" "$LOGS/sha256_2p.txt" >"$LOGS/sha256.diff"; then
        echo "torchrun synthesis 2 processes == 1 process: yes"
        return 0
    fi
    echo "torchrun synthesis 2 processes == 1 process: NO ($(grep -c '^[<>]' "$LOGS/sha256.diff") differing lines;" \
         "$PIPE/$one vs $PIPE/$two)"
    {
        echo "sha256 of every file: < 1 process ($one), > 2 processes ($two)"
        sed 's/^/    /' "$LOGS/sha256.diff"
    } >&2
    # Is one process even reproducible here? (CUDA kernels with atomics, e.g. grid_sample's backward,
    # are not bitwise deterministic.) Rerun it once into <output>_1p_again and say.
    local again=()
    for w in "${synth1[@]}"; do
        [ "$w" = "$one" ] && w="${one}_1p_again"
        again+=("$w")
    done
    if run_logged "$LOGS/synth_1p_again.log" "$PY" "${again[@]}" \
            && sha256_list "$PIPE/${one}_1p_again" >"$LOGS/sha256_1p_again.txt"; then
        if diff -q "$LOGS/sha256_1p.txt" "$LOGS/sha256_1p_again.txt" >/dev/null; then
            echo "    1 process run twice writes the same files: the difference comes from the 2-process run" >&2
        else
            echo "    1 process run twice differs too: synthesis is not bitwise reproducible on $DEVICE" >&2
        fi
    fi
    return 2
}
left_s() {  # seconds left before the running step's deadline (DEADLINE), in $left; fails when (nearly) none
    left=$((DEADLINE - SECONDS))
    [ "$left" -gt 5 ] || { echo "out of time (the step's deadline has passed)" >>"$log"; return 1; }
}
run_logged() {  # run_logged LOG CMD...: CMD in DIR/pipeline under the running step's deadline, output appended to LOG
    local log="$1"
    shift
    left_s || return 1
    local start=$SECONDS status=0
    echo "+ (cd $PIPE && $*)" >>"$log"
    (cd "$PIPE" && timeout -k 10 "$left" "$@") >>"$log" 2>&1 || status=$?
    echo "+ exit $status after $((SECONDS - start)) s" >>"$log"
    return "$status"
}
sha256_list() {  # sha256_list DIR: "<sha256>  ./<path>" of every file under DIR, sorted by path
    (cd "$1" && find -L . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
}
rc=0
torchrun_step || rc=$?
case $rc in
    0) ;;
    2) FAILED+=(torchrun) ;;
    *) fail torchrun "torchrun synthesis 2 processes == 1 process: FAILED (a command failed; log $LOGS/torchrun.log)" \
           "$LOGS/torchrun.log" ;;
esac

# --- 4. the stages after synthesize (distill, evaluate, export) on its 1-process output, in the same
# tiny pipeline: with step 3, every stage of dvc.yaml has then run on the device.
pipeline_step() {
    local log="$LOGS/pipeline.log" kind out words
    DEADLINE=$((SECONDS + PIPELINE_TIMEOUT))
    : >"$log"
    while IFS=$'\t' read -r kind out words; do
        [ "$kind" = after ] || continue
        read -ra words <<<"$words"
        run_logged "$log" "$PY" "${words[@]}" </dev/null || return 1
    done <"$PIPE/commands.tsv"
}
if [ "$rc" = 1 ] || [ ! -s "$PIPE/commands.tsv" ]; then
    fail pipeline "pipeline on $DEVICE, every stage: FAILED (not run: the torchrun step's stages did not finish)"
elif pipeline_step; then
    echo "pipeline on $DEVICE, every stage: yes"
else
    fail pipeline "pipeline on $DEVICE, every stage: FAILED (a command failed; log $LOGS/pipeline.log)" "$LOGS/pipeline.log"
fi

echo "gpu.sh: logs in $LOGS" >&2
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "gpu.sh: failed: ${FAILED[*]}" >&2
    exit 1
fi
