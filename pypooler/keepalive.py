"""TCP keepalive and TCP_USER_TIMEOUT: which socket options the settings ask for, in one place.

Client sockets get them from the listening sockets (Linux copies these options to every
accepted socket, so there is no system call per client; a RELOAD sets them again there, for the
clients that connect after it); server sockets get them when they are opened. A value of 0
leaves the OS default; tcp_keepalive = false turns keepalive off and with it its three
timings, while tcp_user_timeout stands on its own.
"""

from __future__ import annotations

import socket

from pypooler.config import Settings

SocketOption = tuple[int, int, int]  # (level, option, value) for setsockopt


# The kernel's defaults, for a RELOAD that sets a timing back to 0 on the listening sockets.
_OS_DEFAULTS = {
    socket.TCP_KEEPIDLE: "/proc/sys/net/ipv4/tcp_keepalive_time",
    socket.TCP_KEEPINTVL: "/proc/sys/net/ipv4/tcp_keepalive_intvl",
    socket.TCP_KEEPCNT: "/proc/sys/net/ipv4/tcp_keepalive_probes",
}


def keepalive_options(settings: Settings, *, resetting: bool = False) -> tuple[SocketOption, ...]:
    """The options `settings` ask for; `resetting`: for a socket that may carry earlier values
    (a listening socket at RELOAD), so every option is set, 0s as the OS default."""
    # SO_KEEPALIVE is always set, on or off: applying the options again turns it off too.
    options: list[SocketOption] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(settings.tcp_keepalive))]
    if settings.tcp_keepalive:
        for option, value in (
            (socket.TCP_KEEPIDLE, settings.tcp_keepidle),
            (socket.TCP_KEEPINTVL, settings.tcp_keepintvl),
            (socket.TCP_KEEPCNT, settings.tcp_keepcnt),
        ):
            if not value and resetting:
                value = _os_default(option)
            if value:
                options.append((socket.IPPROTO_TCP, option, value))
    if settings.tcp_user_timeout or resetting:  # 0 is the OS default for this one
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, settings.tcp_user_timeout))
    return tuple(options)


def _os_default(option: int) -> int:
    try:
        with open(_OS_DEFAULTS[option]) as file:
            return int(file.read())
    except (OSError, ValueError):
        return 0  # unknown: left as it is


def apply_keepalive(sock: socket.socket, options: tuple[SocketOption, ...]) -> None:
    """Set `options` on `sock` if it is a TCP socket (a unix-domain one has no keepalive)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        for level, option, value in options:
            sock.setsockopt(level, option, value)
