"""MALMEN's ridge solve: closed form, optimality, exact backward vs autograd, gradcheck, min-norm limit, precision."""

from __future__ import annotations

import pytest
import torch

from trustray.core.editing import ridge as ridge_module
from trustray.core.editing.ridge import (
    RidgeSolve,
    ridge,
    ridge_backward,
    ridge_precision,
    ridge_solve,
    ridge_solve_gram,
)

torch.set_num_threads(1)

SHAPES = [(5, 8, 3), (12, 6, 4)]  # (n, k, v): fewer rows than key dimensions, then more


def _problem(n: int, k: int, v: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, k, generator=generator, dtype=dtype)
    value_diffs = torch.randn(n, v, generator=generator, dtype=dtype)
    return keys, value_diffs


def _reference_solve(keys: torch.Tensor, value_diffs: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """An independent implementation: the normal equation with `torch.linalg.solve`, differentiable by autograd."""
    system = keys.T @ keys + lam * torch.eye(keys.shape[1], dtype=keys.dtype)
    return torch.linalg.solve(system, keys.T @ value_diffs)


def _objective(keys, value_diffs, lam, solution) -> torch.Tensor:
    return (keys @ solution - value_diffs).square().sum() + lam * solution.square().sum()


@pytest.mark.parametrize(("n", "k", "v"), SHAPES)
def test_solution_matches_closed_form_and_minimises_objective(n, k, v):
    keys, value_diffs = _problem(n, k, v)
    lam = 0.7
    solution = ridge_solve(keys, value_diffs, lam)
    assert solution.shape == (k, v) and solution.dtype == torch.float64
    torch.testing.assert_close(solution, _reference_solve(keys, value_diffs, lam), rtol=1e-10, atol=1e-12)
    residual = keys.T @ (keys @ solution - value_diffs) + lam * solution
    assert residual.abs().max() < 1e-10
    best = _objective(keys, value_diffs, lam, solution)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        perturbation = 1e-3 * torch.randn(k, v, generator=generator, dtype=torch.float64)
        assert _objective(keys, value_diffs, lam, solution + perturbation) > best


def test_float32_inputs_give_float32_solution_close_to_float64():
    keys, value_diffs = _problem(6, 5, 3, dtype=torch.float32)
    lam = 50.0
    assert ridge_precision(keys, lam) == torch.float32
    solution = ridge_solve(keys, value_diffs, lam)
    assert solution.dtype == torch.float32
    expected = _reference_solve(keys.double(), value_diffs.double(), lam)
    torch.testing.assert_close(solution.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "k", "v"), SHAPES)
def test_backward_matches_autograd_through_linalg_solve(n, k, v):
    keys, value_diffs = _problem(n, k, v, seed=2)
    value_diffs.requires_grad_(True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(k, v, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = _reference_solve(keys, value_diffs, lam)
    (reference * weights).sum().backward()

    grad_value_diffs, grad_lam = ridge_backward(keys, lam, reference.detach(), weights)
    assert grad_value_diffs.shape == (n, v) and grad_lam.dim() == 0
    torch.testing.assert_close(grad_value_diffs, value_diffs.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad_lam, lam.grad, rtol=1e-9, atol=1e-11)


def test_autograd_function_matches_reference_with_embedding_shaped_log_lambda():
    """λ = exp(θ) with θ an Embedding row [1, 1], as in MALMEN: the chain rule must come out right."""
    keys, value_diffs = _problem(7, 9, 2, seed=4)
    value_diffs.requires_grad_(True)
    log_lam = torch.full((1, 1), -0.5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(9, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (ridge(keys, value_diffs, log_lam.exp()) * weights).sum().backward()

    ref_diffs = value_diffs.detach().clone().requires_grad_(True)
    ref_log_lam = log_lam.detach().clone().requires_grad_(True)
    (_reference_solve(keys, ref_diffs, ref_log_lam.exp().squeeze()) * weights).sum().backward()
    assert log_lam.grad.shape == (1, 1)
    torch.testing.assert_close(value_diffs.grad, ref_diffs.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(log_lam.grad, ref_log_lam.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("n", "k", "v"), SHAPES)
def test_gradcheck(n, k, v):
    keys, value_diffs = _problem(n, k, v, seed=6)
    value_diffs.requires_grad_(True)
    lam = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, lam_: RidgeSolve.apply(keys, d, lam_, None), (value_diffs, lam))


def test_float_lambda_and_keys_requiring_grad():
    keys, value_diffs = _problem(4, 6, 2, seed=7)
    value_diffs.requires_grad_(True)
    ridge(keys, value_diffs, 0.5).sum().backward()
    assert value_diffs.grad is not None
    with pytest.raises(ValueError, match="keys"):
        ridge(keys.clone().requires_grad_(True), value_diffs, 0.5)


def test_vanishing_lambda_gives_min_norm_interpolation():
    """n < k: as λ → 0 the ridge solution tends to the pseudo-inverse solution K⁺D, which satisfies K S = D.

    (λ cannot go all the way to 0: rounding errors in the null space of K are amplified by ~‖KᵀK‖/λ.)
    """
    keys, value_diffs = _problem(3, 10, 4, seed=8)
    min_norm = torch.linalg.pinv(keys) @ value_diffs
    errors = [float((ridge_solve(keys, value_diffs, lam) - min_norm).norm()) for lam in (1e-2, 1e-4, 1e-6)]
    assert errors[0] > errors[1] > errors[2]
    solution = ridge_solve(keys, value_diffs, 1e-7)
    torch.testing.assert_close(keys @ solution, value_diffs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(solution, min_norm, rtol=1e-5, atol=1e-6)


def _relative_error(solution: torch.Tensor, expected: torch.Tensor) -> float:
    return float((solution.double() - expected).norm() / expected.norm())


def test_float64_fallback_for_ill_conditioned_float32_system(monkeypatch):
    keys, value_diffs = _problem(3, 10, 4, seed=9, dtype=torch.float32)
    lam = 1e-6
    expected = _reference_solve(keys.double(), value_diffs.double(), lam)
    assert ridge_precision(keys, lam) == torch.float64
    solution = ridge_solve(keys, value_diffs, lam)
    assert solution.dtype == torch.float32
    assert _relative_error(solution, expected) < 1e-5
    monkeypatch.setattr(ridge_module, "MAX_FLOAT32_CONDITION", float("inf"))
    assert _relative_error(ridge_solve(keys, value_diffs, lam), expected) > 1e-2  # what the fallback prevents


def test_failed_float32_factorisation_falls_back(monkeypatch):
    """Even below the condition bound, a float32 Cholesky failure is retried in float64 rather than raised."""
    keys, value_diffs = _problem(5, 4, 2, seed=10, dtype=torch.float32)
    calls: list[torch.dtype] = []
    real = ridge_module._cholesky

    def failing_in_float32(keys_, lam_value, dtype, prior):
        calls.append(dtype)
        factor, info = real(keys_, lam_value, dtype, prior)
        return factor, 1 if dtype == torch.float32 else info

    monkeypatch.setattr(ridge_module, "_cholesky", failing_in_float32)
    monkeypatch.setattr(ridge_module, "MAX_FLOAT32_CONDITION", float("inf"))
    solution = ridge_solve(keys, value_diffs, 1.0)
    assert calls == [torch.float32, torch.float64]
    expected = _reference_solve(keys.double(), value_diffs.double(), 1.0)
    torch.testing.assert_close(solution.double(), expected, rtol=1e-6, atol=1e-7)


def test_invalid_inputs():
    keys, value_diffs = _problem(4, 6, 2)
    with pytest.raises(ValueError, match=">= 0"):
        ridge_solve(keys, value_diffs, -1.0)
    with pytest.raises(ValueError, match="one value"):
        ridge_solve(keys, value_diffs, torch.ones(2))
    with pytest.raises(ValueError, match="rows"):
        ridge_solve(keys, value_diffs[:3], 1.0)
    with pytest.raises(ValueError, match="positive definite"):
        ridge_solve(torch.zeros(4, 6, dtype=torch.float64), value_diffs, 0.0)
    with pytest.raises(ValueError, match=r"\[k, v\]"):
        ridge_backward(keys, 1.0, torch.zeros(5, 2, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64))


def test_gram_solve_equals_the_row_solve():
    generator = torch.Generator().manual_seed(3)
    keys, diffs = torch.randn(40, 12, generator=generator), torch.randn(40, 5, generator=generator)
    gram = sum(chunk.double().T @ chunk.double() for chunk in keys.split(7))
    cross = sum(k.double().T @ d.double() for k, d in zip(keys.split(7), diffs.split(7), strict=True))
    torch.testing.assert_close(ridge_solve_gram(gram, cross, 0.3), ridge_solve(keys, diffs, 0.3), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must be"):
        ridge_solve_gram(gram[:, :3], cross, 0.3)


def _prior(k: int, seed: int = 3) -> torch.Tensor:
    """A symmetric positive semi-definite [k, k] matrix of rank k // 2 (like a moment of few preserved keys)."""
    generator = torch.Generator().manual_seed(seed)
    preserved = torch.randn(k // 2, k, generator=generator, dtype=torch.float64)
    return preserved.T @ preserved / (k // 2)


def test_prior_closed_form_and_preserved_keys():
    """(KᵀK + P + λI)⁻¹KᵀD; with P = μ·K₀ᵀK₀ it is the ridge solve of K and D stacked with √μ·K₀ and zero targets."""
    keys, value_diffs = _problem(5, 8, 3)
    keys64, diffs64 = keys.double(), value_diffs.double()
    preserved = torch.randn(6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mu = 7.0
    prior = mu * preserved.T @ preserved
    solution = ridge_solve(keys64, diffs64, 0.5, prior)
    expected = torch.linalg.solve(keys64.T @ keys64 + prior + 0.5 * torch.eye(8, dtype=torch.float64), keys64.T @ diffs64)
    torch.testing.assert_close(solution, expected)
    stacked = ridge_solve(torch.cat([keys64, mu**0.5 * preserved]), torch.cat([diffs64, torch.zeros(6, 3, dtype=torch.float64)]), 0.5)
    torch.testing.assert_close(solution, stacked)
    gram = ridge_solve_gram(keys64.T @ keys64, keys64.T @ diffs64, 0.5, prior)
    torch.testing.assert_close(gram.double(), expected, rtol=1e-6, atol=1e-7)
    # The preserved keys' values move less than without the prior.
    plain = ridge_solve(keys64, diffs64, 0.5)
    assert float((preserved @ solution).norm()) < float((preserved @ plain).norm())


def test_prior_backward_matches_autograd():
    keys, value_diffs = _problem(5, 8, 3)
    keys64 = keys.double()
    prior = _prior(8)
    weights = torch.randn(8, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    diffs = value_diffs.double().requires_grad_(True)
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    system = keys64.T @ keys64 + prior + lam * torch.eye(8, dtype=torch.float64)
    (torch.linalg.solve(system, keys64.T @ diffs) * weights).sum().backward()
    solution = ridge_solve(keys64, value_diffs.double(), 0.7, prior)
    grad_diffs, grad_lam = ridge_backward(keys64, 0.7, solution, weights, prior)
    torch.testing.assert_close(grad_diffs, diffs.grad)
    torch.testing.assert_close(grad_lam, lam.grad)
    assert torch.autograd.gradcheck(lambda d, lam_: ridge(keys64, d, lam_, prior), (value_diffs.double().requires_grad_(True), lam))
    with pytest.raises(ValueError, match="prior must be"):
        ridge_solve(keys64, value_diffs.double(), 0.7, prior[:4, :4])
