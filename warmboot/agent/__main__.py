"""``python -m warmboot.agent``: run this machine's agent in the foreground (see ``warmboot.cluster.settings``)."""

from __future__ import annotations

import logging
import signal
import sys

from warmboot.errors import WarmbootError


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from warmboot.agent.service import Agent

    try:
        agent = Agent()
    except WarmbootError as exc:
        print(f"warmboot agent: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        agent.serve()
    except WarmbootError as exc:
        print(f"warmboot agent {agent.name}: {exc}", file=sys.stderr)
        return 1
    finally:
        agent.host.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
