"""Merge methods: pure tensor functions, one family per module, registered by name.

The registry knows nothing of the modules; importing this package imports each family, whose
definitions register themselves.
"""

from evomerge.methods.registry import (
    BasePolicy,
    Inputs,
    MergeMethod,
    Param,
    Scope,
    Search,
    get,
    names,
)

from evomerge.methods import (  # noqa: E402,F401  (isort: skip) registers every family
    arcee_fusion,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    sce,
    spherical,
    task_arithmetic,
)
from evomerge.methods import exact  # noqa: E402,F401  (isort: skip) mergekit's arithmetic, after the methods

__all__ = ["BasePolicy", "Inputs", "MergeMethod", "Param", "Scope", "Search", "get", "names"]
