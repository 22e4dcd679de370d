"""The ``warmboot`` command line: one module per command, wired together in :mod:`warmboot.cli.main`."""
