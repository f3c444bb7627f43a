#!/usr/bin/env bash
# Two commits over whole-pipeline seeds: for each seed and commit, a clone checked out at the commit
# with `seed: K` in params.yaml, its own `dvc repro` (the default student), then the student in
# STUDENT as a DVC experiment; then a table of each figure per seed for both commits, their mean ±
# (max - min) / 2 and the change per seed. For changes meant to move only speed or rounding: is a
# metric's change larger than the seed spread? A seed and commit whose metrics are on disk is not
# rerun, so a killed comparison resumes where it was. The clones share this checkout's DVC cache.
#   bash experiments/commits_seeds.sh d453740 HEAD                    # seeds 0 1 2, CNN student
#   SEEDS="3 4" STUDENT=cnn bash experiments/commits_seeds.sh d453740 HEAD /tmp/compare
# About 12 to 15 min per seed and commit on a 2-core CPU. The clones are of committed commits;
# lib.sh still refuses to start over uncommitted params.yaml edits, as every script here does.
source "$(dirname "$0")/lib.sh"
if [ $# -lt 2 ]; then
  echo "usage: [SEEDS=\"0 1 2\"] [STUDENT=cnn] bash experiments/commits_seeds.sh REV_A REV_B [WORK]" >&2
  exit 2
fi
ROOT="$(pwd)"
CACHE="$(dvc cache dir)"
REVS=("$(git rev-parse --short "$1")" "$(git rev-parse --short "$2")")
WORK="$(realpath -m "${3:-$ROOT/../commits-seeds}")"
SEEDS="${SEEDS:-0 1 2}"
STUDENT="${STUDENT:-cnn}"
mkdir -p "$WORK"
for k in $SEEDS; do
  for rev in "${REVS[@]}"; do
    out="$WORK/$rev-seed$k"
    if [ -s "$out.$STUDENT.json" ]; then echo "$rev seed $k: $out.$STUDENT.json is there"; continue; fi
    rm -rf "$out"
    git clone -q "$ROOT" "$out"
    (
      cd "$out"
      git checkout -q "$rev"
      dvc cache dir --local "$CACHE"
      sed -i "s/^seed: .*/seed: $k/" params.yaml
      git -c user.name=commits_seeds -c user.email=commits_seeds@localhost commit -q -am "seed $k"
      echo "$rev seed $k: dvc repro in $out"
      dvc repro > "$out.repro.log" 2>&1
      cp artifacts/eval/metrics.json "$out.default.json"
      echo "$rev seed $k: dvc exp run -S distill.student=$STUDENT"
      dvc exp run -S "distill.student=$STUDENT" > "$out.$STUDENT.log" 2>&1
      cp artifacts/eval/metrics.json "$out.$STUDENT.json"
    )
  done
done
python3 - "$WORK" "$STUDENT" "${REVS[@]}" $SEEDS <<'EOF'
import json, sys
work, student, rev_a, rev_b, *seeds = sys.argv[1:]
def worst(d):
    return min(v for k, v in d.items() if k != "mean")
figures = {  # label: (file, what to read from its metrics.json)
    f"{student} student, test mean": (student, lambda m: m["student"]["mean"]),
    f"{student} student, worst domain": (student, lambda m: worst(m["student"])),
    f"{student} student, validation mean": (student, lambda m: m["val"]["student"]["mean"]),
    "default student, test mean": ("default", lambda m: m["student"]["mean"]),
    "default student, validation mean": ("default", lambda m: m["val"]["student"]["mean"]),
    "base-to-novel HM": ("default", lambda m: m["base_to_novel"]["hm"]),
    "teacher, lowest domain": ("default", lambda m: worst(m["teacher"])),
}
def read(rev, k, which):
    return json.load(open(f"{work}/{rev}-seed{k}.{which}.json"))
def spread(xs):
    return f"{sum(xs) / len(xs):.3f} ± {(max(xs) - min(xs)) / 2:.3f} ({' / '.join(f'{x:.3f}' for x in xs)})"
print(f"seeds {' / '.join(seeds)}: mean ± (max - min) / 2 (per seed)")
print(f"| figure | {rev_a} | {rev_b} | change per seed (mean) |")
print("|---|---|---|---|")
for label, (which, get) in figures.items():
    a = [get(read(rev_a, k, which)) for k in seeds]
    b = [get(read(rev_b, k, which)) for k in seeds]
    d = [y - x for x, y in zip(a, b)]
    print(f"| {label} | {spread(a)} | {spread(b)} | {' / '.join(f'{x:+.3f}' for x in d)} ({sum(d) / len(d):+.3f}) |")
EOF
