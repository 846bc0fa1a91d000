"""The Hessian-free building blocks against independent computations, in float64 on tiny
nets: the Gauss-Newton product against J^T H_L J built from explicit Jacobians and the
loss's own Hessian (torch.autograd.functional), CG against torch.linalg.solve, and
Martens' stopping rule and backtracking on constructed quadratics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from gradexp.hessian_free import (
    Curvature,
    GaussNewton,
    HessianFree,
    backtrack_iterations,
    conjugate_gradient,
    flat,
    gauss_newton_product,
    loss_hessian_product,
    unflat,
)


class TinyRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def explicit_gn(model: nn.Module, x: torch.Tensor, loss_of_out, v: torch.Tensor):
    """J^T H_L J v from the full Jacobian of the flattened outputs and the loss's Hessian
    with respect to them."""
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]

    def out_of_theta(theta: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, unflat(theta, like))), (x,)).reshape(-1)

    theta = flat(like)
    out = out_of_theta(theta)
    J = jacobian(out_of_theta, theta)  # (outputs, parameters)
    H = hessian(loss_of_out, out.detach())  # (outputs, outputs)
    return J.T @ (H @ (J @ v))


def functional(model: nn.Module, x: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def fn(*p: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, p)), (x,))

    return fn, params


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_gauss_newton_product_of_an_mlp_with_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    fn, params = functional(model, x)
    v = torch.randn(flat(params).numel())
    got = flat(gauss_newton_product(fn, params, unflat(v, params), "cross_entropy"))
    want = explicit_gn(model, x, lambda o: F.cross_entropy(o.reshape(7, 3), y), v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # G is positive semi-definite and symmetric: v^T G v >= 0, u^T G v = v^T G u
    u = torch.randn_like(v)
    gu = flat(gauss_newton_product(fn, params, unflat(u, params), "cross_entropy"))
    assert v.dot(got) >= 0
    torch.testing.assert_close(u.dot(got), v.dot(gu))


def test_gauss_newton_product_of_an_rnn_with_mse():
    torch.manual_seed(1)
    model = TinyRNN()
    x, y = torch.randn(5, 6, 2), torch.randn(5, 1)
    fn, params = functional(model, x)
    v = torch.randn(flat(params).numel())
    got = flat(gauss_newton_product(fn, params, unflat(v, params), "mse"))
    want = explicit_gn(model, x, lambda o: F.mse_loss(o.reshape(5, 1), y), v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_loss_hessians_match_autograd():
    torch.manual_seed(2)
    logits, u = torch.randn(4, 3, 5), torch.randn(4, 3, 5)  # a sequence of predictions
    target = torch.randint(0, 5, (12,))
    H = hessian(lambda z: F.cross_entropy(z.reshape(-1, 5), target), logits)
    want = (H.reshape(60, 60) @ u.reshape(-1)).reshape(4, 3, 5)
    torch.testing.assert_close(loss_hessian_product(logits, u, "cross_entropy"), want)
    out, y = torch.randn(6, 1), torch.randn(6, 1)
    H = hessian(lambda o: F.mse_loss(o, y), out).reshape(6, 6)
    u = torch.randn(6, 1)
    torch.testing.assert_close(
        loss_hessian_product(out, u, "mse"), (H @ u.reshape(-1)).reshape(6, 1)
    )
    with pytest.raises(ValueError, match="loss 'hinge': choose from cross_entropy, mse"):
        loss_hessian_product(out, u, "hinge")


def random_spd(n: int, condition: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eig = torch.logspace(0, math.log10(condition), n)
    return q @ torch.diag(eig) @ q.T


def test_cg_solves_an_spd_system():
    A = random_spd(30, 1e3, seed=0)
    b = torch.randn(30, generator=torch.Generator().manual_seed(1))
    res = conjugate_gradient(lambda v: A @ v, b, torch.zeros(30), max_iters=200, tol=0.0)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)
    # phi decreases at every iteration (CG minimizes it over a growing Krylov space)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(res.phi, res.phi[1:]))
    x = torch.linalg.solve(A, b)
    assert res.phi[-1] == pytest.approx((0.5 * x @ A @ x - b @ x).item(), rel=1e-10)


def test_cg_warm_start_from_the_solution_takes_no_step():
    A = random_spd(10, 10.0, seed=3)
    b = torch.randn(10, generator=torch.Generator().manual_seed(4))
    x = torch.linalg.solve(A, b)
    res = conjugate_gradient(lambda v: A @ v, b, x, max_iters=50, tol=0.0)
    assert (res.stopped, res.iterations) == ("converged", 0)
    torch.testing.assert_close(res.x, x)


def test_martens_stopping_rule():
    """Stops at the first i > k = max(10, ceil(0.1 i)) where phi_i < 0 and the relative
    progress over the last k iterations is under k * tol, not before."""
    A = random_spd(400, 1e4, seed=5)  # ill-conditioned: CG crawls, the rule fires (at 111)
    b = torch.randn(400, generator=torch.Generator().manual_seed(6))
    tol = 5e-4
    res = conjugate_gradient(lambda v: A @ v, b, torch.zeros(400), max_iters=400, tol=tol)
    assert res.stopped == "progress"
    i, phi = res.iterations, res.phi

    def rule(j: int) -> bool:
        k = max(10, math.ceil(0.1 * j))
        return j > k and phi[j] < 0 and (phi[j] - phi[j - k]) / phi[j] < k * tol

    assert rule(i) and not any(rule(j) for j in range(1, i))
    assert 10 < i < 400


def test_backtracking_keeps_the_geometric_iterations():
    its = backtrack_iterations(40)
    assert its == sorted(set(math.ceil(1.3**j) for j in range(20) if math.ceil(1.3**j) <= 40))
    assert its[:6] == [1, 2, 3, 4, 5, 7]
    A = random_spd(50, 1e4, seed=7)
    b = torch.randn(50, generator=torch.Generator().manual_seed(8))
    res = conjugate_gradient(lambda v: A @ v, b, torch.zeros(50), max_iters=40, tol=0.0)
    assert res.stopped == "max_iters"
    assert [i for i, _ in res.saved] == [*its, 40] if its[-1] != 40 else its
    for i, x in res.saved:  # each saved iterate is the i-th one: its phi matches
        assert (0.5 * x @ A @ x - b @ x).item() == pytest.approx(res.phi[i], rel=1e-9)


def test_cg_refuses_zero_iterations():
    with pytest.raises(ValueError, match="max_iters 0: must be >= 1"):
        conjugate_gradient(lambda v: v, torch.ones(3), torch.zeros(3), max_iters=0)


def test_cg_stops_on_negative_curvature():
    A = torch.diag(torch.tensor([1.0, -1.0]))
    res = conjugate_gradient(lambda v: A @ v, torch.tensor([0.0, 1.0]), torch.zeros(2), 10)
    assert res.stopped == "curvature" and res.iterations == 0


def test_one_newton_step_on_linear_least_squares():
    """For a linear model with MSE, G is the exact Hessian: one CG solve of G d = -g from
    zero, with enough iterations, lands on the closed-form least-squares solution."""
    torch.manual_seed(9)
    model = nn.Linear(4, 1)
    x, y = torch.randn(20, 4), torch.randn(20, 1)
    fn, params = functional(model, x)
    loss = F.mse_loss(fn(*params), y)
    grads = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    g = flat(grads)
    res = conjugate_gradient(
        lambda v: flat(gauss_newton_product(fn, params, unflat(v, params), "mse")),
        -g, torch.zeros_like(g), max_iters=10, tol=0.0,
    )  # fmt: skip
    theta = flat(params) + res.x
    X = torch.cat([x, torch.ones(20, 1)], dim=1)  # weight then bias
    best = torch.linalg.lstsq(X, y).solution.reshape(-1)
    torch.testing.assert_close(theta, best, rtol=1e-8, atol=1e-10)
    # and the quadratic model predicted the reduction exactly
    after = F.mse_loss(fn(*unflat(theta, params)), y)
    assert (after - loss).item() == pytest.approx(res.phi[-1], rel=1e-8)


# --- the optimizer ----------------------------------------------------------------------


def least_squares(seed: int = 9):
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    x, y = torch.randn(20, 4), torch.randn(20, 1)
    names = [n for n, _ in model.named_parameters()]

    def fn(*p: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, p)), (x,))

    curvature = Curvature(fn, "mse")

    def closure() -> torch.Tensor:
        with torch.enable_grad():
            loss = F.mse_loss(model(x), y)
            model.zero_grad()
            loss.backward()
        return loss.detach()

    X = torch.cat([x, torch.ones(20, 1)], dim=1)
    best = torch.linalg.lstsq(X, y).solution.reshape(-1)
    return model, closure, curvature, best


def least_squares_data(seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """least_squares' inputs (with a column of ones for the bias) and targets."""
    torch.manual_seed(seed)
    nn.Linear(4, 1)  # drawn first there
    x, y = torch.randn(20, 4), torch.randn(20, 1)
    return torch.cat([x, torch.ones(20, 1)], dim=1), y


def test_one_hf_step_solves_linear_least_squares():
    model, closure, curvature, best = least_squares()
    opt = HessianFree(model.parameters(), damping=1e-10, cg_max_iters=50)
    opt.step(closure, curvature)
    torch.testing.assert_close(flat(list(model.parameters())).detach(), best, rtol=1e-6, atol=1e-8)
    s = opt.last
    assert s.rate == 1.0 and s.chosen_iter == s.cg_iters <= 5  # 5 parameters: 5 CG steps at most
    assert s.rho == pytest.approx(1.0, abs=1e-6)  # the quadratic model is exact
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-10 * 2 / 3)  # rho > 3/4
    assert s.actual == pytest.approx(s.predicted, rel=1e-6)


def test_damping_grows_when_the_model_overpromises():
    """The closure's loss has a term the Gauss-Newton model does not see (a steep quartic
    around the start): the reduction falls short of the prediction, rho < 1/4, lambda
    grows by 3/2, and the line search still finds a smaller step that lowers f."""
    model, closure, curvature, _ = least_squares()
    start = flat(list(model.parameters())).detach().clone()

    def steep() -> torch.Tensor:
        loss = closure()  # the mean squared error and its gradient
        with torch.enable_grad():
            penalty = 1e4 * ((flat(list(model.parameters())) - start) ** 2).sum() ** 2
            penalty.backward()  # accumulates onto the error's gradient
        return loss + penalty.detach()

    opt = HessianFree(model.parameters(), damping=1e-3)
    before = float(steep())
    opt.step(steep, curvature)
    s = opt.last
    assert s.rho < 0.25
    assert opt.param_groups[0]["damping"] == pytest.approx(1.5e-3)
    assert 0 < s.rate < 1
    assert float(steep()) < before


def test_a_diverging_proposal_is_rejected_and_damping_grows():
    model, closure, curvature, _ = least_squares()
    start = [p.detach().clone() for p in model.parameters()]

    def blows_up() -> torch.Tensor:
        loss = closure()
        moved = any(not torch.equal(p, s) for p, s in zip(model.parameters(), start))
        return loss + (math.inf if moved else 0.0)

    opt = HessianFree(model.parameters(), damping=1.0)
    for _ in range(2):
        opt.step(blows_up, curvature)
        assert (opt.last.chosen_iter, opt.last.rate) == (0, 0.0)
        for p, s in zip(model.parameters(), start):
            assert torch.equal(p, s)  # no update
    assert opt.param_groups[0]["damping"] == pytest.approx(1.5**2)


def test_hf_state_is_saved_and_restored():
    model, closure, curvature, _ = least_squares()
    opt = HessianFree(model.parameters(), damping=0.5, cg_max_iters=2)
    opt.step(closure, curvature)
    state = opt.state_dict()
    twin, closure2, curvature2, _ = least_squares()
    twin.load_state_dict(model.state_dict())
    opt2 = HessianFree(twin.parameters(), damping=99.0, cg_max_iters=2)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    opt.step(closure, curvature)
    opt2.step(closure2, curvature2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # the warm start and lambda came back: the same step


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damping": 0.0}, "damping 0.0: must be > 0"),
        ({"damping": -1.0}, "damping -1.0: must be > 0"),
        ({"cg_max_iters": 0}, "cg_max_iters 0: must be >= 1"),
        ({"cg_decay": 1.5}, "cg_decay 1.5: must be >= 0 and <= 1"),
        ({"lr": 0.0}, "lr 0.0: must be > 0"),
        ({"structural_damping": -0.1}, "structural_damping -0.1: must be >= 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HessianFree(nn.Linear(2, 1).parameters(), **kwargs)
    with pytest.raises(ValueError, match="loss 'hinge': choose from cross_entropy, mse"):
        GaussNewton(lambda w: w, (torch.ones(2),), "hinge")


# --- structural damping, preconditioning, weight decay, the line search's start ----------


class StatesRNN(TinyRNN):
    """TinyRNN that also returns its hidden states, as structural damping reads them."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        h, _ = self.rnn(x)
        return self.head(h[:, -1]), (h,)


def test_structural_damping_term_equals_its_explicit_form():
    """(G + mu S) v with S = J_h^T J_h / B, J_h the Jacobian of every hidden state (all
    time steps and units of the B sequences) with respect to the parameters."""
    torch.manual_seed(3)
    model = StatesRNN()
    x, y = torch.randn(5, 6, 2), torch.randn(5, 1)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def fn(*p: torch.Tensor):
        return functional_call(model, dict(zip(names, p)), (x,))

    def states_of_theta(theta: torch.Tensor) -> torch.Tensor:
        return fn(*unflat(theta, params))[1][0].reshape(-1)

    v = torch.randn(flat(params).numel())
    mu = 0.3
    product = GaussNewton(fn, params, "mse", mu)
    got = flat(product(unflat(v, params)))
    J_h = jacobian(states_of_theta, flat(params))
    structural = J_h.T @ (J_h @ v) / 5
    outputs = TinyRNN()
    outputs.load_state_dict(model.state_dict())
    g = explicit_gn(outputs, x, lambda o: F.mse_loss(o.reshape(5, 1), y), v)
    torch.testing.assert_close(got, g + mu * structural, rtol=1e-10, atol=1e-12)
    # the graph of the step's point serves every product: a second one is the same
    torch.testing.assert_close(flat(product(unflat(v, params))), got, rtol=0, atol=0)
    assert product.products == 2


def test_preconditioned_cg_solves_and_helps_a_badly_scaled_system():
    """A system whose scales differ by 1e6 along the axes: CG with the diagonal as its
    preconditioner solves it in far fewer iterations, to the same solution."""
    torch.manual_seed(4)
    scales = torch.logspace(0, 6, 60)
    A = torch.diag(scales) @ (random_spd(60, 3.0, seed=5)) @ torch.diag(scales)
    A = (A + A.T) / 2
    b = torch.randn(60)
    want = torch.linalg.solve(A, b)
    plain = conjugate_gradient(lambda v: A @ v, b, torch.zeros(60), 2000, tol=1e-12)
    pre = conjugate_gradient(lambda v: A @ v, b, torch.zeros(60), 2000, tol=1e-12,
                             precond=torch.diagonal(A).clone())  # fmt: skip
    torch.testing.assert_close(pre.x, want, rtol=1e-6, atol=0)
    assert pre.iterations < plain.iterations / 3, (pre.iterations, plain.iterations)


def test_weight_decay_reaches_the_ridge_solution():
    """With weight_decay w the objective is the MSE plus w/2 ||theta||^2: one step with
    enough CG iterations and tiny damping lands on the ridge regression solution."""
    model, closure, curvature, _ = least_squares()
    X, y = least_squares_data()
    w = 0.7
    # gradient of mean((X t - y)^2) + w/2 |t|^2 = 2 X^T (X t - y) / 20 + w t = 0
    ridge = torch.linalg.solve(2 * X.T @ X / 20 + w * torch.eye(5), 2 * X.T @ y / 20)
    opt = HessianFree(model.parameters(), damping=1e-10, cg_max_iters=50, weight_decay=w)
    opt.step(closure, curvature)
    torch.testing.assert_close(flat(list(model.parameters())).detach(), ridge.reshape(-1))
    assert opt.last.rho == pytest.approx(1.0, abs=1e-6)


def test_lr_is_the_line_search_start():
    """lr=0.5 on a quadratic: the Armijo test holds at once, the step is half Newton's."""
    model, closure, curvature, best = least_squares()
    start = flat(list(model.parameters())).detach().clone()
    opt = HessianFree(model.parameters(), lr=0.5, damping=1e-10, cg_max_iters=50)
    opt.step(closure, curvature)
    assert opt.last.rate == 0.5
    torch.testing.assert_close(
        flat(list(model.parameters())).detach(), start + 0.5 * (best - start)
    )


def test_preconditioned_step_reaches_the_same_solution():
    model, closure, curvature, best = least_squares()
    X, y = least_squares_data()

    def sq_grads() -> torch.Tensor:  # per-example gradients of the mean loss's terms
        theta = flat(list(model.parameters())).detach()
        per_example = 2 * (X @ theta - y.reshape(-1))[:, None] * X
        return per_example.square().mean(0)

    opt = HessianFree(model.parameters(), damping=1e-10, cg_max_iters=50, precondition=True)
    opt.step(closure, Curvature(curvature.fn, "mse", sq_grads))
    torch.testing.assert_close(flat(list(model.parameters())).detach(), best, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="needs the curvature's sq_grads"):
        opt.step(closure, curvature)


def test_cg_stops_when_a_product_overflows():
    """An exploding Jacobian overflows G v in float32: CG says so, takes no step."""
    b = torch.ones(3)
    res = conjugate_gradient(lambda v: v * math.inf, b, torch.zeros(3), 10)
    assert res.stopped == "nonfinite" and res.iterations == 0 and res.saved == []
