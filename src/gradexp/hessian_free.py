"""Hessian-free optimization (Martens 2010; structural damping: Martens & Sutskever 2011).

G v = J^T H_L J v, with J the Jacobian of the network's outputs with respect to its
parameters and H_L the Hessian of the loss with respect to the outputs, costs one
forward-mode product (``torch.func.jvp``) and one reverse-mode product through a graph
kept for the whole step (``torch.func.vjp`` at the step's point); G is never formed.
The losses are gradexp's (``Data.loss``): the mean softmax cross-entropy over rows of
logits and the mean squared error over entries.

Structural damping adds mu * lambda * S to the damping, S the Gauss-Newton matrix of
the penalty D(h) = ||h - h(theta)||^2 / (2 B) on the recurrent layers' hidden states h
(summed over time steps and units, averaged over the B sequences of the curvature
batch): S v = J_h^T J_h v / B, from the same jvp and vjp as G v.

``HessianFree`` puts them together: CG (optionally preconditioned with Martens'
diagonal) warm-started from the previous solution, backtracking over CG's iterates,
Levenberg-Marquardt damping driven by the reduction ratio, and an Armijo line search.

torch.func rather than curvlinops: the two products are a few lines over torch itself,
work on any model ``functional_call`` can run (gradexp's unrolled recurrent layers
included), and add no dependency.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

LOSSES = ("cross_entropy", "mse")
Tensors = tuple[torch.Tensor, ...]
# The network as a function of its parameters: its outputs, or (outputs, hidden states)
# for structural damping.
NetworkFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, Tensors]"]


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


def _split(result: torch.Tensor | tuple[torch.Tensor, Tensors]) -> tuple[torch.Tensor, Tensors]:
    return (result[0], tuple(result[1])) if isinstance(result, tuple) else (result, ())


class GaussNewton:
    """v -> (G + mu S) v at ``params``: G the Gauss-Newton matrix of ``loss`` on the
    outputs of ``fn``, S the structural damping matrix of its hidden states (``fn``
    returning (outputs, states); ``mu`` its weight, 0: none).

    The reverse pass's graph is built once, at construction, and serves every product:
    a product costs one forward-mode pass and one backward pass.
    """

    def __init__(self, fn: NetworkFn, params: Tensors, loss: str, mu: float = 0.0) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: choose from {', '.join(LOSSES)}")
        self.fn, self.params, self.loss, self.mu = fn, tuple(params), loss, mu
        result, self.pullback = vjp(fn, *self.params)
        self.out, self.states = _split(result)
        self.structured = isinstance(result, tuple)
        self.products = 0

    def __call__(self, v: Sequence[torch.Tensor]) -> Tensors:
        _, tangent = jvp(self.fn, self.params, tuple(v))
        jv, jstates = _split(tangent)
        cotangent = loss_hessian_product(self.out, jv, self.loss)
        self.products += 1
        if not self.structured:
            return tuple(self.pullback(cotangent))
        states = tuple(self.mu * js / js.shape[0] for js in jstates)
        return tuple(self.pullback((cotangent, states)))


def gauss_newton_product(fn: NetworkFn, params: Tensors, v: Tensors, loss: str,
                         mu: float = 0.0) -> Tensors:  # fmt: skip
    """(G + mu S) v for the outputs of ``fn(*params)``, one tensor per parameter (one
    product; see GaussNewton to take many at one point).

    Args:
        fn: the network as a function of its parameters (``torch.func.functional_call``),
            returning its outputs, or (outputs, hidden states) for structural damping.
        params: the point at which G is taken.
        v: the direction, shaped as ``params``.
        loss: one of LOSSES.
        mu: the weight of S, the hidden states' term (needs ``fn`` to return them).
    """
    return GaussNewton(fn, params, loss, mu)(v)


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
            at rounding level), "max_iters", "curvature" (a direction of non-positive
            curvature), or "nonfinite" (a product overflowed: no step is taken).
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
    precond: torch.Tensor | None = None,
) -> CGResult:
    """Minimize phi(x) = x^T A x / 2 - b^T x (solve A x = b, A = ``matvec``) from x0.

    ``precond``: the diagonal of a preconditioner M (preconditioned CG: the residual is
    divided by it). Stops after iteration i when Martens' relative-progress test holds:
    with k = max(10, ceil(0.1 i)), i > k, phi_i < 0 and (phi_i - phi_{i-k}) / phi_i <
    k tol; or when the residual is at rounding level, or A shows non-positive curvature
    along the search direction, or after ``max_iters``. One host transfer per iteration.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters {max_iters}: must be >= 1")
    keep = set(backtrack_iterations(max_iters, gamma))
    x = x0.clone()
    ax = matvec(x)
    r = b - ax
    z = r / precond if precond is not None else r
    d = z.clone()
    rz = r.dot(z)
    phi = [(0.5 * x.dot(ax) - b.dot(x)).item()]
    saved: list[tuple[int, torch.Tensor]] = []
    stopped = "max_iters"
    # a residual at rounding level is zero: the iterate solves the system
    floor = (10 * torch.finfo(b.dtype).eps * b.norm()).item() ** 2
    rr = r.dot(r).item()
    i = 0
    while i < max_iters:
        if rr <= floor:
            stopped = "converged"
            break
        ad = matvec(d)
        curvature = d.dot(ad)
        alpha = rz / curvature
        x_new = x + alpha * d
        r_new = r - alpha * ad
        # phi(x) = -(b + r)^T x / 2, since A x = b - r; one transfer for three numbers
        host = torch.stack([curvature, -0.5 * (b + r_new).dot(x_new), r_new.dot(r_new)])
        curv, phi_new, rr = host.tolist()
        if not (math.isfinite(curv) and math.isfinite(phi_new)):
            stopped = "nonfinite"  # the product overflowed (an exploding Jacobian)
            break
        if not curv > 0.0:
            stopped = "curvature"
            break
        x, r = x_new, r_new
        i += 1
        phi.append(phi_new)
        if i in keep:
            saved.append((i, x.clone()))
        z = r / precond if precond is not None else r
        rz_new = r.dot(z)
        d = z + (rz_new / rz) * d
        rz = rz_new
        k = max(10, math.ceil(0.1 * i))
        if i > k and phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * tol:
            stopped = "progress"
            break
    if i and (not saved or saved[-1][0] != i):
        saved.append((i, x.clone()))
    return CGResult(x, i, phi, saved, stopped)


@dataclass
class Curvature:
    """What ``HessianFree.step`` takes curvature from, besides the closure.

    Attributes:
        fn: the network on the curvature batch as a function of its parameters, in the
            optimizer's parameter order: its outputs (logits with classes on the last
            axis, or regression outputs), or (outputs, hidden states) for structural
            damping.
        loss: the loss's kind, one of LOSSES.
        sq_grads: for the diagonal preconditioner, a function returning the mean over
            examples of each parameter's squared per-example gradient (flat), or None.
    """

    fn: NetworkFn
    loss: str
    sq_grads: Callable[[], torch.Tensor] | None = None


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
    products: int = 0  # curvature products (CG's, the first included)
    evaluations: int = 0  # loss evaluations (backtracking and the line search)


class HessianFree(torch.optim.Optimizer):
    """Hessian-free optimization (Martens 2010) as a ``torch.optim.Optimizer``.

    ``step(closure, curvature)``: ``closure()`` recomputes the objective and its gradients
    at the current parameters; called with gradients disabled it may return the
    objective alone (gradexp's trainer closure does: backtracking and the line search
    need no gradient). ``curvature`` (a Curvature) gives the network on the curvature
    batch. Each step:

    1. g, the gradient; CG on (G + mu lambda S + (lambda + weight_decay) I) d = -g from
       ``cg_decay`` times the previous solution, at most ``cg_max_iters`` iterations,
       Martens' stopping rule (``cg_tol``), preconditioned with
       (mean squared per-example gradient + lambda)^0.75 when ``precondition``;
    2. backtracking over the iterates CG kept (ceil(1.3^j)): from the last one back, as
       long as f keeps falling;
    3. rho = (f(theta + d) - f(theta)) / (q(d) - q(0)), q the damped quadratic model;
       lambda x 3/2 when rho < 1/4, x 2/3 when rho > 3/4;
    4. a backtracking (Armijo) line search along d: rate ``lr`` (1 by default), then
       x 0.8 until f(theta + rate d) <= f(theta) + 0.01 rate g^T d, at most 60 tries;
       none: no update (rate 0).

    ``weight_decay`` adds weight_decay/2 ||theta||^2 to f (its exact curvature to G).
    State (saved by ``state_dict``): lambda in the param group (``damping``), the previous
    CG solution per parameter (``cg_init``).
    """

    needs_closure = True

    def __init__(
        self,
        params,
        lr: float = 1.0,
        damping: float = 1.0,
        cg_max_iters: int = 250,
        cg_decay: float = 0.95,
        cg_tol: float = 5e-4,
        structural_damping: float = 0.0,
        weight_decay: float = 0.0,
        precondition: bool = False,
    ) -> None:
        checks = {
            "lr": (lr, lr > 0, "> 0"),
            "damping": (damping, damping > 0, "> 0"),
            "cg_max_iters": (cg_max_iters, cg_max_iters >= 1, ">= 1"),
            "cg_decay": (cg_decay, 0 <= cg_decay <= 1, ">= 0 and <= 1"),
            "cg_tol": (cg_tol, cg_tol > 0, "> 0"),
            "structural_damping": (structural_damping, structural_damping >= 0, ">= 0"),
            "weight_decay": (weight_decay, weight_decay >= 0, ">= 0"),
        }
        for name, (value, ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name} {value}: must be {allowed}")
        defaults = {"lr": lr, "damping": damping, "cg_max_iters": cg_max_iters,
                    "cg_decay": cg_decay, "cg_tol": cg_tol,
                    "structural_damping": structural_damping, "weight_decay": weight_decay,
                    "precondition": precondition}  # fmt: skip
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("HessianFree takes one parameter group")
        self.last: HFStats | None = None

    def _params(self) -> list[torch.Tensor]:
        return list(self.param_groups[0]["params"])

    @torch.no_grad()
    def _set(self, params: list[torch.Tensor], vector: torch.Tensor) -> None:
        for p, v in zip(params, unflat(vector, params)):
            p.copy_(v)

    def step(self, closure=None, curvature: Curvature | None = None):  # type: ignore[override]
        if closure is None or curvature is None:
            raise ValueError("HessianFree.step needs the closure and the curvature")
        group = self.param_groups[0]
        params = self._params()
        wd = group["weight_decay"]
        with torch.enable_grad():
            loss0 = float(closure())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                 for p in params]  # fmt: skip
        at = tuple(p.detach().clone() for p in params)  # the point G is taken at
        theta0 = flat(at)
        g = flat(grads)
        if wd:
            loss0 += 0.5 * wd * theta0.square().sum().item()
            g = g + wd * theta0
        lam = group["damping"]
        product = GaussNewton(curvature.fn, at, curvature.loss,
                              group["structural_damping"] * lam)  # fmt: skip

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return flat(product(unflat(v, at))) + (lam + wd) * v

        precond = None
        if group["precondition"]:
            if curvature.sq_grads is None:
                raise ValueError("precondition=True needs the curvature's sq_grads")
            precond = (curvature.sq_grads() + lam) ** 0.75
        init = [self.state[p].get("cg_init") for p in params]
        x0 = (group["cg_decay"] * flat(init) if all(i is not None for i in init)
              else torch.zeros_like(g))  # fmt: skip
        cg = conjugate_gradient(matvec, -g, x0, group["cg_max_iters"], group["cg_tol"],
                                precond=precond)  # fmt: skip
        evaluations = 0

        def f(vector: torch.Tensor) -> float:
            nonlocal evaluations
            evaluations += 1
            self._set(params, vector)
            with torch.no_grad():
                value = float(closure())
            if wd:
                value += 0.5 * wd * vector.square().sum().item()
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

        # line search along d, from rate lr
        rate = 0.0
        if chosen:
            rate, slope = group["lr"], g.dot(d).item()
            value = best_f if rate == 1.0 else f(theta0 + rate * d)
            for _ in range(60):
                if value <= loss0 + 0.01 * rate * slope:
                    break
                rate *= 0.8
                value = f(theta0 + rate * d)
            else:
                rate = 0.0
        self._set(params, theta0 + rate * d)
        for p, x, g0 in zip(params, unflat(cg.x, params), grads):
            self.state[p]["cg_init"] = x.clone()
            p.grad = g0  # the gradient at the step's start, as other optimizers leave it
        self.last = HFStats(loss0, cg.iterations, cg.stopped, chosen, lam, rho, predicted,
                            actual, rate, product.products, evaluations)  # fmt: skip
        return torch.tensor(loss0)


# --- a gradexp model as the functions above take it --------------------------------------


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """While entered, ``model``'s batch norms normalize by the batch's statistics and leave
    their running ones alone: a Hessian-free step evaluates the loss many times (and a
    transform cannot mutate them), yet the running statistics move once per step, on
    the step's own forward pass, as under any other optimizer."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@contextlib.contextmanager
def functional_passes(model: nn.Module) -> Iterator[None]:
    """While entered, ``model`` runs as torch.func's transforms need it: recurrent layers
    on their unrolled cell (torch's fused LSTM kernel has no forward-mode derivative,
    the fused RNN and GRU no batching rule), batch norm as in ``batch_statistics``."""
    from gradexp.models.recurrent import RecurrentLayer

    recurrent = [m for m in model.modules() if isinstance(m, RecurrentLayer)]
    for m in recurrent:
        m.unroll = True
    try:
        with batch_statistics(model):
            yield
    finally:
        for m in recurrent:
            m.unroll = False


def model_curvature(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    x: torch.Tensor,
    *,
    classes: int | None,
    states: bool = False,
    per_example: tuple[torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]] | None = None,
) -> Curvature:
    """The Curvature of ``model`` on the batch ``x``, over ``params`` (in their order).

    Args:
        classes: the classes of a cross-entropy task (the outputs are read as rows of
            that many logits), None for mean squared error.
        states: also return the recurrent layers' hidden states (structural damping).
        per_example: (inputs, targets, loss(out, target)) for the diagonal
            preconditioner's per-example gradients (None: no preconditioner).
    """
    from gradexp.models.recurrent import RecurrentLayer

    name_of = {p: n for n, p in model.named_parameters()}
    names = [name_of[p] for p in params]
    layers = [m for m in model.modules() if isinstance(m, RecurrentLayer)] if states else []

    def fn(*p: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Tensors]:
        seen: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in layers]
        try:
            with functional_passes(model):
                out = functional_call(model, dict(zip(names, p)), (x,))
        finally:
            for h in handles:
                h.remove()
        if classes is not None:
            out = out.reshape(-1, classes)
        return (out, tuple(seen)) if states else out

    sq_grads = None
    if per_example is not None:
        inputs, targets, loss = per_example

        def example_loss(p: Tensors, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, dict(zip(names, p)), (xi[None],))
            return loss(out, yi[None])

        def sq_grads() -> torch.Tensor:
            at = tuple(q.detach() for q in params)
            with functional_passes(model):
                per = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=32)(
                    at, inputs, targets
                )
            return flat([g.square().mean(0) for g in per])

    return Curvature(fn, "mse" if classes is None else "cross_entropy", sq_grads)
