#!/usr/bin/env bash
# The prompt-diversification table over whole-pipeline seeds (docs/results.md): for each seed, a
# clone of this commit with `seed: K` in params.yaml, its own `dvc repro` (world, teacher, generator
# and synthesis all reseeded), then the four prompts.method values as DVC experiments; then each
# method's mean ± (max - min) / 2 over the seeds. A seed whose `dvc exp show --json` is on disk is
# not rerun, so a killed sweep resumes at the seed it was on. The clones share this checkout's DVC
# cache, so a seed whose stages are already in it (seed 0, after the default's `dvc repro` here)
# checks its outputs out instead of recomputing them. The table has a row for each method
# with STUDENT, and one for the default run itself (vanilla prompts, the default student); a second
# table pairs each method with vanilla seed by seed (its lead per seed, and their mean ± spread).
#   STUDENT=cnn bash experiments/prompts_seeds.sh                 # seeds 0 1 2 under ../prompt-seeds
#   STUDENT=cnn SEEDS="0 1 2 3 4" bash experiments/prompts_seeds.sh /tmp/sweep
#   PARAMS=tests/tiny_params.yaml SEEDS="0 1" bash experiments/prompts_seeds.sh /tmp/tiny   # another params file
# STUDENT as in experiments/prompts.sh (empty: the default student). About 25 min per seed on a
# 2-core CPU. The clones are of the committed HEAD, hence lib.sh's refusal of uncommitted edits.
source "$(dirname "$0")/lib.sh"
ROOT="$(pwd)"
CACHE="$(dvc cache dir)"   # shared with the clones
WORK="$(realpath -m "${1:-$ROOT/../prompt-seeds}")"
SEEDS="${SEEDS:-0 1 2}"
PARAMS="${PARAMS:+$(realpath "$PARAMS")}"   # a committed params file to run instead of params.yaml
mkdir -p "$WORK"
for k in $SEEDS; do
  out="$WORK/seed$k.json"
  if [ -s "$out" ]; then echo "seed $k: $out is there"; continue; fi
  clone="$WORK/seed$k"
  rm -rf "$clone"
  git clone -q "$ROOT" "$clone"
  (
    cd "$clone"
    dvc cache dir --local "$CACHE"
    if [ -n "$PARAMS" ]; then cp "$PARAMS" params.yaml; fi
    sed -i "s/^seed: .*/seed: $k/" params.yaml
    grep -q "^seed: $k\$" params.yaml || { echo "error: params.yaml has no top-level 'seed:' line to set" >&2; exit 1; }
    git -c user.name=prompts_seeds -c user.email=prompts_seeds@localhost commit -q --allow-empty -am "seed $k"
    echo "seed $k: dvc repro in $clone"
    dvc repro
    # the seed's own dvc.lock, committed: its baseline row is then the default run at this seed
    git -c user.name=prompts_seeds -c user.email=prompts_seeds@localhost commit -q --allow-empty -am "seed $k: dvc repro"
    for m in $PROMPT_METHODS; do
      exp -n "prompts-$tag$m-seed$k" -S "prompts.method=$m" "${student[@]}"
    done
    dvc exp show --json > "$out.tmp" && mv "$out.tmp" "$out"
  )
done
files=()
for k in $SEEDS; do files+=("$WORK/seed$k.json"); done
python -m clipdistill.report --by prompts.method --against vanilla "${files[@]}"
