"""What the control plane and its agents share: the typed messages between them and how they travel.

``messages``: the dataclasses of every request and reply; ``transport``: msgpack over HTTP with bearer tokens,
checked as they are decoded; ``settings``: the environment both sides read.
"""
