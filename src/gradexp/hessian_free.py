"""The building blocks of Hessian-free optimization (Martens 2010): the Gauss-Newton
matrix-vector product and truncated conjugate gradient with Martens' stopping rule and
backtracking.

G v = J^T H_L J v, with J the Jacobian of the network's outputs with respect to its
parameters and H_L the Hessian of the loss with respect to the outputs, costs one
forward-mode product (``torch.func.jvp``) and one reverse-mode product
(``torch.func.vjp``); G is never formed. The losses are gradexp's (``Data.loss``): the
mean softmax cross-entropy over rows of logits and the mean squared error over entries.

``HessianFree`` puts them together: CG warm-started from the previous solution,
backtracking over CG's iterates, Levenberg-Marquardt damping driven by the reduction
ratio, and an Armijo line search. Not yet done (issue 15): ``optim=hessian_free`` in the
trainer (its config, the curvature batch, logging), structural damping for recurrent
nets, the diagonal preconditioner.

torch.func rather than curvlinops: the two products are a few lines over torch itself,
work on any model ``functional_call`` can run (gradexp's unrolled recurrent layers
included), and add no dependency.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.func import jvp, vjp

LOSSES = ("cross_entropy", "mse")
Tensors = tuple[torch.Tensor, ...]


def loss_hessian_product(out: torch.Tensor, u: torch.Tensor, loss: str) -> torch.Tensor:
    """H_L u: the Hessian of the loss with respect to the outputs ``out``, times ``u``.

    cross_entropy: ``out`` holds logits, classes on the last axis, the loss the mean over
    the rows; each row's Hessian is (diag(p) - p p^T) / rows, p = softmax(row).
    mse: the mean over every entry of (out - y)^2, Hessian 2 I / entries.
    """
    if loss == "cross_entropy":
        rows = out.numel() // out.shape[-1]
        p = torch.softmax(out.detach(), dim=-1)
        return (p * u - p * (p * u).sum(-1, keepdim=True)) / rows
    if loss == "mse":
        return 2.0 * u / out.numel()
    raise ValueError(f"loss {loss!r}: choose from {', '.join(LOSSES)}")


def gauss_newton_product(
    fn: Callable[..., torch.Tensor], params: Tensors, v: Tensors, loss: str
) -> Tensors:
    """G v = J^T H_L J v for the outputs ``fn(*params)``, one tensor per parameter.

    Args:
        fn: the network as a function of its parameters (``torch.func.functional_call``).
        params: the point at which G is taken.
        v: the direction, shaped as ``params``.
        loss: one of LOSSES.
    """
    out, jv = jvp(fn, tuple(params), tuple(v))
    _, pullback = vjp(fn, *params)
    return tuple(pullback(loss_hessian_product(out, jv, loss)))


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> Tensors:
    parts, start = [], 0
    for t in like:
        parts.append(vector[start : start + t.numel()].view_as(t))
        start += t.numel()
    return tuple(parts)


@dataclass
class CGResult:
    """Truncated conjugate gradient on phi(x) = x^T A x / 2 - b^T x.

    Attributes:
        x: the last iterate.
        iterations: how many were taken.
        phi: phi at each iterate, phi[0] at the starting point.
        saved: (iteration, iterate) at the iterations backtracking chooses among: the
            ceil(gamma^j)-th ones and the last, in order.
        stopped: why it stopped: "progress" (Martens' rule), "converged" (the residual
            at rounding level),
            "max_iters", or "curvature" (a direction of non-positive curvature).
    """

    x: torch.Tensor
    iterations: int
    phi: list[float]
    saved: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    stopped: str = "max_iters"


def backtrack_iterations(max_iters: int, gamma: float = 1.3) -> list[int]:
    """The iterations whose iterates CG keeps for backtracking: ceil(gamma^j), j = 0, 1, ...
    (each once), up to max_iters (Martens 2010, section 4.6)."""
    its: list[int] = []
    j = 0
    while (i := math.ceil(gamma**j)) <= max_iters:
        if not its or i != its[-1]:
            its.append(i)
        j += 1
    return its


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    max_iters: int,
    tol: float = 5e-4,
    gamma: float = 1.3,
) -> CGResult:
    """Minimize phi(x) = x^T A x / 2 - b^T x (solve A x = b, A = ``matvec``) from x0.

    Stops after iteration i when Martens' relative-progress test holds: with
    k = max(10, ceil(0.1 i)), i > k, phi_i < 0 and (phi_i - phi_{i-k}) / phi_i < k tol;
    or when the residual is at rounding level, or A shows non-positive curvature along
    the search direction, or after ``max_iters``.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters {max_iters}: must be >= 1")
    keep = set(backtrack_iterations(max_iters, gamma))
    x = x0.clone()
    ax = matvec(x)
    r = b - ax
    d = r.clone()
    rr = r.dot(r)
    phi = [(0.5 * x.dot(ax) - b.dot(x)).item()]
    saved: list[tuple[int, torch.Tensor]] = []
    stopped = "max_iters"
    # a residual at rounding level is zero: the iterate solves the system
    floor = (10 * torch.finfo(b.dtype).eps * b.norm()).item() ** 2
    i = 0
    while i < max_iters:
        if rr.item() <= floor:
            stopped = "converged"
            break
        ad = matvec(d)
        curvature = d.dot(ad)
        if curvature.item() <= 0.0:
            stopped = "curvature"
            break
        alpha = rr / curvature
        x = x + alpha * d
        r = r - alpha * ad
        i += 1
        # phi(x) = -(b + r)^T x / 2, since A x = b - r
        phi.append((-0.5 * (b + r).dot(x)).item())
        if i in keep:
            saved.append((i, x.clone()))
        rr_new = r.dot(r)
        d = r + (rr_new / rr) * d
        rr = rr_new
        k = max(10, math.ceil(0.1 * i))
        if i > k and phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * tol:
            stopped = "progress"
            break
    if i and (not saved or saved[-1][0] != i):
        saved.append((i, x.clone()))
    return CGResult(x, i, phi, saved, stopped)


@dataclass
class HFStats:
    """What one Hessian-free step did (the optimizer's ``last``)."""

    loss: float  # f at the start of the step
    cg_iters: int  # CG iterations taken
    cg_stopped: str  # why CG stopped (CGResult.stopped)
    chosen_iter: int  # the backtracked iterate taken (0: none)
    damping: float  # lambda used for this step (before its update)
    rho: float  # reduction ratio: actual / predicted (the damped quadratic model)
    predicted: float  # q(d) - q(0)
    actual: float  # f(theta + d) - f(theta), d the backtracked iterate
    rate: float  # the line search's step along d (0: rejected)


class HessianFree(torch.optim.Optimizer):
    """Hessian-free optimization (Martens 2010) as a ``torch.optim.Optimizer``.

    ``step(closure, curvature)``: ``closure()`` recomputes the loss and the gradients at
    the current parameters (gradexp's trainer closure); ``curvature`` is the network's
    outputs on the curvature batch as a function of the parameters (``*params -> out``),
    with the loss's kind in ``loss`` ("cross_entropy" or "mse"). Each step:

    1. g, the gradient; CG on (G + lambda I) d = -g from ``cg_decay`` times the previous
       solution, at most ``cg_max_iters`` iterations, Martens' stopping rule (``cg_tol``);
    2. backtracking over the iterates CG kept (ceil(1.3^j)): from the last one back, as
       long as f keeps falling;
    3. rho = (f(theta + d) - f(theta)) / (q(d) - q(0)), q the damped quadratic model;
       lambda x 3/2 when rho < 1/4, x 2/3 when rho > 3/4;
    4. a backtracking (Armijo) line search along d: rate 1, 0.8, 0.8^2, ... until
       f(theta + rate d) <= f(theta) + 0.01 rate g^T d, at most 60 tries; none: no
       update (rate 0).

    State (saved by ``state_dict``): lambda in the param group (``damping``), the previous
    CG solution per parameter (``cg_init``).
    """

    needs_closure = True

    def __init__(
        self,
        params,
        loss: str,
        damping: float = 1.0,
        cg_max_iters: int = 250,
        cg_decay: float = 0.95,
        cg_tol: float = 5e-4,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: choose from {', '.join(LOSSES)}")
        if not damping > 0:
            raise ValueError(f"damping {damping}: must be > 0")
        if cg_max_iters < 1:
            raise ValueError(f"cg_max_iters {cg_max_iters}: must be >= 1")
        if not 0 <= cg_decay <= 1:
            raise ValueError(f"cg_decay {cg_decay}: must be >= 0 and <= 1")
        defaults = {"damping": damping, "cg_max_iters": cg_max_iters, "cg_decay": cg_decay,
                    "cg_tol": cg_tol}  # fmt: skip
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("HessianFree takes one parameter group")
        self.loss = loss
        self.last: HFStats | None = None

    def _params(self) -> list[torch.Tensor]:
        return list(self.param_groups[0]["params"])

    @torch.no_grad()
    def _set(self, params: list[torch.Tensor], vector: torch.Tensor) -> None:
        for p, v in zip(params, unflat(vector, params)):
            p.copy_(v)

    def step(self, closure=None, curvature: Callable[..., torch.Tensor] | None = None):  # type: ignore[override]
        if closure is None or curvature is None:
            raise ValueError("HessianFree.step needs the closure and the curvature function")
        group = self.param_groups[0]
        params = self._params()
        loss0 = float(closure())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                 for p in params]  # fmt: skip
        g = flat(grads)
        at = tuple(p.detach().clone() for p in params)  # the point G is taken at
        theta0 = flat(at)
        lam = group["damping"]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            gv = flat(gauss_newton_product(curvature, at, unflat(v, at), self.loss))
            return gv + lam * v

        init = [self.state[p].get("cg_init") for p in params]
        x0 = (group["cg_decay"] * flat(init) if all(i is not None for i in init)
              else torch.zeros_like(g))  # fmt: skip
        cg = conjugate_gradient(matvec, -g, x0, group["cg_max_iters"], group["cg_tol"])

        def f(vector: torch.Tensor) -> float:
            self._set(params, vector)
            with torch.no_grad():
                value = float(closure())
            return value if math.isfinite(value) else math.inf

        # backtracking: from the last kept iterate back, while f falls
        chosen, best_f = 0, math.inf
        for i, x in reversed(cg.saved):
            value = f(theta0 + x)
            if value >= best_f and math.isfinite(best_f):
                break
            if value < best_f:
                chosen, best_f = i, value
        d = dict(cg.saved)[chosen] if chosen else torch.zeros_like(g)
        predicted = cg.phi[chosen] if chosen else 0.0
        actual = best_f - loss0 if chosen else 0.0
        rho = actual / predicted if predicted < 0 else -math.inf
        if not rho >= 0.25:
            group["damping"] = lam * 1.5
        elif rho > 0.75:
            group["damping"] = lam * 2 / 3

        # line search along d
        rate, slope = 1.0, g.dot(d).item()
        value = best_f
        for _ in range(60):
            if value <= loss0 + 0.01 * rate * slope:
                break
            rate *= 0.8
            value = f(theta0 + rate * d)
        else:
            rate = 0.0
        if not chosen:
            rate = 0.0
        self._set(params, theta0 + rate * d)
        for p, x, grad in zip(params, unflat(cg.x, params), grads):
            self.state[p]["cg_init"] = x.clone()
            p.grad = grad  # the gradient at the step's start, as other optimizers leave it
        self.last = HFStats(loss0, cg.iterations, cg.stopped, chosen, lam, rho, predicted,
                            actual, rate)  # fmt: skip
        return torch.tensor(loss0)
