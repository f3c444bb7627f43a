#!/usr/bin/env bash
# The students table (docs/results.md, "Prompt-learning students"): cnn / promptkd / kdpl x {synthetic,
# unlabeled world images} as DVC experiments, then the markdown table. Run from the repo root
# after `dvc repro`; only `distill` and `evaluate` rerun per experiment.
source "$(dirname "$0")/lib.sh"
# The same students with AdamW lr 0.005, no weight decay (this table's earlier setting).
ADAMW="-S distill.temperature=1 -S distill.lr=0.005 -S distill.weight_decay=0"
WORLD="-S distill.images=world -S distill.epochs=6"  # 3920 unlabeled images: ~ the synthetic run's steps
CNN="-S distill.student=cnn"  # the default student is kdpl
exp -n cnn-synthetic $CNN
exp -n cnn-world $CNN $WORLD
exp -n promptkd-synthetic $PROMPTKD_STUDENT $PAPER $PROMPTKD_LR
exp -n promptkd-world $PROMPTKD_STUDENT $PAPER $PROMPTKD_LR $WORLD
exp -n kdpl-synthetic $KDPL_STUDENT $PAPER $KDPL_LR
exp -n kdpl-world $KDPL_STUDENT $PAPER $KDPL_LR $WORLD
exp -n promptkd-synthetic-adamw $PROMPTKD_STUDENT $ADAMW
exp -n promptkd-world-adamw $PROMPTKD_STUDENT $ADAMW $WORLD
exp -n kdpl-synthetic-adamw $KDPL_STUDENT $ADAMW
exp -n kdpl-world-adamw $KDPL_STUDENT $ADAMW $WORLD
dvc exp show --json | python -m clipdistill.report --students
