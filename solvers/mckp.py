"""Multiple-choice knapsack: one option per group, total cost <= budget, least total error.

The bit allocator's problem: a group is a weight matrix, an option a storage
format, cost its bits, error its (weighted) reconstruction error. A Lagrangian
solution comes first: its dual value bounds the optimum from below, and when it
is already within the requested gap no ILP runs. Otherwise an ILP: HiGHS through
scipy.optimize.milp (in process, and it reports its dual bound; on the
SmolLM2 tables it finished every budget in under 4 s), else pulp with HiGHS or
CBC (warm-started from the Lagrangian choice). No commercial solver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


SOLVERS = ("auto", "scipy", "highs", "cbc", "lagrangian")  # see solve()


class InfeasibleBudget(ValueError):
    """The budget lies outside what the options can cost."""


@dataclass
class Solution:
    choice: np.ndarray  # chosen option per group
    objective: float  # total error of the choice
    cost: float  # total cost of the choice
    bound: float  # lower bound on the optimal objective
    status: str  # "optimal", "feasible" (time limit) or "lagrangian"
    solver: str
    seconds: float

    @property
    def gap(self) -> float:
        """Relative optimality gap (objective - bound) / objective."""
        return max(0.0, (self.objective - self.bound) / max(abs(self.objective), 1e-300))


def feasible_range(costs: np.ndarray) -> tuple[float, float]:
    return float(costs.min(axis=1).sum()), float(costs.max(axis=1).sum())


def check_budget(costs: np.ndarray, budget: float, per_unit: float = 1.0, unit: str = "") -> None:
    """Raise InfeasibleBudget unless cheapest <= budget <= dearest (in ``budget / per_unit`` terms)."""
    low, high = feasible_range(costs)
    if not low <= budget <= high + 1e-9 * abs(high):
        raise InfeasibleBudget(
            f"budget {budget / per_unit:.4f}{unit} is outside the feasible range "
            f"[{low / per_unit:.4f}, {high / per_unit:.4f}]{unit} of the candidate formats; "
            "choose a budget inside it or change the candidates"
        )


def _pareto(errors: np.ndarray, costs: np.ndarray) -> list[np.ndarray]:
    """Per group, the options not dominated by a cheaper-or-equal, better-or-equal one."""
    keep = []
    for e, c in zip(errors, costs):
        order = np.lexsort((e, c))  # by cost, then error
        best, kept = np.inf, []
        for i in order:
            if e[i] < best:
                kept.append(i)
                best = e[i]
        keep.append(np.array(kept))
    return keep


def lagrangian(errors: np.ndarray, costs: np.ndarray, budget: float, steps: int = 100) -> tuple[np.ndarray, float]:
    """Feasible choice and a lower bound on the optimum, by bisection on the cost multiplier.

    For lambda >= 0 each group picks argmin(error + lambda * cost); the dual
    value sum(min(...)) - lambda * budget bounds the optimum from below. The
    cheapest feasible pick is then improved greedily with the leftover budget.
    """
    rows = np.arange(errors.shape[0])

    def pick(lam: float) -> tuple[np.ndarray, float]:
        total = errors + lam * costs
        choice = total.argmin(axis=1)
        return choice, float(total[rows, choice].sum() - lam * budget)

    choice, bound = pick(0.0)
    if costs[rows, choice].sum() <= budget:
        return choice, bound
    low, high = 0.0, 1.0
    while costs[rows, pick(high)[0]].sum() > budget:
        high *= 2
    best = pick(high)[0]
    for _ in range(steps):
        mid = (low + high) / 2
        c, dual = pick(mid)
        bound = max(bound, dual)
        if costs[rows, c].sum() <= budget:
            high, best = mid, c
        else:
            low = mid
    return _fill(errors, costs, budget, best.copy()), bound


def _fill(errors: np.ndarray, costs: np.ndarray, budget: float, choice: np.ndarray) -> np.ndarray:
    """Spend leftover budget: repeatedly take the upgrade with the best error drop per bit that fits."""
    rows = np.arange(errors.shape[0])
    while True:
        left = budget - costs[rows, choice].sum()
        gain = errors[rows, choice][:, None] - errors
        extra = costs - costs[rows, choice][:, None]
        ok = (gain > 0) & (extra <= left)
        if not ok.any():
            return choice
        ratio = np.where(ok, gain / np.maximum(extra, 1e-12), -np.inf)
        g, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        choice[g] = c


def solve(
    errors: np.ndarray,
    costs: np.ndarray,
    budget: float,
    *,
    solver: str = "auto",
    time_limit: float = 60.0,
    gap: float = 1e-4,
) -> Solution:
    """Choose one option per row of ``errors`` / ``costs`` (groups x options) under ``budget``.

    solver: "auto" (HiGHS through scipy, else through pulp, else CBC), "scipy", "highs"
    (pulp's HiGHS, needs highspy), "cbc", or "lagrangian" (no ILP).
    gap: stop once the choice is proven within this relative gap of the optimum. 1e-4 is far
    below what the allocator's errors are good for (estimates from a quarter of the rows),
    while proving the last 1e-6 is the slow part of a proof (seconds to tens of seconds on
    SmolLM2's table). When the Lagrangian warm start is already within the gap, no ILP runs.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    errors = np.asarray(errors, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if errors.shape != costs.shape or errors.ndim != 2:
        raise ValueError(f"errors {errors.shape} and costs {costs.shape} must be the same 2-D shape")
    if not (np.isfinite(errors).all() and np.isfinite(costs).all()):
        raise ValueError("errors and costs must be finite")
    check_budget(costs, budget)
    start = time.perf_counter()
    rows = np.arange(errors.shape[0])
    warm, bound = lagrangian(errors, costs, budget)
    if costs[rows, warm].sum() > budget:  # rounding in the greedy fill
        warm = costs.argmin(axis=1)
    if solver == "lagrangian":
        return _solution(errors, costs, warm, bound, "lagrangian", "lagrangian", start)
    warm_error = float(errors[rows, warm].sum())
    if warm_error - bound <= gap * warm_error:
        return _solution(errors, costs, warm, bound, "optimal", "lagrangian", start)

    # Errors are normalised so the solver sees numbers near 1. Whole-bit costs stay
    # as they are: integers pass exactly through the LP file, so a choice that
    # spends the budget to the bit stays feasible; other costs are scaled to the budget.
    e_scale = float(np.abs(errors).max()) or 1.0
    integral = bool(np.all(costs == np.round(costs))) and costs.max(axis=1).sum() < 1e12
    c_scale = 1.0 if integral else budget
    keep = _pareto(errors, costs)
    names = [solver] if solver != "auto" else ["scipy", "highs", "cbc"]
    for name in names:
        try:
            choice, status, ilp_bound = _solve_within(
                name, errors / e_scale, costs / c_scale, budget / c_scale, keep, warm, time_limit, gap, costs, budget
            )
        except Exception as err:  # a missing or failing backend: try the next one
            if solver != "auto":
                raise
            logger.info("solver %s unavailable (%s); trying the next", name, err)
            continue
        bound = max(bound, ilp_bound * e_scale)
        if errors[rows, choice].sum() > warm_error:  # never worse than the warm start
            choice, status = warm, "feasible"
        return _solution(errors, costs, choice, bound, status, name, start)
    logger.warning("no ILP solver ran; using the Lagrangian solution")
    return _solution(errors, costs, warm, bound, "lagrangian", "lagrangian", start)


def _solve_within(name, errors, costs, limit, keep, warm, time_limit, gap, raw_costs, budget):
    """Run one ILP backend on the normalised problem and check its answer against the real budget.

    Solvers accept violations up to their feasibility tolerance; if the answer
    overshoots, solve again a hair under the budget. Returns (choice, status,
    lower bound on the normalised objective).
    """
    rows = np.arange(errors.shape[0])
    for tightened in (1.0, 1.0 - 1e-7):
        choice, status, bound = _ILP[name](errors, costs, limit * tightened, keep, warm, time_limit, gap)
        if raw_costs[rows, choice].sum() <= budget:
            if tightened != 1.0:
                return choice, status, 0.0  # the tightened problem's bound does not bound the original one
            if bound is None:  # the backend reports no bound: an optimal status proves the gap
                bound = float(errors[rows, choice].sum()) * (1 - gap) if status == "optimal" else 0.0
            return choice, status, bound
    raise RuntimeError(f"{name}'s solutions exceed the budget")


def _solution(errors, costs, choice, bound, status, name, start) -> Solution:
    rows = np.arange(len(choice))
    objective = float(errors[rows, choice].sum())
    return Solution(
        choice=np.asarray(choice),
        objective=objective,
        cost=float(costs[rows, choice].sum()),
        bound=min(bound, objective),
        status=status,
        solver=name,
        seconds=time.perf_counter() - start,
    )


def _pulp(backend: str):
    def run(errors, costs, budget, keep, warm, time_limit, gap):
        import pulp

        prob = pulp.LpProblem("mckp", pulp.LpMinimize)
        new_var = getattr(prob, "add_variable", None) or (lambda name, cat: pulp.LpVariable(name, cat=cat))
        x = {
            (g, int(c)): new_var(f"x_{g}_{c}", cat="Binary")
            for g, options in enumerate(keep)
            for c in options
        }
        prob += pulp.lpSum(errors[g, c] * v for (g, c), v in x.items())
        prob += pulp.lpSum(costs[g, c] * v for (g, c), v in x.items()) <= budget
        for g, options in enumerate(keep):
            prob += pulp.lpSum(x[g, int(c)] for c in options) == 1
        for (g, c), v in x.items():
            v.setInitialValue(1 if warm[g] == c else 0)
        if backend == "highs":
            cmd = pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap)
        else:  # CBC from the cbcbox package (pulp[cbc]); pulp's bundled binary otherwise
            cmd = pulp.COIN_CMD(msg=False, timeLimit=time_limit, gapRel=gap, warmStart=True)
            if not cmd.available():
                cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, warmStart=True)
        if not cmd.available():
            raise RuntimeError(f"pulp's {backend} is not available")
        prob.solve(cmd)
        status = pulp.LpStatus[prob.status]
        if status != "Optimal" and prob.sol_status != pulp.LpSolutionIntegerFeasible:
            raise RuntimeError(f"{backend} returned {status}")
        choice = np.array([
            max(options, key=lambda c: x[g, int(c)].value() or 0) for g, options in enumerate(keep)
        ])
        optimal = prob.sol_status == pulp.LpSolutionOptimal
        return choice, "optimal" if optimal else "feasible", None

    return run


@contextlib.contextmanager
def _c_stdout_silenced():
    """Point file descriptor 1 at /dev/null for the block: scipy's HiGHS writes debug lines
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution ...") straight to the C stdout on
    some problems, and ``disp=False`` does not stop them."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _scipy(errors, costs, budget, keep, warm, time_limit, gap):
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    groups = np.concatenate([np.full(len(k), g) for g, k in enumerate(keep)])
    options = np.concatenate(keep)
    n = len(options)
    one_each = csr_matrix((np.ones(n), (groups, np.arange(n))), shape=(len(keep), n))
    with _c_stdout_silenced():
        result = milp(
            c=errors[groups, options],
            constraints=[
                LinearConstraint(costs[groups, options][None, :], -np.inf, budget),
                LinearConstraint(one_each, 1, 1),
            ],
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit, "mip_rel_gap": gap},
        )
    if result.x is None:
        raise RuntimeError(f"scipy milp failed: {result.message}")
    choice = np.empty(len(keep), dtype=np.int64)
    picked = result.x > 0.5
    choice[groups[picked]] = options[picked]
    bound = getattr(result, "mip_dual_bound", None)
    return choice, "optimal" if result.status == 0 else "feasible", None if bound is None else float(bound)


_ILP = {"highs": _pulp("highs"), "cbc": _pulp("cbc"), "scipy": _scipy}
