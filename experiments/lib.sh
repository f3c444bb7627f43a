# Sourced by experiments/*.sh: the papers' settings, and `exp`, which runs one DVC experiment from
# the committed params.yaml. Run the scripts from the repo root after `dvc repro`.
set -euo pipefail
# `dvc exp run -S` leaves its changes in the workspace's params.yaml, and each experiment must start
# from the committed file, so `exp` restores it after each run. That would throw away your own
# uncommitted edits, so the scripts refuse to start while there are any.
if ! git diff --quiet HEAD -- params.yaml; then
  echo "error: params.yaml has uncommitted edits; commit or stash them first (each experiment starts from the committed params.yaml)" >&2
  exit 1
fi
exp() { dvc exp run "$@"; git checkout -- params.yaml; }

# Prompt students as both papers train them: T = 1, SGD with momentum 0.9, batch 32, cosine
# schedule; lr 0.005 for PromptKD and 0.002 for KDPL (CoOp's).
PAPER="-S distill.temperature=1 -S distill.optimizer=sgd -S distill.batch_size=32 -S distill.weight_decay=0.0005"
PROMPTKD_STUDENT="-S distill.student=promptkd -S distill.loss=promptkd"
KDPL_STUDENT="-S distill.student=kdpl -S distill.loss=symmetric_kl"
PROMPTKD_LR="-S distill.lr=0.005"
KDPL_LR="-S distill.lr=0.002"

# The prompt sweeps (prompts.sh, prompts_seeds.sh): Xuan et al.'s four methods, and the student they
# distil, from the environment: STUDENT=cnn (or promptkd, kdpl) overrides distill.student, and
# tags the experiment names; empty keeps the default student.
PROMPT_METHODS="vanilla mix random contrastive"
STUDENT="${STUDENT:-}"
tag="${STUDENT:+$STUDENT-}"
student=()
if [ -n "$STUDENT" ]; then student=(-S "distill.student=$STUDENT"); fi
