#!/usr/bin/env bash
# The prompt-diversification table (docs/results.md): the four prompts.method values as DVC experiments,
# then the markdown table. Run from the repo root after `dvc repro`.
source "$(dirname "$0")/lib.sh"
for m in vanilla mix random contrastive; do
  exp -n "prompts-$m" -S "prompts.method=$m"
done
exp -n prompts-mix-teacher-vocab -S prompts.method=mix -S prompts.mix.styles_file=clipdistill/assets/world_styles.txt
exp -n prompts-random-teacher-vocab -S prompts.method=random -S prompts.random.fit_words=clipdistill/assets/world_styles.txt
dvc exp show --json | python -m clipdistill.report --by prompts.method
