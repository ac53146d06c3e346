"""The bit allocator's solver (installed as ``qft.solvers``).

Knows nothing of models: it takes a table of errors and costs (groups x options).
"""

from qft.solvers.mckp import (
    InfeasibleBudget,
    Solution,
    check_budget,
    feasible_range,
    lagrangian,
    solve,
)

__all__ = ["InfeasibleBudget", "Solution", "check_budget", "feasible_range", "lagrangian", "solve"]
