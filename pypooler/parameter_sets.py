"""Interned sets of server parameters (what ParameterStatus reported), compared by identity.

Clients and servers hold these and the lend path asks `client.parameters is server.parameters`,
which is cheaper than comparing a dozen strings. This module is never compiled by the mypyc
build (setup.py): a compiled dict subclass with a `__weakref__` slot crashes at interpreter exit,
and interning happens at logins and ParameterStatus, not per transaction.
"""

from __future__ import annotations

import weakref


class ParameterSet(dict[str, str]):
    """A server's reported parameters; equal sets are one object (see `intern_parameters`)."""

    __slots__ = ("__weakref__",)


_parameter_sets: weakref.WeakValueDictionary[frozenset[tuple[str, str]], ParameterSet] = (
    weakref.WeakValueDictionary()
)


def intern_parameters(parameters: dict[str, str]) -> ParameterSet:
    """The one ParameterSet equal to `parameters`."""
    key = frozenset(parameters.items())
    found = _parameter_sets.get(key)
    if found is None:
        found = ParameterSet(parameters)
        _parameter_sets[key] = found
    return found
