"""dnr.precision.ieee_float32: TF32 off inside the block, the user's flags back after it (also on an error)."""

import pytest
import torch

from dnr.precision import ieee_float32


def _flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("before", [(True, True), (True, False), (False, True)])
def test_tf32_is_off_inside_and_restored_after(before):
    saved = _flags()
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
        with ieee_float32():
            assert _flags() == (False, False)
        assert _flags() == before
        with pytest.raises(RuntimeError, match="inside"):
            with ieee_float32():
                raise RuntimeError("inside")
        assert _flags() == before
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
