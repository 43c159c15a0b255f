"""newtonlm.machine: the one machine description of the benchmarks and evaluation reports."""

import json
import os
import platform

import pytest
import torch

from newtonlm.machine import cpu_name, machine_info, machine_line

INFO = {"cpu": "Intel(R) Xeon(R) Processor", "cpu_count": 2, "threads": 1, "load_average": 3.14159,
        "platform": "Linux-6.18-x86_64", "python": "3.11.7", "torch": "2.13.0+cpu", "gpu": None,
        "gpu_count": 0}


def test_cpu_name_reads_the_model_name_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) "
                       "Processor @ 2.10GHz\nflags\t\t: fpu sse\n")
    assert cpu_name(str(cpuinfo)) == "Intel(R) Xeon(R) Processor @ 2.10GHz"


def test_cpu_name_falls_back_to_platform_without_a_model_name(tmp_path):
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n")  # an ARM kernel's file
    expected = platform.processor() or platform.machine() or "unknown"
    assert cpu_name(str(arm)) == expected
    assert cpu_name(str(tmp_path / "absent")) == expected


def test_machine_info_reports_this_process():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        info = machine_info()
    finally:
        torch.set_num_threads(threads)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert info["threads"] == 1 and info["cpu_count"] == os.cpu_count() and info["gpu_count"] == gpus
    assert info["torch"] == torch.__version__ and info["python"] == platform.python_version()
    assert info["platform"] == platform.platform() and info["cpu"] == cpu_name()
    assert info["gpu"] == (torch.cuda.get_device_name(0) if gpus else None)
    assert isinstance(info["load_average"], float) and info["load_average"] >= 0
    # the keys the committed benchmark JSON in docs/ has (platform, cpu_count, torch, threads)
    assert {"platform", "cpu_count", "torch", "threads"} <= set(info)
    assert json.loads(json.dumps(info)) == info


def test_machine_line_formats_every_field():
    assert machine_line(INFO) == ("Intel(R) Xeon(R) Processor, 2 cores, no GPU; torch 2.13.0+cpu (1 thread), "
                                  "Python 3.11.7, Linux-6.18-x86_64; load average 3.1")
    gpu = {**INFO, "gpu": "NVIDIA H200", "gpu_count": 8, "threads": 16}
    assert machine_line(gpu, load_at_start=0.31) == (
        "Intel(R) Xeon(R) Processor, 2 cores, 8 x NVIDIA H200; torch 2.13.0+cpu (16 threads), Python 3.11.7, "
        "Linux-6.18-x86_64; load average 0.3 at the start, 3.1 at the end")
    with pytest.raises(KeyError, match="gpu_count"):
        machine_line({k: v for k, v in INFO.items() if k != "gpu_count"})
