#!/usr/bin/env bash
# The prompt-diversification table (docs/results.md): the four prompts.method values as DVC experiments,
# then the markdown table. Run from the repo root after `dvc repro`.
#   bash experiments/prompts.sh                  # the default student (KDPL)
#   STUDENT=cnn bash experiments/prompts.sh      # a CNN from scratch, as Xuan et al. distil (synthesis is shared)
source "$(dirname "$0")/lib.sh"
for m in $PROMPT_METHODS; do
  exp -n "prompts-$tag$m" -S "prompts.method=$m" "${student[@]}"
done
exp -n "prompts-${tag}mix-teacher-vocab" -S prompts.method=mix -S prompts.mix.styles_file=clipdistill/assets/world_styles.txt "${student[@]}"
exp -n "prompts-${tag}random-teacher-vocab" -S prompts.method=random -S prompts.random.fit_words=clipdistill/assets/world_styles.txt "${student[@]}"
dvc exp show --json | python -m clipdistill.report --by prompts.method
