"""evomerge: evolutionary search over model-merge recipes.

The recipe is the hinge: the search turns a trial into a recipe (mergekit YAML),
the engine turns a recipe into weights, the evaluator turns weights into scores,
and the reporter writes recipes and scores.
"""

__version__ = "0.1.0"
