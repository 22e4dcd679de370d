"""The function container's sandbox: the privileges it runs with and the program that takes the rest away.

- :mod:`.capabilities`: the capability set a container keeps (Docker's default, minus what lets root escape);
- :mod:`.seccomp`: the seccomp allowlist, compiled to a BPF program with libseccomp;
- :mod:`.entry`: the static init (``init.c``) that swaps roots, applies both and stays PID 1 of the container;
- :mod:`.rootfs`: the container's overlay root and writable layer (run directories);
- :mod:`.network`: outbound network after the snapshot point (slirp4netns);
- :mod:`.netns`: fresh network namespaces for restored copies.
"""
