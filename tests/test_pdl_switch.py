"""baton_kernels.pdl's switch, on this CPU machine (the launches themselves run in tests/gpu)."""

import torch

from baton_kernels import pdl


def test_pdl_is_off_for_cpu_tensors_and_old_cuda_runtimes():
    assert not pdl.use_pdl(torch.zeros(1))
    assert pdl._version(None) == () and pdl._version(None) < (12, 3)  # a CPU build of torch
    assert pdl._version("12.1") < (12, 3) <= pdl._version("12.4") < pdl._version("13.0")
