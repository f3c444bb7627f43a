#!/usr/bin/env bash
# The prompt-diversification table (README): the four prompts.method values as DVC experiments,
# then the markdown table. Run from the repo root after `dvc repro`.
set -euo pipefail
for m in vanilla mix random contrastive; do
  dvc exp run -n "prompts-$m" -S "prompts.method=$m"
done
dvc exp run -n prompts-mix-teacher-vocab -S prompts.method=mix -S prompts.mix.styles_file=clipdistill/assets/world_styles.txt
dvc exp run -n prompts-random-teacher-vocab -S prompts.method=random -S prompts.random.fit_words=clipdistill/assets/world_styles.txt
dvc exp show --json | python -m clipdistill.report --by prompts.method
