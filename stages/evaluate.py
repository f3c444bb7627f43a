"""Stage `evaluate`: teacher (zero-shot, stored class vectors) and student accuracy per domain.

Writes <out>/metrics.json ({"teacher": {domain: acc, "mean": acc}, "student": {...}, plus one
entry per extra dataset in eval.datasets}), accuracy.csv and confusion.csv (plots), and speed.json
(parameters and images/s: machine-dependent, so kept out of the metrics that must be reproducible).
"""
from pathlib import Path

import pandas as pd

from clipdistill.clip_models import load_teacher
from clipdistill.data import load_domain_folder
from clipdistill.evaluation import count_parameters, domain_accuracies, images_per_second
from clipdistill.params import load_params
from clipdistill.runtime import atomic_dir, run_stage, setup_torch, stage_args, write_json
from clipdistill.students import load_student
from clipdistill.text import load_class_vectors


def main():
    args = stage_args(__doc__, "world", "teacher", "text_features", "student", "out")
    p = load_params(args.params)
    device = setup_torch(p.device, p.threads)
    teacher = load_teacher(args.teacher, device)
    vectors = load_class_vectors(args.text_features)["features"].to(device)
    student = load_student(Path(args.student) / "student.pt", device)
    classes = list(p.world.classes)

    def teacher_logits(x):
        return teacher.logits(x, vectors)

    datasets = {"world": (Path(args.world) / "test", p.world.eval_domains)}
    datasets.update({d.name: (Path(d.path), None) for d in p.eval.datasets})
    metrics, rows, confusion = {}, [], None
    for name, (root, domains) in datasets.items():
        data = load_domain_folder(root, classes, p.world.image_size, domains)
        t_acc, _ = domain_accuracies(teacher_logits, data, p.eval.batch_size, device)
        s_acc, s_pred = domain_accuracies(student, data, p.eval.batch_size, device)
        entry = {"teacher": t_acc, "student": s_acc}
        if name == "world":
            metrics.update(entry)
            confusion = pd.concat([pd.DataFrame({"actual": [classes[i] for i in data[dom][1].tolist()],
                                                 "predicted": [classes[i] for i in s_pred[dom].tolist()]})
                                   for dom in data])
        else:
            metrics[name] = entry
        for model, acc in entry.items():
            rows += [{"label": f"{name}/{model}/{dom}", "dataset": name, "model": model, "domain": dom,
                      "accuracy": a} for dom, a in acc.items()]

    speed = {
        "device": str(device),
        "teacher": {"parameters": count_parameters(teacher.model.visual),
                    "images_per_s": round(images_per_second(lambda x: teacher.encode_image(x), teacher.image_size, device), 1)},
        "student": {"parameters": count_parameters(student),
                    "images_per_s": round(images_per_second(student, p.world.image_size, device), 1)},
    }
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        pd.DataFrame(rows).to_csv(tmp / "accuracy.csv", index=False)
        confusion.to_csv(tmp / "confusion.csv", index=False)
        write_json(tmp / "speed.json", speed)
    print(f"evaluate: teacher {metrics['teacher']}\n          student {metrics['student']}")


if __name__ == "__main__":
    run_stage(main)
