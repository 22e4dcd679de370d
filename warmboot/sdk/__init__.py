"""The public SDK's implementation; users import it as ``import warmboot`` (or ``import warmboot as modal``).

Imported inside every container by the user's app file, so it imports only the standard library at module
level: the client, cloudpickle and friends are imported when a call is made.
"""
