"""The GPU check (bench/gpu/gpu_check.py) as it runs on a machine without a GPU and, as on the
device image, without Ray, DeepSpeed or vLLM: every measured row comes out, and the attention
paths compute the same loss on the same examples. Beside it, bench/gpu/vllm_decode.py (vLLM's
engine against ours) on vLLM's CPU build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu" / "gpu_check.py"
VLLM_PYTHON = Path(os.environ.get("DOLLY_VLLM_ENV", REPO / ".venv-vllm")) / "bin" / "python"
# The device image has none of these: a None in sys.modules makes `import ray` raise ImportError.
WITHOUT_THE_CLUSTER_STACK = "import sys, runpy; sys.modules.update(ray=None, deepspeed=None, vllm=None); sys.argv = {argv!r}; runpy.run_path({script!r}, run_name='__main__')"


@pytest.fixture(scope="module")
def lengths(tmp_path_factory, corpus_path, tokenizer_path) -> Path:
    """The lengths file, made here where ../shared is, from the first 400 records."""
    out = tmp_path_factory.mktemp("lengths") / "lengths.json"
    made = ["lengths", "--corpus", str(corpus_path), "--tokenizer", tokenizer_path, "--records", "400", "--out", str(out)]
    subprocess.run([sys.executable, SCRIPT, *made], check=True, timeout=120)
    return out


def test_the_gpu_check_runs_end_to_end_on_a_cpu_without_ray_deepspeed_or_vllm_and_its_attention_paths_agree(tmp_path, lengths):
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "gpu_check.json"
    argv = [str(SCRIPT), "run", "--smoke", "--lengths", str(lengths), "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_CLUSTER_STACK.format(argv=argv, script=str(SCRIPT))],
        check=True,
        env=env,
        timeout=240,
        capture_output=True,
        text=True,
    )
    report = json.loads(out.read_text())

    measured = {row["path"]: row for row in report["train"] if row["status"] == "ok"}
    assert set(measured) == {"padded + sdpa", "packed + sdpa", "flattened + sdpa"}
    assert {row["path"]: row["status"] for row in report["train"] if row["status"] != "ok"} == {
        "flattened + flash_attention_2": "needs CUDA",
        "flattened + flex_attention": "needs CUDA (flex_attention has no backward on CPU)",
    }
    assert (report["spec_preset"], report["spec_peak_tflops"]) == (None, None), "a CPU has no spec peak"
    for row in measured.values():
        assert all(row[key] > 0 for key in ("tokens_per_s", "mfu_measured", "step_s", "warmup_s")), row
        assert row["mfu_spec"] is None, row
        assert row["tokens_per_step"] == measured["padded + sdpa"]["tokens_per_step"], "every path trains on the same examples"
    padded = measured["padded + sdpa"]["loss"]
    assert measured["flattened + sdpa"]["loss"] == pytest.approx(padded, rel=1e-5)
    assert measured["packed + sdpa"]["loss"] == pytest.approx(padded, rel=1e-5)

    decode = {(row["engine"], row["concurrency"]): row for row in report["decode"]}
    assert set(decode) == {(engine, level) for engine in ("ours", "Dolly's generate") for level in (1, 8, 32)}
    assert all(row["tokens_per_s"] > 0 and row["ttft_p50_s"] > 0 for row in decode.values())
    assert "| pythia-14m-random | flattened + sdpa |" in run.stdout and "| 32 |" in run.stdout, "the tables RESULTS.md records"
    assert "| MFU (measured peak) | MFU (spec peak) |" in run.stdout


def test_the_spec_peak_is_the_preset_of_the_device_the_training_loop_would_use():
    import runpy

    spec_peak = runpy.run_path(str(SCRIPT))["spec_peak"]
    assert spec_peak("NVIDIA H100 80GB HBM3") == ("h100", 989)
    assert spec_peak("NVIDIA A100-SXM4-40GB") == ("a100", 312)
    assert spec_peak("NVIDIA A10") == ("a10", 125), "A10 is not A100"
    assert spec_peak("NVIDIA H200") == (None, None) and spec_peak("cpu") == (None, None)


def test_vllms_engine_and_ours_decode_the_same_bursts_side_by_side(tmp_path, lengths):
    """bench/gpu/vllm_decode.py --smoke, from vLLM's environment on its CPU build: both engines at
    every level, a request's tokens counted alike (8 at most, the stop token not among them)."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} is absent: `make vllm` builds vLLM's environment (or set DOLLY_VLLM_ENV)")
    out = tmp_path / "vllm_decode.json"
    script = REPO / "bench" / "gpu" / "vllm_decode.py"
    run = subprocess.run(
        [str(VLLM_PYTHON), str(script), "--smoke", "--lengths", str(lengths), "--out", str(out)],
        env={k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")} | {"VLLM_CPU_KVCACHE_SPACE": "1"},
        cwd=tmp_path,
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    decode = {(row["engine"], row["concurrency"]): row for row in json.loads(out.read_text())["decode"]}
    assert set(decode) == {(engine, level) for engine in ("ours", "vLLM") for level in (1, 8, 32)}
    assert all(0 < row["tokens"] <= 8 * row["concurrency"] for row in decode.values()), decode
    assert all(row["tokens_per_s"] > 0 and row["ttft_p50_s"] > 0 for row in decode.values())
    assert "| concurrency | ours tok/s | vLLM tok/s | ours / vLLM |" in run.stdout and "| 32 |" in run.stdout
