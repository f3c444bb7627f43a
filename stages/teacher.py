"""Stage `teacher`: materialise the CLIP teacher the other stages load.

teacher.source=embedded trains the small open_clip CLIP on the world's captioned train split;
teacher.source=open_clip loads an open_clip architecture with a pretrained tag or local file.
"""
from pathlib import Path

from clipdistill.clip_models import build_embedded_teacher, load_open_clip_teacher, save_teacher, train_teacher
from clipdistill.data import load_captioned_split
from clipdistill.params import load_params
from clipdistill.runtime import atomic_dir, run_stage, seed_everything, setup_torch, stage_args, write_json


def main():
    args = stage_args(__doc__, "world", "out")
    p = load_params(args.params)
    device = setup_torch(p.device, p.threads)
    gen = seed_everything(p.seed)
    t = p.teacher
    summary = {"source": t.source}
    if t.source == "embedded":
        images, captions, _ = load_captioned_split(Path(args.world) / "train", p.world.image_size)
        teacher = build_embedded_teacher(t, p.world.image_size)
        losses = train_teacher(teacher, images, captions, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                               weight_decay=t.weight_decay, generator=gen, device=device)
        summary.update(final_loss=sum(losses[-20:]) / len(losses[-20:]), steps=len(losses),
                       logit_scale=teacher.logit_scale)
    else:
        teacher = load_open_clip_teacher(t.open_clip_model, t.pretrained)
        summary.update(model=t.open_clip_model, pretrained=t.pretrained)
    with atomic_dir(args.out) as tmp:
        save_teacher(teacher.cpu(), tmp / "teacher.pt")
        write_json(tmp / "summary.json", summary)
    print(f"teacher: {summary}")


if __name__ == "__main__":
    run_stage(main)
