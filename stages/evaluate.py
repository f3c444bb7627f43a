"""Stage `evaluate`: teacher (zero-shot, stored class vectors) and student accuracy per domain.

Writes <out>/metrics.json ({"teacher": {domain: acc, "mean": acc}, "student": {...},
"student_zero_shot": the smaller CLIP before prompt learning (prompt students only),
"base_to_novel": {"base", "novel", "hm"} of the student trained on the first half of the classes,
"val": the same on the world's validation split (world.val_styles), plus one entry per extra
dataset in eval.datasets}), accuracy.csv and confusion.csv (plots), and
speed.json (parameters, GFLOPs per image and images/s at batch 64, best of 5 rounds taken in turns, of
the student as exported and the teacher's image tower: machine-dependent, so kept out of the metrics
that must be reproducible).
"""
import sys
from pathlib import Path

# This checkout's package first: an editable install of another clone must not run in its place.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import pandas as pd
import torch

from clipdistill.clip_models import decoding, load_clip
from clipdistill.data import fit_domains, load_domain_folder, world_test_root
from clipdistill.evaluation import (count_parameters, domain_accuracies, gflops_per_image, harmonic_mean,
                                    paired_images_per_second, pooled_accuracy, with_autocast)
from clipdistill.params import load_params
from clipdistill.runtime import atomic_dir, channels_last, resolve_precision, run_stage, setup_torch, stage_args, write_json
from clipdistill.students import load_student
from clipdistill.text import class_vectors, load_class_vectors


def base_to_novel(student, classes, vectors, data, batch_size, device, amp, workers) -> dict:
    """PromptKD/KDPL's protocol: a student trained on the base half of the classes, scored on
    base-class images among the base classes and on novel-class images among the novel ones."""
    n_base = len(classes) // 2
    out = {}
    for split, keep in (("base", list(range(n_base))), ("novel", list(range(n_base, len(classes))))):
        student.set_classes([classes[i] for i in keep], vectors[keep].cpu())
        student.to(device)
        out[split] = round(pooled_accuracy(with_autocast(student, device, amp), data, keep, batch_size, device,
                                                   workers), 4)
    out["hm"] = round(harmonic_mean(out["base"], out["novel"]), 4)
    return out


def main():
    args = stage_args(__doc__, "world", "teacher", "student_clip", "text_features", "student", "out")
    params = load_params(args.params)
    device = setup_torch(params.device, params.threads)
    amp = resolve_precision(params.precision, device)
    teacher = load_clip(args.teacher, device)
    vectors = load_class_vectors(args.text_features)["features"].to(device)
    student = channels_last(load_student(Path(args.student) / "student.pt", device), device)
    classes = list(params.world.classes)
    # The smaller CLIP the prompt students start from, scored zero-shot: the row they must beat.
    small_clip = load_clip(args.student_clip, device)
    small_vectors = class_vectors(small_clip, classes, params.text_features.templates).to(device)

    teacher_logits = with_autocast(lambda x: teacher.logits(x, vectors), device, amp)
    student_logits = with_autocast(student, device, amp)
    zero_shot_logits = with_autocast(lambda x: small_clip.logits(x, small_vectors), device, amp)

    datasets = {"world": (world_test_root(params, args.world), params.world.eval_domains)}
    if params.world.source == "embedded" and params.world.val_styles:
        datasets["val"] = (Path(args.world) / "val", list(params.world.val_styles))
    datasets.update({dataset.name: (Path(dataset.path), None) for dataset in params.eval.datasets})
    metrics, rows, confusion = {}, [], None
    prep, workers, batch_size = decoding(teacher, params.world.image_size), params.data.workers, params.eval.batch_size
    for name, (root, domains) in datasets.items():
        data = fit_domains(load_domain_folder(root, classes, prep, domains), params.data.memory_budget_mb, workers,
                           f"evaluate: {name}")
        t_acc, _ = domain_accuracies(teacher_logits, data, batch_size, device, workers)
        s_acc, s_pred = domain_accuracies(student_logits, data, batch_size, device, workers)
        entry = {"teacher": t_acc, "student": s_acc}
        entry["student_zero_shot"] = domain_accuracies(zero_shot_logits, data, batch_size, device, workers)[0]
        if name == "world":
            metrics.update(entry)
            if (Path(args.student) / "student_b2n.pt").is_file():
                metrics["base_to_novel"] = base_to_novel(load_student(Path(args.student) / "student_b2n.pt", device),
                                                         classes, vectors, data, batch_size, device, amp, workers)
            confusion = pd.concat([pd.DataFrame({"actual": [classes[i] for i in data[dom].labels.tolist()],
                                                 "predicted": [classes[i] for i in s_pred[dom].tolist()]})
                                   for dom in data])
        else:
            metrics[name] = entry
        for model, acc in entry.items():
            rows += [{"label": f"{name}/{model}/{dom}", "dataset": name, "model": model, "domain": dom,
                      "accuracy": a} for dom, a in acc.items()]

    size = params.world.image_size
    batch = params.eval.speed_batch
    speed = {"device": str(device), "precision": str(amp or torch.float32).replace("torch.", ""), "batch": batch,
             "image_size": size}
    # The student as deployed (export's `classifier()`): KDPL's class text features computed once,
    # as the teacher's are, not re-encoded on every call as its training forward does. Its
    # parameters are the deployed model's, as the teacher's are its image tower's: a prompt
    # student's text tower (KDPL's holds a 49,408-row token table) is not shipped.
    deployed = student.classifier().eval()
    models = {"teacher": (teacher.encode_image, count_parameters(teacher.model.visual)),
              "student": (deployed, count_parameters(deployed))}
    rates = paired_images_per_second({model: with_autocast(fn, device, amp) for model, (fn, _) in models.items()},
                                     size, device, batch=batch)
    for model, (fn, n_parameters) in models.items():
        speed[model] = {"parameters": n_parameters,
                        "gflops_per_image": round(gflops_per_image(fn, size, device), 4),
                        "images_per_s": round(rates[model], 1)}
    speed["student_speedup"] = round(speed["student"]["images_per_s"] / speed["teacher"]["images_per_s"], 2)
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        pd.DataFrame(rows).to_csv(tmp / "accuracy.csv", index=False)
        confusion.to_csv(tmp / "confusion.csv", index=False)
        write_json(tmp / "speed.json", speed)
    print(f"evaluate: teacher {metrics['teacher']}\n          student {metrics['student']}")
    if "val" in metrics:
        print(f"          validation (world.val_styles): teacher {metrics['val']['teacher']['mean']}, "
              f"student {metrics['val']['student']['mean']}")
    if "base_to_novel" in metrics:
        print(f"          base-to-novel {metrics['base_to_novel']}")


if __name__ == "__main__":
    run_stage(main)
