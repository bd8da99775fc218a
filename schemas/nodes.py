"""What a node says about itself beyond its capacity: the hardware it runs on and what it served.

Both ride in the node's advert (`schemas.jobs.NodeAdvert`) as nested maps, and each is also a
`schemas.codec` record of its own (`encode` / `decode`) for whoever keeps them, such as a node
registry. Read tolerantly: unknown keys are ignored and missing ones take their defaults, so
peers of different versions understand each other; a value of the wrong kind is a `WireError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.codec import WireError, pack, unpack


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str  # e.g. "NVIDIA GeForce RTX 4090", "Apple M2 Pro (MPS)"
    memory: int = 0  # bytes of device memory (MPS: what the system recommends at most); 0 = unknown

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "mem": self.memory}

    @classmethod
    def from_wire(cls, d: Any) -> Gpu:
        m = _map(d, "gpu")
        return cls(name=_text(m.get("name", ""), "gpu name"), memory=_count(m.get("mem", 0), "gpu memory"))


@dataclass(frozen=True, slots=True)
class Hardware:
    """A node's machine, detected once when the worker starts (`worker.hardware`)."""

    cpu: str = ""  # the CPU model, e.g. "AMD EPYC 7B13"; "" = unknown
    cores: int = 0  # logical CPUs
    memory: int = 0  # bytes of RAM
    gpus: tuple[Gpu, ...] = ()
    system: str = ""  # operating system and architecture, e.g. "Linux x86_64"

    def to_wire(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "cores": self.cores,
            "mem": self.memory,
            "gpus": [g.to_wire() for g in self.gpus],
            "sys": self.system,
        }

    @classmethod
    def from_wire(cls, d: Any) -> Hardware:
        m = _map(d, "hardware")
        gpus = m.get("gpus", ())
        if not isinstance(gpus, (list, tuple)):
            raise WireError("bad hardware: 'gpus' is not a list")
        return cls(
            cpu=_text(m.get("cpu", ""), "cpu"),
            cores=_count(m.get("cores", 0), "cores"),
            memory=_count(m.get("mem", 0), "memory"),
            gpus=tuple(Gpu.from_wire(g) for g in gpus),
            system=_text(m.get("sys", ""), "system"),
        )

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> Hardware:
        return cls.from_wire(unpack(data))


@dataclass(frozen=True, slots=True)
class Served:
    """What a node served since it started: requests it finished and their tokens."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def plus(self, prompt_tokens: int, completion_tokens: int) -> Served:
        """These counts after one more finished request."""
        return Served(self.requests + 1, self.prompt_tokens + prompt_tokens, self.completion_tokens + completion_tokens)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_wire(self) -> dict[str, Any]:
        return {"req": self.requests, "in": self.prompt_tokens, "out": self.completion_tokens}

    @classmethod
    def from_wire(cls, d: Any) -> Served:
        m = _map(d, "served")
        return cls(
            requests=_count(m.get("req", 0), "served requests"),
            prompt_tokens=_count(m.get("in", 0), "served prompt tokens"),
            completion_tokens=_count(m.get("out", 0), "served completion tokens"),
        )

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> Served:
        return cls.from_wire(unpack(data))


NOTHING_SERVED = Served()


def _map(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"bad {what}: not a map")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"bad {what}: not a string")
    return value


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"bad {what}: {value!r} is not a count")
    return value
