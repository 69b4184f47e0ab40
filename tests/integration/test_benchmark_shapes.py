"""workflows/benchmark.py's model-shape modes at a tiny shape on CPU: --ssi-7b-layer (streaming
SSI, peak RSS) and --preset gpu-7b-shape (DeepSpeed steps + SSI on one device). The same code runs
at Llama-2-7B shape; here only that it runs and writes consistent figures is checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))
import benchmark  # noqa: E402  (workflows/benchmark.py)

from safeanchor import bench  # noqa: E402


def test_synthetic_examples_are_exactly_seq_len_tokens():
    from safeanchor.data import encode_dataset

    tok = bench.synthetic_tokenizer()
    feats = encode_dataset(tok, bench.synthetic_examples(4, 40, seed=0), 40)
    assert [len(f["input_ids"]) for f in feats] == [40] * 4
    assert all(sum(x != -100 for x in f["labels"]) >= 8 for f in feats)  # a response with a loss


def test_ssi_layer_mode_at_tiny_shape(tmp_path):
    out = tmp_path / "ssi.json"
    argv = ["--ssi-7b-layer", "--shape", "tiny", "--n-examples", "12", "--seq-len", "24", "--group-mb", "0.02",
            "--out", str(out)]
    assert benchmark.main(argv) == 0
    fig = json.loads(out.read_text())
    assert fig["ssi_peak_gb"] >= fig["model_rss_gb"] > 0 and fig["ssi_s"] > 0
    assert len(fig["tensors"]) == 8  # 1 layer x q/k/v/o x A/B
    assert all(t["path"] == "gram" and 1 <= t["k"] <= 12 and t["trace"] > 0 for t in fig["tensors"].values())
    # 0.02 MiB = 20,971 bytes of rows per pass: each tensor's 12 x 1,024 x 4 = 49,152 bytes is alone
    assert len(fig["passes"]) == 8
    assert sum(p["rows_gb"] for p in fig["passes"]) == pytest.approx(fig["all_gradients_gb"])
    assert fig["command"].startswith("python workflows/benchmark.py --ssi-7b-layer")


def test_gpu_preset_at_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--preset", "gpu-7b-shape", "--shape", "tiny", "--device", "cpu", "--seq-len", "24", "--calib", "8",
            "--steps", "1", "--rounds", "1", "--batch-size", "2", "--out", str(out)]
    assert benchmark.main(argv) == 0
    fig = json.loads(out.read_text())
    for k in ("lora_step_s", "projection_step_s", "safeanchor_step_s", "ssi_s"):
        assert fig[k] > 0, k
    assert fig["ratio_safeanchor"] == fig["safeanchor_step_s"] / fig["lora_step_s"]
    assert (fig["shape"], fig["device"], fig["dtype"], fig["zero_stage"]) == ("tiny", "cpu", "float32", 2)
    assert fig["projected_tensors"] == 16 and fig["calib_examples"] == 8  # 2 layers x q/k/v/o x A/B


def test_shape_modes_refuse_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--ssi-7b-layer", "--preset", "gpu-7b-shape"])
    assert e.value.code == 2 and "exactly one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--preset", "no-such-preset"])
