"""baton_kernels.pdl's switch, on this CPU machine (the launches themselves run in tests/gpu)."""

from types import SimpleNamespace

import pytest
import torch

from baton_kernels import pdl
from engine.layers import Kernels


@pytest.fixture()
def pdl_setting():
    """Restores the process's PDL setting after a test that changes it."""
    previous = pdl.set_enabled(True)
    yield
    pdl.set_enabled(previous)


def test_pdl_is_off_for_cpu_tensors_and_old_cuda_runtimes():
    assert not pdl.use_pdl(torch.zeros(1))
    assert not pdl.supported(torch.device("cpu"))
    assert pdl._version(None) == () and pdl._version(None) < (12, 3)  # a CPU build of torch
    assert pdl._version("12.1") < (12, 3) <= pdl._version("12.4") < pdl._version("13.0")


def test_set_enabled_turns_pdl_off_and_on_for_later_launches(monkeypatch, pdl_setting):
    monkeypatch.setattr(pdl, "_supported", lambda device_index: True)  # as on an H100
    on_gpu = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    assert pdl.use_pdl(on_gpu)  # type: ignore[arg-type]
    assert pdl.set_enabled(False) is True  # returns the previous setting
    assert not pdl.use_pdl(on_gpu)  # type: ignore[arg-type]
    assert pdl.set_enabled(True) is False
    assert pdl.use_pdl(on_gpu)  # type: ignore[arg-type]


def test_the_engines_kernels_set_pdl_on_the_triton_path_only(pdl_setting):
    Kernels(triton=True, pdl=False).configure_launches()
    assert pdl._enabled is False
    Kernels(triton=False).configure_launches()  # the torch path launches no Triton kernel:
    assert pdl._enabled is False  # it leaves the setting as it was
    Kernels(triton=True, pdl=True).configure_launches()
    assert pdl._enabled is True
