"""lm-eval imports this file by path for the YAMLs' `!function utils.*`; the code lives in
evomerge.evaluation.tasklib so state is shared with the evaluator."""

from evomerge.evaluation.tasklib import *  # noqa: F401,F403
