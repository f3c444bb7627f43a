#!/usr/bin/env bash
# The students table (README, "Prompt-learning students"): cnn / promptkd / kdpl x {synthetic,
# unlabeled world images} as DVC experiments, then the markdown table. Run from the repo root
# after `dvc repro`; only `distill` and `evaluate` rerun per experiment.
set -euo pipefail
# `dvc exp run` leaves its -S changes in the workspace's params.yaml: start each from the committed one.
exp() { git checkout -- params.yaml; dvc exp run "$@"; }
# Prompt students as both papers train them: T = 1, SGD with momentum 0.9, batch 32, cosine
# schedule; lr 0.002 (KDPL / CoOp) and 0.005 (PromptKD).
PAPER="-S distill.temperature=1 -S distill.optimizer=sgd -S distill.batch_size=32 -S distill.weight_decay=0.0005"
# The same students with AdamW lr 0.005, no weight decay (this table's earlier setting).
ADAMW="-S distill.temperature=1 -S distill.lr=0.005 -S distill.weight_decay=0"
PKD="-S distill.student=promptkd -S distill.loss=promptkd"
KDPL="-S distill.student=kdpl -S distill.loss=symmetric_kl"
WORLD="-S distill.images=world -S distill.epochs=6"  # 3920 unlabeled images: ~ the synthetic run's steps
exp -n cnn-synthetic
exp -n cnn-world $WORLD
exp -n promptkd-synthetic $PKD $PAPER -S distill.lr=0.005
exp -n promptkd-world $PKD $PAPER -S distill.lr=0.005 $WORLD
exp -n kdpl-synthetic $KDPL $PAPER -S distill.lr=0.002
exp -n kdpl-world $KDPL $PAPER -S distill.lr=0.002 $WORLD
exp -n promptkd-synthetic-adamw $PKD $ADAMW
exp -n promptkd-world-adamw $PKD $ADAMW $WORLD
exp -n kdpl-synthetic-adamw $KDPL $ADAMW
exp -n kdpl-world-adamw $KDPL $ADAMW $WORLD
git checkout -- params.yaml
dvc exp show --json | python -m clipdistill.report --students
