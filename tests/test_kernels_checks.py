"""The shared argument checks: one wording for the same mistake."""

import pytest
import torch

from newtonlm.kernels.checks import check_device, check_dtype, check_floating, check_shape


def test_check_shape_messages():
    x = torch.zeros(2, 5, 4)
    check_shape("r", x, (2, 5, 4))
    check_shape("r", x, (None, None, 4), "[B, T, N]")
    msg = r"^J has shape \(2, 5, 4\); expected \(2, 4, 4\) \(\[B, T, N\] like r\)$"
    with pytest.raises(ValueError, match=msg):
        check_shape("J", x, (2, 4, 4), "[B, T, N] like r")
    with pytest.raises(ValueError, match=r"^r has shape \(2, 5, 4\); expected \[B, T, 2, N\]$"):
        check_shape("r", x, (None, None, 2, None), "[B, T, 2, N]")
    with pytest.raises(ValueError, match=r"^u has shape \(2, 5, 4\); expected \[\*, \*, 3, \*\]$"):
        check_shape("u", x, (None, None, 3, None))
    with pytest.raises(ValueError, match=r"^h0 is list; expected \(2, 4\)$"):
        check_shape("h0", [1, 2], (2, 4))


def test_device_dtype_floating_messages():
    x = torch.zeros(3)
    check_device("h0", x, torch.device("cpu"), "u")
    with pytest.raises(ValueError, match=r"^h0 is on meta; expected cpu like u$"):
        check_device("h0", x.to("meta"), torch.device("cpu"), "u")
    with pytest.raises(ValueError, match=r"^J has dtype torch.float64; expected torch.float32 like r$"):
        check_dtype("J", x.double(), torch.float32, "r")
    with pytest.raises(ValueError, match=r"^x has dtype torch.int64; expected a floating-point dtype$"):
        check_floating("x", x.long())
