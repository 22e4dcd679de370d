"""Where a new container goes: the agent that fits its resources, preferring one that holds its snapshot,
then its image, then the least loaded one (which spreads a function's containers over the cluster).

Pure logic on plain values (the caller snapshots the agents' state under its lock), tested with made-up agents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from warmboot.worker.gpus import Gpu, parse_request

#: The CPU share a container without ``cpu=`` is counted for (Modal's default request is 0.125 cores).
DEFAULT_CPU = 0.125
#: The memory a container without ``memory=`` is counted for, in MiB (Modal's default request is 128 MiB).
DEFAULT_MEMORY_MB = 128


@dataclass(frozen=True)
class Demand:
    """What one container of a function needs, and what would make an agent start it faster."""

    cpu: float = DEFAULT_CPU
    memory_mb: int = DEFAULT_MEMORY_MB
    gpu: str | None = None  #: ``gpu=`` as the function gave it (``"h100:2"``, ``"any"``)
    warm_key: str = ""  #: ``server.apps.warm_key``: agents that report it hold the snapshot locally
    image: str = ""  #: the image digest

    @classmethod
    def from_options(cls, options: dict, warm_key: str, image: str) -> Demand:
        cpu = options.get("cpu")
        memory = options.get("memory")
        if isinstance(cpu, (list, tuple)):  # (request, limit): the request is what is reserved
            cpu = cpu[0]
        if isinstance(memory, (list, tuple)):
            memory = memory[0]
        return cls(
            cpu=float(cpu) if cpu else DEFAULT_CPU,
            memory_mb=int(memory) if memory else DEFAULT_MEMORY_MB,
            gpu=str(options["gpu"]) if options.get("gpu") else None,
            warm_key=warm_key,
            image=image,
        )


@dataclass
class Candidate:
    """An agent as placement sees it: what it has, what the containers placed on it use, what it holds."""

    name: str
    cpus: float
    memory_mb: int
    gpus: list[str]  #: model per GPU index
    used_cpu: float = 0.0
    used_memory_mb: int = 0
    used_gpus: set[int] = field(default_factory=set)
    containers: int = 0
    warm: frozenset[str] = frozenset()
    images: frozenset[str] = frozenset()

    def free_gpus(self, gpu: str) -> list[int]:
        kind, _ = parse_request(gpu)
        return [i for i, model in enumerate(self.gpus) if i not in self.used_gpus and Gpu(i, "", model).matches(kind)]

    def fits(self, demand: Demand) -> bool:
        if self.used_cpu + demand.cpu > self.cpus + 1e-9 or self.used_memory_mb + demand.memory_mb > self.memory_mb:
            return False
        if demand.gpu:
            _, count = parse_request(demand.gpu)
            return len(self.free_gpus(demand.gpu)) >= count
        return True

    def could_ever_fit(self, demand: Demand) -> bool:
        """Whether it would fit on this agent when empty (else waiting for it to free up is pointless)."""
        empty = Candidate(self.name, self.cpus, self.memory_mb, self.gpus)
        return empty.fits(demand)


def choose(demand: Demand, candidates: list[Candidate]) -> Candidate | None:
    """The best agent for ``demand`` now, or None when none fits (the start then waits for one)."""
    fitting = [c for c in candidates if c.fits(demand)]
    if not fitting:
        return None

    def score(c: Candidate) -> tuple[bool, bool, float, int, str]:
        load = max(c.used_cpu / c.cpus if c.cpus else 1.0, c.used_memory_mb / c.memory_mb if c.memory_mb else 1.0)
        return (
            demand.warm_key in c.warm,  # a local snapshot: no fetch before the restore
            demand.image in c.images,  # a local image: no pull before the start
            -load,
            -c.containers,
            c.name,  # a stable order among equals, so tests and logs read the same each run
        )

    return max(fitting, key=score)


def describe_unfit(demand: Demand, candidates: list[Candidate]) -> str:
    """Why no agent fits, for the log line of a start that waits."""
    if not candidates:
        return "no agent is registered"
    wants = f"{demand.cpu:g} CPU, {demand.memory_mb} MiB" + (f", gpu={demand.gpu}" if demand.gpu else "")
    ever = [c.name for c in candidates if c.could_ever_fit(demand)]
    if not ever:
        return f"no agent could ever fit it ({wants}); agents: " + ", ".join(
            f"{c.name} ({c.cpus:g} CPU, {c.memory_mb} MiB, {len(c.gpus)} GPU)" for c in candidates
        )
    return f"agents that fit it ({wants}) are full: " + ", ".join(ever)
