#!/usr/bin/env bash
# What we tried to lift the prompt students trained on synthesized images (docs/results.md, "Prompt students
# on synthesized images: what we tried"): other surrogate images, each distilled into PromptKD and
# KDPL with the papers' schedule, as DVC experiments, then the students table. Run from the repo
# root after `dvc repro` (the default's own rows, generator 4,800 steps, come from
# experiments/students.sh). Every row pins the generator it was measured with. Each
# experiment reruns generator/prompts/synthesize where its params touch them (2-7 min on a 2-core
# CPU; the 1,600-step generator ~6 min once; 7,000 Contrastive-Prompt images ~15 min) and distill
# (~1.5 min): about an hour in all on a 2-core CPU.
source "$(dirname "$0")/lib.sh"
PKD="$PROMPTKD_STUDENT $PROMPTKD_LR $PAPER"
KDPL="$KDPL_STUDENT $KDPL_LR $PAPER"
ONE="-S distill.base_to_novel=false"  # the main student only: its figures do not depend on this
# The generators these rows were measured with, all at taming's constant rate of 0.002.
RATE="-S generator.lr=0.002 -S generator.schedule=constant"
OLD_GEN="-S generator.steps=400 $RATE"    # 18.8 dB PSNR
MID_GEN="-S generator.steps=1600 $RATE"   # 22.3 dB
FULL_GEN="-S generator.steps=4800 $RATE"  # 24.7 dB
# KDPL before learning: its context "a photo of a" is one template (the zero-shot row averages six).
exp -n kdpl-at-init $KDPL $ONE -S distill.lr=0.000000000001 -S distill.epochs=1
for student in PKD KDPL; do
  s=$(echo "$student" | tr '[:upper:]' '[:lower:]')
  exp -n "$s-gen400" ${!student} $ONE $OLD_GEN
  exp -n "$s-gen400-synth-steps100" ${!student} $ONE $OLD_GEN -S synthesize.steps=100
  exp -n "$s-gen400-contrastive" ${!student} $ONE $OLD_GEN -S prompts.method=contrastive
  exp -n "$s-gen400-mix-teacher-vocab" ${!student} $ONE $OLD_GEN -S prompts.method=mix \
    -S prompts.mix.styles_file=clipdistill/assets/world_styles.txt
  exp -n "$s-gen1600" ${!student} $ONE $MID_GEN
  exp -n "$s-gen1600-synth-steps100" ${!student} $ONE $MID_GEN -S synthesize.steps=100
  # Three times the images at the same number of steps.
  exp -n "$s-gen1600-2100-images" ${!student} $ONE $MID_GEN -S prompts.per_class=300 -S distill.epochs=10
  # The 4,800-step generator with Xuan et al.'s diversified prompts.
  exp -n "$s-contrastive" ${!student} $ONE $FULL_GEN -S prompts.method=contrastive
  exp -n "$s-mix-teacher-vocab" ${!student} $ONE $FULL_GEN -S prompts.method=mix \
    -S prompts.mix.styles_file=clipdistill/assets/world_styles.txt
done
# PromptKD gains from Contrastive-Prompt images: more of them, at the same steps and at more.
exp -n pkd-contrastive-2100-images $PKD $ONE $FULL_GEN -S prompts.method=contrastive -S prompts.per_class=300 -S distill.epochs=10
exp -n pkd-contrastive-2100-images-30-epochs $PKD $ONE $FULL_GEN -S prompts.method=contrastive -S prompts.per_class=300
exp -n pkd-contrastive-7000-images $PKD $ONE $FULL_GEN -S prompts.method=contrastive -S prompts.per_class=1000 -S distill.epochs=3
exp -n pkd-contrastive-7000-images-10-epochs $PKD $ONE $FULL_GEN -S prompts.method=contrastive -S prompts.per_class=1000 -S distill.epochs=10
exp -n pkd-contrastive-7000-images-30-epochs $PKD $ONE $FULL_GEN -S prompts.method=contrastive -S prompts.per_class=1000 -S distill.epochs=30
dvc exp show --json | python -m clipdistill.report --students
