"""The small error hierarchy shared by every layer; only the CLI turns these into exit codes."""

from __future__ import annotations

import errno
import os
import socket


class LbproxyError(Exception):
    """Base class for every error lbproxy raises on purpose."""


class ConfigError(LbproxyError):
    """One or more problems in the configuration, each tied to a key path."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))

    @classmethod
    def single(cls, key_path: str, message: str) -> ConfigError:
        return cls([(key_path, message)])

    def lines(self) -> list[str]:
        return [f"{key}: {msg}" for key, msg in self.problems]


class DiscoveryError(LbproxyError):
    """A discovery source read something it could not use (bad value, bad answer)."""


class DecodeError(DiscoveryError):
    """A value from etcd, the Kubernetes API or DNS could not be decoded."""


# Errors of this host, not of the peer: the process or system is out of file
# descriptors, buffers or memory. They say nothing about an endpoint's health.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_local_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS


def describe(exc: BaseException) -> str:
    """A short, stable text for a network error, the same on asyncio and uvloop.

    asyncio words a refused connect as "Connect call failed (...)", uvloop as
    "Connection refused"; the errno says it the same way for both.
    """
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror}"
    if isinstance(exc, TimeoutError) and not exc.errno and not str(exc):
        return "timed out"
    if isinstance(exc, OSError):
        if exc.errno:
            return os.strerror(exc.errno)
        if exc.strerror:
            return exc.strerror
    return str(exc) or type(exc).__name__
