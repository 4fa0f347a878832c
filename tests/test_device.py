"""`model.device`: its spelling is checked with the config, whether this process can use it where the model loads.

A misspelt device fails `vb-batch validate` (exit 2, the field named); a device this torch
build cannot reach fails the run when the backend loads, as a config error (exit 2), never a
traceback. Availability is not checked at config time: a Ray or Spark driver may have no GPU
while its workers do.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from vb_batch.cli import main
from vb_batch.config import ConfigError, load_config
from vb_batch.models.loading import resolve_device

CPU_ONLY_TORCH = torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def write_job(tmp_path, input_path, device: str, backend: str = "demo"):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": str(input_path)},
        "output": {"path": str(tmp_path / "out")},
        "model": {"backend": backend, "device": device},
        "run": {"progress": False},
    }))
    return path


@pytest.mark.parametrize("device, hint", [("gpu", "'cuda'"), ("GPU:1", "'cuda:1'"), ("cuda1", "'cuda:1'"), ("tpu", "")])
def test_validate_names_the_field_of_a_misspelt_device(painted_table, tmp_path, capfd, device, hint):
    paths, _ = painted_table
    assert main(["validate", str(write_job(tmp_path, paths["depth"], device))]) == 2
    err = capfd.readouterr().err
    assert "model.device: " in err and f"did you mean {hint}" in err if hint else "did you mean" not in err
    assert "Traceback" not in err


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps", "xpu:0", "cpu:0"])
def test_every_torch_device_spelling_passes_the_config(device):
    # Checked for spelling only: a CPU-only driver may validate a job whose workers have GPUs.
    assert load_config({"input": {"path": "x"}, "model": {"backend": "identity", "device": device}}).model.device == device


@pytest.mark.slow  # the demo backend imports diffusers (~9 s on its own; shared with the other model tests)
@pytest.mark.skipif(not CPU_ONLY_TORCH, reason="needs a torch build without CUDA")
def test_a_run_on_cuda_with_a_cpu_only_torch_is_a_config_error(painted_table, tmp_path, capfd):
    paths, _ = painted_table
    assert main(["run", str(write_job(tmp_path, paths["depth"], "cuda"))]) == 2
    err = capfd.readouterr().err
    assert err.startswith("vb-batch: model.device: 'cuda', but this torch build") and "has no CUDA" in err
    assert "install a CUDA build of torch" in err and "model.device: cpu" in err
    assert "Traceback" not in err


def test_devices_this_process_cannot_use_are_config_errors():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match=r"^model\.device: 'mps'"):
            resolve_device("mps")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert resolve_device(f"cuda:{count - 1}") == f"cuda:{count - 1}"
        with pytest.raises(ConfigError, match=rf"only {count} CUDA GPU"):
            resolve_device(f"cuda:{count}")
    else:
        with pytest.raises(ConfigError, match=r"^model\.device: 'cuda:0'"):
            resolve_device("cuda:0")
