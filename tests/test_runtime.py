"""One runtime policy: device, precision vocabulary and its old spellings, autocast."""

import logging
import os

import pytest
import torch

from transfer.errors import PipelineError
from transfer.params import params_from_dict
from transfer.runtime import Runtime, inference_runtime, resolve_runtime, set_determinism


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_asked_for_without_a_gpu_and_float16_on_cpu_are_refused(no_gpu):
    with pytest.raises(PipelineError, match="finetune.device: cuda, but PyTorch sees no CUDA"):
        resolve_runtime("cuda", "auto", key="finetune.precision")
    with pytest.raises(PipelineError, match="backbone.precision: float16 .* needs a CUDA"):
        resolve_runtime("auto", "float16", key="backbone.precision")
    runtime = resolve_runtime("auto", "auto", training=True, distributed=True)
    assert (runtime.device.type, runtime.precision, runtime.world_size) == ("cpu", "float32", 1)


def test_auto_precision_on_a_gpu_is_float16_to_infer_and_bfloat16_to_train(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_runtime().precision == "float16"
    assert resolve_runtime(training=True).precision == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_runtime(training=True).precision == "float16"


def test_a_recorded_float16_runs_in_float32_on_cpu(no_gpu):
    assert inference_runtime("float16").precision == "float32"
    assert inference_runtime("bfloat16").precision == "bfloat16"


def test_autocast_follows_the_precision():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    with Runtime(cpu, "bfloat16").autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with Runtime(cpu, "float32").autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.float32


@pytest.mark.parametrize(("old", "new"), [("32", "float32"), (32, "float32"),
                                          ("bf16", "bfloat16"), (16, "float16")])
def test_old_precision_spellings_are_read_with_a_notice(old, new, caplog):
    with caplog.at_level(logging.WARNING):
        params = params_from_dict({"finetune": {"precision": old}})
    assert params.finetune.precision == new
    assert f"finetune.precision={old} is an old spelling, read as {new}" in caplog.text


def test_both_precision_keys_share_one_vocabulary():
    for section in ("backbone", "finetune"):
        for value in ("auto", "float32", "bfloat16", "float16"):
            params = params_from_dict({section: {"precision": value}})
            assert getattr(params, section).precision == value


def test_set_determinism_switches_torch_and_cudnn_both_ways(determinism_restored):
    assert not torch.are_deterministic_algorithms_enabled()
    set_determinism(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    set_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
