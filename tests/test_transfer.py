"""`to_device`: host values onto a device, through pinned memory on CUDA."""

import numpy as np
import pytest
import torch

from cpm4.model.transfer import to_device


def test_values_dtypes_and_tensors_on_the_cpu():
    assert torch.equal(to_device([3, 1, 2], "cpu"), torch.tensor([3, 1, 2]))
    t = to_device(np.array([1, 2]), "cpu", torch.int32)
    assert t.dtype == torch.int32 and t.tolist() == [1, 2]
    src = torch.arange(5)
    assert to_device(src, "cpu", torch.float64).dtype == torch.float64
    assert to_device(src, torch.device("cpu")) is src  # already there: no copy


@pytest.mark.gpu
def test_pinned_copy_to_cuda_equals_the_values():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src = torch.randint(0, 1000, (4, 300))
    out = to_device(src, "cuda")
    src.zero_()  # the copy is of a pinned snapshot: changing the source after the call changes nothing
    torch.cuda.synchronize()
    assert out.is_cuda and out.sum().item() > 0
    assert to_device([1, 2, 3], "cuda", torch.int32).cpu().tolist() == [1, 2, 3]
