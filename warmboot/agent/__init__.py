"""The agent: one per machine of a cluster. It runs containers, CRIU, the image cache and the snapshot cache
for the control plane, which places every container (``server.cluster``).

``host``: the containers this machine runs and what starting them needs; ``service``: its API (token-checked)
and its membership (registration, heartbeats); ``__main__``: ``python -m warmboot.agent``.
"""
