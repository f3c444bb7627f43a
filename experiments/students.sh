#!/usr/bin/env bash
# The students table (README, "Prompt-learning students"): cnn / promptkd / kdpl x {synthetic,
# unlabeled world images} as DVC experiments, then the markdown table. Run from the repo root
# after `dvc repro`; only `distill` and `evaluate` rerun per experiment.
set -euo pipefail
PROMPT="-S distill.temperature=1 -S distill.lr=0.005 -S distill.weight_decay=0"  # both papers: T = 1
WORLD="-S distill.images=world -S distill.epochs=6"  # 3920 unlabeled images: ~ the synthetic run's steps
dvc exp run -n cnn-synthetic
dvc exp run -n cnn-world $WORLD
dvc exp run -n promptkd-synthetic -S distill.student=promptkd -S distill.loss=promptkd $PROMPT
dvc exp run -n promptkd-world -S distill.student=promptkd -S distill.loss=promptkd $PROMPT $WORLD
dvc exp run -n kdpl-synthetic -S distill.student=kdpl -S distill.loss=symmetric_kl $PROMPT
dvc exp run -n kdpl-world -S distill.student=kdpl -S distill.loss=symmetric_kl $PROMPT $WORLD
dvc exp show --json | python -m clipdistill.report --students
