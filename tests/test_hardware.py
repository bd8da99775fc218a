"""Hardware detection on this (CPU-only) machine, the hardware and served records, and node
adverts with and without the new fields (an older peer's advert still decodes)."""

from __future__ import annotations

import os
import platform
from typing import Any

import msgpack
import psutil
import pytest

from schemas.codec import WireError, pack
from schemas.jobs import ModelAdvert, NodeAdvert
from schemas.nodes import NOTHING_SERVED, Gpu, Hardware, Served
from worker.hardware import cpu_model_from_cpuinfo, detect_hardware, nvml_gpus

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model\t\t: 85
model name\t: Intel(R) Xeon(R)   Gold 6230 CPU @ 2.10GHz
"""
ARM = """processor\t: 0
BogoMIPS\t: 108.00
CPU part\t: 0xd08

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def test_this_machine_is_detected_sanely() -> None:
    hw = detect_hardware()
    assert hw.cpu and hw.cpu == hw.cpu.strip()
    assert hw.cores == os.cpu_count()
    assert hw.memory == psutil.virtual_memory().total
    assert hw.system == f"{platform.system()} {platform.machine()}"
    assert hw.gpus == ()  # no GPU here, whether torch is loaded or not
    assert nvml_gpus() == ()  # nvidia-ml-py without NVIDIA's driver: skipped cleanly


def test_cpu_model_lines() -> None:
    assert cpu_model_from_cpuinfo(X86) == "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"
    assert cpu_model_from_cpuinfo(ARM) == "Raspberry Pi 4 Model B Rev 1.4"
    assert cpu_model_from_cpuinfo("processor : 0\n") == ""


HW = Hardware(
    cpu="AMD EPYC 7B13",
    cores=64,
    memory=256 << 30,
    gpus=(Gpu("NVIDIA H100 80GB HBM3", 80 << 30), Gpu("NVIDIA H100 80GB HBM3", 80 << 30)),
    system="Linux x86_64",
)


def advert(**extra: Any) -> NodeAdvert:
    return NodeAdvert(node="n1", pool="own", models=(ModelAdvert("m", 4096),), slots_total=4, slots_free=3, **extra)


def test_adverts_round_trip_with_and_without_the_new_fields() -> None:
    full = advert(paused=True, draining=True, hardware=HW, served=Served(7, 700, 90))
    assert NodeAdvert.decode(full.encode()) == full
    bare = advert()
    decoded = NodeAdvert.decode(bare.encode())
    assert decoded == bare and decoded.hardware is None and decoded.served == NOTHING_SERVED and not decoded.paused


def test_an_older_workers_advert_still_decodes() -> None:
    old = pack({"node": "n0", "pool": "own", "models": [["m", 0, "tokenyard"]], "total": 2, "free": 2})
    a = NodeAdvert.decode(old)
    assert (a.node, a.hardware, a.served, a.paused) == ("n0", None, NOTHING_SERVED, False)


def test_newer_fields_inside_the_records_are_ignored() -> None:
    wire = msgpack.unpackb(advert(hardware=HW, served=Served(1, 2, 3)).encode())
    wire["hw"]["npu"] = "something new"
    wire["hw"]["gpus"][0]["uuid"] = "GPU-1234"
    wire["served"]["by_model"] = {"m": 1}
    a = NodeAdvert.decode(msgpack.packb(wire))
    assert a.hardware == HW and a.served == Served(1, 2, 3)


@pytest.mark.parametrize(
    "hw",
    [
        "a GPU",
        {"cores": "many"},
        {"gpus": "one"},
        {"gpus": [{"name": 5}]},
        {"mem": -1},
        {"cores": True},
    ],
)
def test_malformed_hardware_is_a_wire_error(hw: object) -> None:
    wire = msgpack.unpackb(advert().encode())
    wire["hw"] = hw
    with pytest.raises(WireError):
        NodeAdvert.decode(msgpack.packb(wire))


def test_the_records_stand_alone() -> None:
    assert Hardware.decode(HW.encode()) == HW
    assert Hardware.decode(pack({})) == Hardware()
    served = NOTHING_SERVED.plus(10, 5).plus(3, 2)
    assert (served.requests, served.tokens) == (2, 20)
    assert Served.decode(served.encode()) == served
    with pytest.raises(WireError):
        Served.decode(pack({"req": "two"}))
