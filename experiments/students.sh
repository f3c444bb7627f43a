#!/usr/bin/env bash
# The students table (README, "Prompt-learning students"): cnn / promptkd / kdpl x {synthetic,
# unlabeled world images} as DVC experiments, then the markdown table. Run from the repo root
# after `dvc repro`; only `distill` and `evaluate` rerun per experiment.
set -euo pipefail
# `dvc exp run` leaves its -S changes in the workspace's params.yaml: start each from the committed one.
exp() { git checkout -- params.yaml; dvc exp run "$@"; }
PROMPT="-S distill.temperature=1 -S distill.lr=0.005 -S distill.weight_decay=0"  # both papers: T = 1
WORLD="-S distill.images=world -S distill.epochs=6"  # 3920 unlabeled images: ~ the synthetic run's steps
exp -n cnn-synthetic
exp -n cnn-world $WORLD
exp -n promptkd-synthetic -S distill.student=promptkd -S distill.loss=promptkd $PROMPT
exp -n promptkd-world -S distill.student=promptkd -S distill.loss=promptkd $PROMPT $WORLD
exp -n kdpl-synthetic -S distill.student=kdpl -S distill.loss=symmetric_kl $PROMPT
exp -n kdpl-world -S distill.student=kdpl -S distill.loss=symmetric_kl $PROMPT $WORLD
git checkout -- params.yaml
dvc exp show --json | python -m clipdistill.report --students
