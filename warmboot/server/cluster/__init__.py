"""The control plane's side of a cluster: the agents it knows (``agents``), where a container goes
(``placement``), and containers that run on an agent, as the pools see them (``remote``); ``control`` composes
them and answers the agents (``WARMBOOT_CLUSTER_LISTEN``).
"""
