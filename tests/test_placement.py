"""The fast layer of placement (``warmboot.server.cluster.placement``): made-up agents, no containers.

Which agent fits a container's CPU, memory and GPUs; which of those that fit is preferred (its snapshot, then its
image, then the least loaded); how successive choices spread a function's containers; and why none fits.
"""

from __future__ import annotations

from collections import Counter

from warmboot.server.cluster.placement import DEFAULT_CPU, DEFAULT_MEMORY_MB, Candidate, Demand, choose, describe_unfit

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"


def agent(name: str, cpus: float = 4, memory_mb: int = 8192, gpus: list[str] | None = None, **used) -> Candidate:
    return Candidate(name, cpus, memory_mb, list(gpus or []), **used)


def place(demand: Demand, candidates: list[Candidate], times: int) -> list[str]:
    """Choose ``times`` times, reserving each container on its agent as the control plane does."""
    chosen = []
    for _ in range(times):
        best = choose(demand, candidates)
        assert best is not None, describe_unfit(demand, candidates)
        best.used_cpu += demand.cpu
        best.used_memory_mb += demand.memory_mb
        best.containers += 1
        chosen.append(best.name)
    return chosen


# ----- resources ---------------------------------------------------------------------------------------------


def test_an_agent_without_cpu_or_memory_room_is_not_chosen() -> None:
    demand = Demand(cpu=2, memory_mb=1024)
    no_cpu = agent("a-no-cpu", used_cpu=3)  # 1 of 4 CPUs left
    no_memory = agent("b-no-memory", used_memory_mb=7680)  # 512 of 8192 MiB left
    roomy = agent("c-roomy", used_cpu=2, used_memory_mb=7168)  # exactly enough of both
    assert not no_cpu.fits(demand) and not no_memory.fits(demand) and roomy.fits(demand)
    assert choose(demand, [no_cpu, no_memory, roomy]) is roomy
    assert choose(demand, [no_cpu, no_memory]) is None


def test_gpu_type_and_count() -> None:
    two_h100 = agent("a-two-h100", gpus=[H100, H100])
    mixed = agent("b-mixed", gpus=[H100, A100])
    no_gpu = agent("c-no-gpu", cpus=64)
    all_three = [two_h100, mixed, no_gpu]
    assert choose(Demand(gpu="h100:2"), all_three) is two_h100
    assert [c.name for c in all_three if c.fits(Demand(gpu="H100:2"))] == ["a-two-h100"]  # the type ignores case
    assert choose(Demand(gpu="a100"), all_three) is mixed
    assert [c.name for c in all_three if c.fits(Demand(gpu="any"))] == ["a-two-h100", "b-mixed"]
    assert [c.name for c in all_three if c.fits(Demand(gpu="any:2"))] == ["a-two-h100", "b-mixed"]
    assert choose(Demand(gpu="h100:3"), all_three) is None
    assert choose(Demand(gpu="l4"), all_three) is None


def test_a_gpu_of_unknown_model_fits_any_type() -> None:
    unknown = agent("unknown", gpus=["", ""])
    assert unknown.free_gpus("h100") == [0, 1]
    assert unknown.fits(Demand(gpu="h100:2")) and unknown.fits(Demand(gpu="a10g"))
    assert not unknown.fits(Demand(gpu="h100:3"))


def test_used_gpus_are_not_free() -> None:
    busy = agent("busy", gpus=[H100, H100, A100], used_gpus={0})
    assert busy.free_gpus("h100") == [1]
    assert busy.free_gpus("any") == [1, 2]
    assert busy.fits(Demand(gpu="h100")) and not busy.fits(Demand(gpu="h100:2"))
    free = agent("free", gpus=[H100, H100])
    assert choose(Demand(gpu="h100:2"), [busy, free]) is free
    # A container without gpu= takes no GPU: a machine whose GPUs are all used still has room for it.
    assert agent("full", gpus=[H100], used_gpus={0}).fits(Demand())


# ----- preference ----------------------------------------------------------------------------------------------


def test_snapshot_beats_image_beats_empty_even_when_more_loaded() -> None:
    demand = Demand(cpu=1, warm_key="app-1/f", image="sha256:img")
    empty = agent("a-empty")
    image = agent("b-image", used_cpu=2, containers=2, images=frozenset({"sha256:img"}))
    warm = agent("c-warm", used_cpu=3, containers=3, warm=frozenset({"app-1/f"}), images=frozenset({"sha256:img"}))
    assert choose(demand, [empty, image, warm]) is warm
    assert choose(demand, [empty, image]) is image
    # Another function's snapshot or image counts for nothing.
    other = agent("d-other", warm=frozenset({"app-1/g"}), images=frozenset({"sha256:other"}))
    assert choose(demand, [other, image]) is image
    # Preferred only while it fits: a full warm agent loses to an empty one.
    warm.used_cpu = 3.5
    assert choose(demand, [empty, image, warm]) is image


def test_among_equals_the_least_loaded_then_fewer_containers_wins() -> None:
    demand = Demand(cpu=0.5, memory_mb=256)
    busy_cpu = agent("a", used_cpu=2)  # load 0.5
    busy_memory = agent("b", used_cpu=1, used_memory_mb=6144)  # load 0.75: memory counts as much as CPU
    light = agent("c", used_cpu=1, used_memory_mb=1024)  # load 0.25
    assert choose(demand, [busy_cpu, busy_memory, light]) is light
    assert choose(demand, [busy_cpu, busy_memory]) is busy_cpu
    many = agent("d", used_cpu=1, containers=4)
    few = agent("e", used_cpu=1, containers=1)
    assert choose(demand, [many, few]) is few
    # Full ties are broken by name, whatever order the agents come in.
    twins = [agent("x"), agent("y")]
    assert choose(demand, twins).name == choose(demand, twins[::-1]).name == "y"


def test_successive_choices_spread_containers_over_agents() -> None:
    agents = [agent("a"), agent("b"), agent("c")]
    chosen = place(Demand(cpu=1, memory_mb=512), agents, 9)
    assert Counter(chosen) == {"a": 3, "b": 3, "c": 3}
    assert len(set(chosen[:3])) == 3  # the first three go to three different agents
    # Load is relative to size: an 8-CPU agent takes twice the containers of a 4-CPU one.
    uneven = [agent("small", cpus=4), agent("big", cpus=8, memory_mb=16384)]
    assert Counter(place(Demand(cpu=1, memory_mb=512), uneven, 6)) == {"small": 2, "big": 4}


def test_successive_choices_fill_the_warm_agent_first_then_the_image_holder() -> None:
    demand = Demand(cpu=1, warm_key="app/f", image="img")
    agents = [agent("a-empty"), agent("b-image", images=frozenset({"img"})), agent("c-warm", warm=frozenset({"app/f"}))]
    chosen = place(demand, agents, 12)
    assert chosen == ["c-warm"] * 4 + ["b-image"] * 4 + ["a-empty"] * 4
    assert choose(demand, agents) is None


# ----- when none fits --------------------------------------------------------------------------------------------


def test_describe_unfit_says_why() -> None:
    demand = Demand(cpu=2, memory_mb=1024)
    assert choose(demand, []) is None
    assert describe_unfit(demand, []) == "no agent is registered"

    small = [agent("a", cpus=1), agent("b", cpus=1.5, memory_mb=512, gpus=[H100])]
    assert choose(demand, small) is None
    assert describe_unfit(demand, small) == (
        "no agent could ever fit it (2 CPU, 1024 MiB); agents: a (1 CPU, 8192 MiB, 0 GPU), b (1.5 CPU, 512 MiB, 1 GPU)"
    )
    gpu_demand = Demand(gpu="h100:2")
    assert describe_unfit(gpu_demand, small) == (
        "no agent could ever fit it (0.125 CPU, 128 MiB, gpu=h100:2); agents: a (1 CPU, 8192 MiB, 0 GPU), "
        "b (1.5 CPU, 512 MiB, 1 GPU)"
    )

    full = [agent("a", cpus=1), agent("big", used_cpu=3), agent("huge", cpus=16, used_cpu=15, used_memory_mb=10)]
    assert choose(demand, full) is None
    assert describe_unfit(demand, full) == "agents that fit it (2 CPU, 1024 MiB) are full: big, huge"
    gpus_used = [agent("g", gpus=[H100, H100], used_gpus={1})]
    assert describe_unfit(gpu_demand, gpus_used) == "agents that fit it (0.125 CPU, 128 MiB, gpu=h100:2) are full: g"


# ----- demand ----------------------------------------------------------------------------------------------------


def test_demand_from_options() -> None:
    default = Demand.from_options({}, "app/f", "sha256:1")
    assert default == Demand(cpu=0.125, memory_mb=128, gpu=None, warm_key="app/f", image="sha256:1")
    assert (DEFAULT_CPU, DEFAULT_MEMORY_MB) == (0.125, 128)
    assert Demand.from_options({"cpu": None, "memory": None, "gpu": None}, "", "") == Demand()

    explicit = Demand.from_options({"cpu": 2, "memory": 4096, "gpu": "h100:2"}, "app/g", "sha256:2")
    assert explicit == Demand(cpu=2.0, memory_mb=4096, gpu="h100:2", warm_key="app/g", image="sha256:2")
    assert isinstance(explicit.cpu, float) and isinstance(explicit.memory_mb, int)

    # (request, limit): the request is what is reserved.
    ranged = Demand.from_options({"cpu": (0.5, 4), "memory": [1024, 2048]}, "", "")
    assert (ranged.cpu, ranged.memory_mb, ranged.gpu) == (0.5, 1024, None)
