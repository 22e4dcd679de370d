"""The options of ``@app.function`` and ``@app.cls``: which exist, their defaults, and checking them early."""

from __future__ import annotations

from typing import Any

from warmboot import validation
from warmboot.errors import InvalidOptionError
from warmboot.sdk import retries as retry_rules

DEFAULTS: dict[str, Any] = {
    "image": None,
    "volumes": {},
    "secrets": [],
    "env": {},
    "timeout": 300.0,
    "retries": 0,
    "min_containers": 0,
    "max_containers": 10,
    "scaledown_window": 60.0,
    "max_inputs": None,
    "memory": None,
    "cpu": None,
    "gpu": None,
    "block_network": False,
    "enable_memory_snapshot": False,
    "experimental_options": {},
    "schedule": None,  # modal.Period / modal.Cron; travels as the function spec's "schedule", not in its options
}
KNOWN_EXPERIMENTAL = {"enable_gpu_snapshot"}


def check(decorator: str, given: dict[str, Any]) -> dict[str, Any]:
    """Return the full options for ``decorator`` or raise :class:`InvalidOptionError` naming the culprit."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise InvalidOptionError(
            f"{decorator} got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options are: {', '.join(DEFAULTS)}"
        )
    opts = {**DEFAULTS, **given}
    opts["timeout"] = validation.timeout(f"{decorator}: timeout", opts["timeout"])
    opts["scaledown_window"] = validation.timeout(f"{decorator}: scaledown_window", opts["scaledown_window"])
    opts["retries"] = retry_rules.check(decorator, opts["retries"])  # an int, or a modal.Retries as a dict
    for name in ("min_containers", "max_containers"):
        if not isinstance(opts[name], int) or opts[name] < 0:
            raise InvalidOptionError(f"{decorator}: {name}= must be a non-negative integer, got {opts[name]!r}")
    if opts["max_containers"] < 1:
        raise InvalidOptionError(f"{decorator}: max_containers= must be at least 1")
    if opts["min_containers"] > opts["max_containers"]:
        raise InvalidOptionError(
            f"{decorator}: min_containers={opts['min_containers']} exceeds max_containers={opts['max_containers']}"
        )
    if opts["max_inputs"] is not None and (
        not isinstance(opts["max_inputs"], int) or isinstance(opts["max_inputs"], bool) or opts["max_inputs"] < 1
    ):
        raise InvalidOptionError(
            f"{decorator}: max_inputs= is how many inputs a container serves before it stops (1 or more, or None), "
            f"got {opts['max_inputs']!r}"
        )
    if opts["memory"] is not None and (not isinstance(opts["memory"], int) or opts["memory"] <= 0):
        raise InvalidOptionError(f"{decorator}: memory= is a number of MiB, got {opts['memory']!r}")
    if opts["cpu"] is not None and (not isinstance(opts["cpu"], int | float) or not 0 < opts["cpu"] <= 1024):
        raise InvalidOptionError(f"{decorator}: cpu= is a number of cores (e.g. 0.5 or 2), got {opts['cpu']!r}")
    if not isinstance(opts["block_network"], bool):
        raise InvalidOptionError(f"{decorator}: block_network= must be True or False, got {opts['block_network']!r}")
    if not isinstance(opts["volumes"], dict):
        raise InvalidOptionError(f"{decorator}: volumes= maps absolute paths to Volumes, got {opts['volumes']!r}")
    for path in opts["volumes"]:
        validation.mount_point(f"{decorator}: volumes=", path)
    opts["env"] = validation.environment(f"{decorator}: env=", opts["env"])
    unknown_exp = sorted(set(opts["experimental_options"]) - KNOWN_EXPERIMENTAL)
    if unknown_exp:
        raise InvalidOptionError(
            f"{decorator}: unknown experimental option(s) {', '.join(map(repr, unknown_exp))}; "
            f"known: {', '.join(sorted(KNOWN_EXPERIMENTAL))}"
        )
    if opts["schedule"] is not None:
        from warmboot.sdk.schedule import Schedule

        if not isinstance(opts["schedule"], Schedule):
            raise InvalidOptionError(
                f"{decorator}: schedule= takes modal.Period(...) or modal.Cron(...), got {opts['schedule']!r}"[:300]
            )
    return opts
