"""Stage `distill`: train the student on synthesized images only, against the teacher's logits.

Teacher logits = logit_scale * cos(teacher image feature, stored class vectors); the student's
projection head classifies against the same stored vectors (PromptKD). No label is used.
"""
from pathlib import Path

from clipdistill.clip_models import load_teacher
from clipdistill.data import load_shards
from clipdistill.losses import get_loss
from clipdistill.params import load_params
from clipdistill.runtime import atomic_dir, run_stage, seed_everything, setup_torch, stage_args, write_json
from clipdistill.students import build_student, save_student
from clipdistill.text import load_class_vectors
from clipdistill.training import distill


def main():
    args = stage_args(__doc__, "synth", "teacher", "text_features", "out")
    p = load_params(args.params)
    d = p.distill
    device = setup_torch(p.device, p.threads)
    gen = seed_everything(p.seed)
    images, _ = load_shards(args.synth)
    teacher = load_teacher(args.teacher, device)
    cv = load_class_vectors(args.text_features)
    vectors = cv["features"].to(device)
    student = build_student(d, cv["features"], cv["logit_scale"])
    history = []
    losses = distill(student, lambda x: teacher.logits(x, vectors), images, get_loss(d.loss),
                     temperature=d.temperature, epochs=d.epochs, batch_size=d.batch_size, lr=d.lr,
                     weight_decay=d.weight_decay, augment=d.augment, generator=gen, device=device,
                     log=lambda epoch, loss: history.append({"epoch": epoch, "loss": loss}))
    with atomic_dir(args.out) as tmp:
        save_student(student.cpu(), tmp / "student.pt")
        write_json(tmp / "history.json", history)
    print(f"distill: {len(losses)} steps on {images.shape[0]} synthesized images, final loss {history[-1]['loss']:.4f}")


if __name__ == "__main__":
    run_stage(main)
