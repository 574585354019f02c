"""The command line, run on tiny settings: outputs exist and parse, numbers are sane."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from normfuse.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_trains_twice_and_shows_gamma_beta_learning(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "12", "--width", "32", "--layers", "1", "--context", "16",
                 "--batch", "4", "--sample-chars", "20", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "demo.json").read_text())
    normfuse_losses, torch_losses = summary["losses"]["normfuse"], summary["losses"]["torch"]
    assert len(normfuse_losses) == len(torch_losses) == 12
    # the same function from the same seed: the two runs agree to rounding
    assert max(abs(a - b) for a, b in zip(normfuse_losses, torch_losses)) < 1e-3
    assert normfuse_losses[-1] < normfuse_losses[0]  # it learns
    for stats in summary["learned"].values():  # every LayerNorm's gamma and beta moved
        assert stats["gamma_moved_mean"] > 0 and stats["beta_moved_mean"] > 0
    assert set(summary["learned"]) == {"blocks.0.norm_attn", "blocks.0.norm_mlp", "norm_final"}
    assert all(v > 0 for v in summary["tokens_per_s"].values())
    for png in ("loss.png", "gamma_beta.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out.replace("\n", "")  # rich wraps long paths at the console's width
    assert "largest loss difference" in printed and str(out / "loss.png") in printed


def test_demo_says_when_it_overwrites(tmp_path, capsys):
    args = ["demo", "--steps", "2", "--width", "16", "--layers", "1", "--context", "8", "--batch", "2",
            "--sample-chars", "5", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "overwriting" in capsys.readouterr().out


@pytest.mark.parametrize("op,peers", [("layer_norm", ["torch"]), ("rms_norm", ["torch", "llama"]), ("add_rms_norm", ["torch"])])
def test_bench_quick_writes_json_and_png(tmp_path, op, peers):
    args = ["bench", "--op", op, "--quick", "--no-compile", "--mib", "1", "--dtypes", "float32", "--out", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "torch" in report["machine"] and report["op"] == op and len(report["results"]) == 3
    for entry in report["results"]:
        assert entry["copy_gbs"] > 0
        for key in ["normfuse fwd", "normfuse f+b"] + [f"{p} {m}" for p in peers for m in ("fwd", "f+b")]:
            assert 0 < entry[key]["ms"] < 1e4 and entry[key]["gbs"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_bench_floor_moves_what_a_forward_backward_must(op):
    """The f+b floor is only copies and adds into buffers, and passes over exactly as many
    tensors as ``TENSORS_MOVED`` counts for the op (a copy reads one and writes one, an add
    into a buffer reads two and writes one, an addcmul three and one)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from normfuse.cli.bench import TENSORS_MOVED, contenders, implementations

    passes = {torch.ops.aten.copy_.default: 2, torch.ops.aten.add.out: 3, torch.ops.aten.addcmul.out: 4}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    calls = contenders(op, 8, 32, torch.float32, "cpu", implementations(op, compiled=False), floor=True)
    assert "f+b floor" not in contenders(op, 8, 32, torch.float32, "cpu", {})
    with Record():
        calls["f+b floor"]()
    assert set(seen) <= set(passes)
    assert sum(passes[f] for f in seen) == TENSORS_MOVED[op]["f+b"]


def test_verify_passes_and_reports(tmp_path):
    path = tmp_path / "verify.json"
    assert main(["verify", "--quick", "--out", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report and all(case["ok"] for case in report)
    big_mean = next(c for c in report if c["dtype"] == "float32" and c["input"] == "mean 1e4")
    # the numbers are the real comparison: normfuse well inside its bound, torch's CPU kernel not
    assert big_mean["normfuse"]["out"] < 1e-5 < big_mean["torch"]["out"]


@pytest.mark.parametrize(
    "args",
    [["demo", "--steps", "0"], ["demo", "--steps", "many"], ["bench", "--device", "tpu"], ["nonsense"], []],
)
def test_bad_arguments_give_one_line_and_status_2(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err


@pytest.mark.parametrize("command", ["demo", "bench", "verify"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_python_dash_m_runs():
    done = subprocess.run([sys.executable, "-m", "normfuse", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_bench_model_training_step(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install normfuse[hf])")
    args = ["bench", "--model", "llama", "--quick", "--width", "64", "--layers", "1", "--seq", "16", "--batch", "2",
            "--dtypes", "float32", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (result,) = json.loads((tmp_path / "bench_model_llama.json").read_text())["results"]
    assert result["norms"] == 3  # two per decoder layer and the final one
    for key in ("step_s", "norm_s", "norm_share", "saved_bytes"):
        assert result[key]["torch"] > 0 and result[key]["normfuse"] > 0


# BERT: the embeddings' LayerNorm and the layer's two, its two output blocks fused, and the MLM
# head's; BART: the encoder's and decoder's embedding norms and their layers' 2 and 3, the two
# layers fused (each with its dropouts)
@pytest.mark.parametrize("kind,patched", [("bert", 6), ("bart", 9)])
def test_bench_model_with_fused_residual_adds(kind, patched, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install normfuse[hf])")
    args = ["bench", "--model", kind, "--fuse", "--quick", "--width", "64", "--layers", "1", "--seq", "16",
            "--batch", "2", "--dtypes", "float32", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (result,) = json.loads((tmp_path / f"bench_model_{kind}_fused.json").read_text())["results"]
    assert result["fused"] and result["norms"] == patched and result["norm_share"] is None
    assert result["step_s"]["torch"] > 0 and result["step_s"]["normfuse"] > 0
