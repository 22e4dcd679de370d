"""The function container's sandbox: the privileges it runs with and the program that takes the rest away.

- :mod:`.capabilities`: the capability set a container keeps (Docker's default, minus what lets root escape);
- :mod:`.seccomp`: the seccomp allowlist, compiled to a BPF program with libseccomp;
- :mod:`.entry`: the static init (``init.c``) that applies both and stays PID 1 of the container.
"""
