import itertools

import numpy as np
import pytest
from qft.solvers.mckp import InfeasibleBudget, lagrangian, solve


def _table(rng, groups, options):
    costs = np.sort(rng.uniform(1, 10, (groups, options)), axis=1) * rng.integers(1, 5, (groups, 1))
    errors = np.sort(rng.uniform(0, 1, (groups, options)), axis=1)[:, ::-1] * rng.uniform(0.1, 3, (groups, 1))
    return errors.copy(), costs


def _brute_force(errors, costs, budget):
    best = None
    for choice in itertools.product(*[range(errors.shape[1])] * errors.shape[0]):
        rows = np.arange(len(choice))
        if costs[rows, choice].sum() <= budget:
            e = errors[rows, choice].sum()
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("solver", ["cbc", "scipy"])
def test_ilp_finds_the_optimum(solver):
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    for _ in range(5):
        errors, costs = _table(rng, 5, 4)
        budget = rng.uniform(costs.min(1).sum(), costs.max(1).sum())
        sol = solve(errors, costs, budget, solver=solver, gap=1e-9)
        assert sol.cost <= budget
        assert sol.objective == pytest.approx(_brute_force(errors, costs, budget), rel=1e-9)
        assert sol.status == "optimal" and sol.gap < 1e-5
        assert sol.bound <= sol.objective + 1e-12


def test_lagrangian_is_feasible_and_bounds_the_optimum():
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    errors, costs = _table(rng, 6, 4)
    budget = (costs.min(1).sum() + costs.max(1).sum()) / 2
    choice, bound = lagrangian(errors, costs, budget)
    rows = np.arange(6)
    opt = _brute_force(errors, costs, budget)
    assert costs[rows, choice].sum() <= budget
    assert bound <= opt + 1e-9 <= errors[rows, choice].sum() + 1e-9


def test_auto_solver_and_determinism():
    rng = np.random.default_rng(0)
    errors, costs = _table(rng, 40, 12)
    budget = (costs.min(1).sum() + costs.max(1).sum()) / 3
    a, b = solve(errors, costs, budget), solve(errors, costs, budget)
    assert np.array_equal(a.choice, b.choice)
    assert a.solver in ("highs", "cbc", "scipy", "lagrangian") and a.cost <= budget


def test_budget_outside_range_names_the_range():
    errors, costs = np.ones((2, 2)), np.array([[1.0, 2.0], [3.0, 5.0]])
    with pytest.raises(InfeasibleBudget, match=r"feasible range \[4.0000, 7.0000\]"):
        solve(errors, costs, 3.9)
    with pytest.raises(InfeasibleBudget, match="outside"):
        solve(errors, costs, 7.5)
    with pytest.raises(ValueError, match="same 2-D shape"):
        solve(np.ones((2, 3)), costs, 5)


@pytest.mark.parametrize("solver", ["auto", "cbc", "scipy"])
def test_budget_met_exactly_is_allowed(solver):
    # integer costs: the optimum spends the budget to the bit
    errors = np.array([[8.28, 4.09, 5.5], [0.28, 7.54, 5.38], [3.3, 7.88, 3.03]])
    costs = np.array([[3.0, 3, 1], [1, 3, 3], [1, 1, 3]])
    sol = solve(errors, costs, 5.0, solver=solver)
    assert sol.objective == pytest.approx(_brute_force(errors, costs, 5.0))
    assert sol.cost <= 5.0 and sol.bound <= sol.objective + 1e-12
    two = solve(np.array([[0.0, 5], [0, 5]]), np.array([[2.0, 1], [2, 1]]), 3.0, solver=solver)
    assert two.objective == 5.0 and two.cost == 3.0


def test_integer_costs_against_brute_force():
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    for _ in range(10):
        errors = rng.uniform(0, 10, (4, 3)).round(2)
        costs = rng.integers(1, 4, (4, 3)).astype(float)
        budget = float(rng.integers(costs.min(1).sum(), costs.max(1).sum() + 1))
        sol = solve(errors, costs, budget)
        assert sol.objective == pytest.approx(_brute_force(errors, costs, budget))
        assert sol.bound <= sol.objective + 1e-9


@pytest.mark.parametrize("solver", ["auto", "cbc", "scipy"])
def test_default_gap_is_met_and_reported(solver):
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    errors, costs = _table(rng, 30, 8)
    budget = (2 * costs.min(1).sum() + costs.max(1).sum()) / 3
    exact = solve(errors, costs, budget, solver="scipy", gap=0.0)
    sol = solve(errors, costs, budget, solver=solver)
    assert sol.cost <= budget and sol.status == "optimal"
    assert sol.bound <= exact.objective + 1e-9 <= sol.objective + 1e-9
    assert sol.gap <= 1e-4 + 1e-12 and sol.objective <= exact.objective * (1 + 1e-4)


def test_no_ilp_when_the_warm_start_is_within_the_gap(monkeypatch):
    import qft.solvers.mckp as mckp

    rng = np.random.default_rng(0)
    errors, costs = _table(rng, 200, 10)
    budget = (costs.min(1).sum() + costs.max(1).sum()) / 2
    choice, bound = lagrangian(errors, costs, budget)
    warm_gap = 1 - bound / errors[np.arange(200), choice].sum()
    assert 0 < warm_gap < 1e-2  # many groups: the Lagrangian solution is nearly optimal
    monkeypatch.setattr(mckp, "_ILP", {})  # any ILP call would fail
    sol = solve(errors, costs, budget, solver="cbc", gap=2 * warm_gap)
    assert sol.solver == "lagrangian" and sol.status == "optimal" and sol.gap <= 2 * warm_gap
    assert np.array_equal(sol.choice, choice)


def test_scipy_highs_prints_nothing_to_stdout(capfd):
    # This instance makes scipy's HiGHS write a debug line to the C stdout (seen with scipy 1.17);
    # the solver must stay silent, as library code logs instead of printing.
    rng = np.random.default_rng(6)
    costs = np.sort(rng.integers(100, 1000, (60, 12)), axis=1).astype(float)
    errors = np.sort(rng.random((60, 12)) * 100, axis=1)[:, ::-1].copy()
    solution = solve(errors, costs, costs.mean(axis=1).sum(), solver="scipy", gap=1e-6)
    out, _ = capfd.readouterr()
    assert out == ""
    assert solution.cost <= costs.mean(axis=1).sum()
    print("still connected")  # stdout works again after the solve
    assert capfd.readouterr().out == "still connected\n"
