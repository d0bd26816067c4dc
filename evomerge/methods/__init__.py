"""Merge methods: pure tensor functions, one family per module, registered by name."""

from evomerge.methods.registry import (
    BasePolicy,
    Inputs,
    MergeMethod,
    Param,
    Scope,
    get,
    names,
)

__all__ = ["BasePolicy", "Inputs", "MergeMethod", "Param", "Scope", "get", "names"]
