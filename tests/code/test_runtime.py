import logging
import sys

import pytest

from flywheel.config import ConfigError
from flywheel.runtime import (
    Device,
    NoTracebackForExpectedErrors,
    cpu_bf16_supported,
    seed_everything,
    select_device,
)


def record_for(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", (), info)


def test_expected_errors_lose_their_traceback_others_keep_it():
    expected = record_for(ConfigError("split: must sum to 1"))
    assert NoTracebackForExpectedErrors().filter(expected)
    assert expected.exc_info is None
    unexpected = record_for(ZeroDivisionError("bug"))
    assert NoTracebackForExpectedErrors().filter(unexpected)
    assert unexpected.exc_info is not None


@pytest.mark.parametrize(
    ("preference", "precision", "cuda", "mps", "bf16", "cpu_bf16", "expected"),
    [
        ("auto", "auto", True, True, True, True, Device("cuda", "bfloat16", False)),
        ("auto", "auto", True, False, False, True, Device("cuda", "float16", True)),
        ("auto", "fp32", True, False, True, True, Device("cuda", None, False)),
        ("auto", "fp16", True, False, True, False, Device("cuda", "float16", True)),
        ("auto", "auto", False, True, False, True, Device("mps", None, False)),
        ("mps", "bf16", True, True, True, True, Device("mps", None, False)),
        # a CPU with native bf16 (AVX-512 BF16, AMX) trains under bf16 autocast; others in fp32
        ("auto", "auto", False, False, False, True, Device("cpu", "bfloat16", False)),
        ("auto", "auto", False, False, False, False, Device("cpu", None, False)),
        ("cpu", "auto", True, True, True, True, Device("cpu", "bfloat16", False)),
        ("cpu", "auto", True, True, True, False, Device("cpu", None, False)),
        ("cpu", "bf16", False, False, False, True, Device("cpu", "bfloat16", False)),
        ("cpu", "fp32", False, False, False, True, Device("cpu", None, False)),
        ("cpu", "fp16", False, False, False, True, Device("cpu", None, False)),
    ],
)
def test_device_choice(preference, precision, cuda, mps, bf16, cpu_bf16, expected):
    chosen = select_device(
        preference,
        precision,
        cuda_available=cuda,
        mps_available=mps,
        bf16_supported=bf16,
        cpu_bf16=cpu_bf16,
    )
    assert chosen == expected


def test_device_errors_are_explicit():
    with pytest.raises(ConfigError, match="no cuda device is available"):
        select_device("cuda", cuda_available=False, mps_available=False, bf16_supported=False)
    with pytest.raises(ConfigError, match="does not support bfloat16"):
        select_device(
            "cuda", "bf16", cuda_available=True, mps_available=False, bf16_supported=False
        )
    with pytest.raises(ConfigError, match="this CPU has no native bfloat16"):
        select_device(
            "cpu",
            "bf16",
            cuda_available=False,
            mps_available=False,
            bf16_supported=False,
            cpu_bf16=False,
        )
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        select_device("tpu", cuda_available=False, mps_available=False, bf16_supported=False)
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        select_device("cpu", "int4")


def test_this_machine_trains_on_cpu_in_bf16_where_the_cpu_has_it():
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_bf16_supported() == native
    assert select_device() == Device("cpu", "bfloat16" if native else None, False)


def test_seed_everything_makes_torch_and_numpy_repeat():
    import numpy as np
    import torch

    seed_everything(7)
    first = (torch.rand(3), np.random.rand(3))
    seed_everything(7)
    second = (torch.rand(3), np.random.rand(3))
    assert torch.equal(first[0], second[0])
    assert (first[1] == second[1]).all()
