"""evomerge: evolutionary search over model-merge recipes.

The recipe is the hinge: the search turns a trial into a recipe (mergekit YAML),
the engine turns a recipe into weights, the evaluator turns weights into scores,
and the reporter writes recipes and scores.
"""

from evomerge.sharing import choose_wait_policy

__version__ = "0.1.0"

# Before anything loads torch (and its OpenMP): on cores other processes keep busy, threads that
# sleep while they wait (evomerge/sharing.py; benchmarks/shared_machine.py measures why).
WAIT_POLICY = choose_wait_policy()
