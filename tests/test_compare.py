"""clipdistill.compare: two artifact folders, tensor by tensor and byte by byte."""
import torch

from clipdistill.compare import main


def make(root, weight, text="{}\n", name="clip.pt"):
    (root / "teacher").mkdir(parents=True)
    torch.save({"spec": {"kind": "embedded"}, "state_dict": {"w": weight}}, root / "teacher" / name)
    (root / "metrics.json").write_text(text)
    (root / "speed.json").write_text(str(torch.rand(1).item()))  # machine timing: never compared


def test_identical_runs_pass_and_any_difference_fails_naming_it(tmp_path, capsys):
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    make(tmp_path / "a", w)
    make(tmp_path / "b", w.clone())
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "2 of 2 files identical" in capsys.readouterr().out

    nudged = w.clone()
    nudged[1, 2] += 1e-7
    make(tmp_path / "c", nudged, text='{"acc": 1}\n')
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "teacher/clip.pt: differs at .state_dict.w" in out and "metrics.json: differs" in out


def test_renamed_files_and_a_subtree(tmp_path, capsys):
    w = torch.randn(2, generator=torch.Generator().manual_seed(1))
    make(tmp_path / "old", w, name="teacher.pt")
    make(tmp_path / "new", w.clone())
    torch.save({"spec": {"kind": "embedded", "more": 1}, "state_dict": {"w": w}}, tmp_path / "new/teacher/clip.pt")
    assert main([str(tmp_path / "old"), str(tmp_path / "new")]) == 1  # teacher.pt missing in new
    assert "missing" in capsys.readouterr().out
    args = [str(tmp_path / "old"), str(tmp_path / "new"), "--rename", "teacher.pt=clip.pt"]
    assert main(args) == 1  # the spec differs
    assert main(args + ["--subtree", "state_dict"]) == 0
