"""Pure Inductive Moment Matching math: interpolant, times, r(s, t), Euler-FM step, kernel, weight, MMD, t-grids.

Reference: Zhou, Ermon, Song, "Inductive Moment Matching" (arXiv 2503.07565, ICML 2025), cited as [P] with
equation / appendix numbers; `docs/imm.md` (cited as docs/imm.md §n) writes the math out with the project's
defaults. Only the OT-FM interpolant is implemented (the paper's ImageNet setting, docs/design.md §5):

    x_t = alpha_t x + sigma_t eps,   alpha_t = 1 - t,   sigma_t = t,   eps ~ N(0, sigma_d^2 I)      ([P] §2, App. C)
    eta_t = sigma_t / alpha_t = t / (1 - t),   lambda_t = log-SNR = -2 log eta_t

Parameterisation (Euler-FM, [P] App. C.3, docs/imm.md §3): f(x_t, s, t) = x_t - (t - s) sigma_d G, so sigma_d G plays
the flow-matching velocity eps - x (`flow_target`) and f(x_t, t, t) = x_t exactly.

Choices (docs/imm.md states the math; the reasons are here):
  * Every time quantity (t, s, r, eta, lambda, weights, kernel scale) is computed in float64: near T = 0.994 the
    gap t - r is ~1e-6 (k = 12), below float32's resolution of t (docs/imm.md §9). Tensor results that combine times
    with data (`interpolate`, `ddim`, `euler_fm`) are computed in float64 and returned in the promoted dtype of
    the data inputs, so fp64 in gives fp64 out (the sampler's state) and fp32 in gives fp32 out.
  * Times are (n,) tensors, one per sample (or per group); data is (n, ...) and the time broadcasts over the
    trailing dims. A 0-d tensor or Python float broadcasts over everything.
  * `mmd_loss` is the V-statistic with the diagonal included ([P] Eq. 67; docs/imm.md §4); the squared distance is
    clamped at 1e-8 (distance >= 1e-4) so the diagonal, where the distance is exactly 0, has a zero (not NaN)
    gradient (docs/imm.md §4 [U], §9).
  * `kernel_scale` clamps |t - s| at `MIN_GAP_SCALE` = 1e-12: s == t would give an infinite scale and, through
    exp(-inf * d) * inf, NaN gradients. With the clamp every off-diagonal kernel underflows to exactly 0 and its
    gradient to 0, which is the s -> t limit (at s == t, f = x_t carries no gradient through G anyway).
  * `loss_weight` is simplified analytically (see its docstring) so that it is finite at t = 0 and at t = 1.

Legend: G groups, M particles per group (share s, r, t), D elements of one particle (e.g. N tokens x C channels).
"""

from __future__ import annotations

import math

import torch

Time = torch.Tensor | float  # a time: (n,) tensor, 0-d tensor or Python float
SIGMA_D = 0.5          # data std of the latents (docs/imm.md §1)
T_MAX = 0.994          # largest time for OT-FM: eta_max ~ 165.7 (docs/imm.md §1)
MIN_GAP_SCALE = 1e-12  # |t - s| floor inside kernel_scale (module docstring)
SQ_DIST_FLOOR = 1e-8   # squared-distance floor of the Laplace kernel (docs/imm.md §4 [U])
ETA_TINY = 1e-8        # lower end of log-eta when eps = 0 (lognormal time sampling)


def _f64(t, device=None) -> torch.Tensor:
    """A time (tensor or float) as a float64 tensor, on its own device unless `device` is given."""
    if isinstance(t, torch.Tensor):
        return t.to(dtype=torch.float64, device=device if device is not None else t.device)
    return torch.tensor(float(t), dtype=torch.float64, device=device)


def _over(t, x: torch.Tensor) -> torch.Tensor:
    """(n,) time -> float64 (n, 1, ..., 1) on x's device, to broadcast over x of shape (n, ...); 0-d stays 0-d."""
    t = _f64(t, x.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"time of shape {tuple(t.shape)} does not match data of shape {tuple(x.shape)}: "
                         "expected (n,) for data (n, ...)")
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _out_dtype(*xs: torch.Tensor) -> torch.dtype:
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt


# --------------------------------------------------------------------------------------------------------
# Interpolant and time maps ([P] §2, App. C.1; docs/imm.md §1)


def alpha_sigma(t: Time) -> tuple[torch.Tensor, torch.Tensor]:
    """OT-FM schedule: t (any shape) -> (alpha_t, sigma_t) = (1 - t, t), float64, same shape and device."""
    t = _f64(t)
    return 1.0 - t, t


def eta_of(t: Time) -> torch.Tensor:
    """t -> eta_t = sigma_t / alpha_t = t / (1 - t), float64 (inf at t = 1). Same shape as t."""
    t = _f64(t)
    return t / (1.0 - t)


def t_of_eta(eta: Time) -> torch.Tensor:
    """eta -> t = eta / (1 + eta), float64, the inverse of `eta_of` (t -> 1 as eta -> inf). Same shape."""
    eta = _f64(eta)
    return torch.where(torch.isinf(eta), torch.ones_like(eta), eta / (1.0 + eta))


def log_snr(t: Time) -> torch.Tensor:
    """t -> lambda_t = log(alpha_t^2 / sigma_t^2) = -2 log eta_t = 2 (log(1 - t) - log t), float64 (+inf at t=0)."""
    t = _f64(t)
    return 2.0 * (torch.log1p(-t) - torch.log(t))


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: Time) -> torch.Tensor:
    """x_t = alpha_t x + sigma_t noise ([P] Eq. 1). x, noise (n, ...); t (n,) (or scalar) broadcast over (...).

    Computed in float64; returned in the promoted dtype of x and noise. noise already has std sigma_d."""
    a, s = alpha_sigma(_over(t, x))
    return (a * x.double() + s * noise.double()).to(_out_dtype(x, noise))


def ddim(x_t: torch.Tensor, x: torch.Tensor, s: Time, t: Time) -> torch.Tensor:
    """DDIM(x_t, x, s, t) = (alpha_s - alpha_t sigma_s / sigma_t) x + (sigma_s / sigma_t) x_t ([P] Eq. 6).

    x_t, x (n, ...); s, t (n,) or scalars, t > 0. Moves x_t from t to s along the line through the clean x: for
    x_t = alpha_t x + sigma_t eps it returns alpha_s x + sigma_s eps (same eps), so x_r = ddim(x_t, x, r, t).
    For OT-FM the coefficients are ((t - s) / t, s / t). Float64 inside; promoted dtype of (x_t, x) out."""
    s64, t64 = _over(s, x_t), _over(t, x_t)
    a_s, sg_s = alpha_sigma(s64)
    a_t, sg_t = alpha_sigma(t64)
    return ((a_s - a_t * sg_s / sg_t) * x.double() + (sg_s / sg_t) * x_t.double()).to(_out_dtype(x_t, x))


def flow_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The OT-FM velocity d x_t / d t = noise - x (any shape). In Euler-FM, sigma_d * G estimates this velocity,
    so f(x_t, s, t) = x_t - (t - s) * sigma_d * G is one Euler step of the probability-flow ODE from t to s."""
    return noise - x


# --------------------------------------------------------------------------------------------------------
# Training times: t, s ~ p(t, s); r(s, t) ([P] App. C.7, Table 5; docs/imm.md §1-2)


def _sample_trunc_normal(lo: torch.Tensor, hi: torch.Tensor, mean: float, std: float, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from N(mean, std^2) truncated to [lo, hi] (float64, elementwise), given u ~ U(0, 1)."""
    def cdf(z):
        return 0.5 * (1.0 + torch.erf((z - mean) / (std * math.sqrt(2.0))))
    p = cdf(lo) + u * (cdf(hi) - cdf(lo))
    z = mean + std * math.sqrt(2.0) * torch.special.erfinv(2.0 * p - 1.0)
    return torch.minimum(torch.maximum(z, lo), hi)  # erfinv(+-1) = +-inf at the float64 edges


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift on [0, 1] (Esser et al. 2024, eq. 23): u -> shift u / (1 + (shift - 1) u). Monotone, fixes
    0 and 1; shift > 1 moves times toward noise (shift 3: 0.25 -> 0.5, 0.5 -> 0.75), shift 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    return shift * u / (1 + (shift - 1) * u)


def sample_t_s(n: int, *, T: float = T_MAX, eps: float = 0.0, mode: str = "uniform",
               generator: torch.Generator | None = None, device=None,
               P_mean: float = -1.1, P_std: float = 2.0, shift: float = 1.0,
               s_eps_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n pairs (t, s), eps <= s <= t <= T. Returns t, s, each (n,) float64 on `device` (default: CPU).

    mode "uniform" ([P] App. C.7, Table 5; the default): t ~ U(eps, T), s | t ~ U(eps, t). With `shift` != 1,
    t = eps + (T - eps) shift_time(u, shift), u ~ U(0, 1): more draws near T, where the layout of a scene is decided
    (docs/drawing.md); s | t stays U(eps, t).
    mode "lognormal" (docs/imm.md §1 [U]): log eta_t ~ N(P_mean, P_std^2) truncated to [log eta(eps), log eta(T)],
    then log eta_s from the same normal truncated to [log eta(eps), log eta_t], both by inverse CDF. eta(eps) is
    floored at ETA_TINY (eps = 0 has log eta = -inf). Unlike [U], the lower bound is a log (see docs/imm.md §1 quirk).
    s_eps_share: the share of pairs whose s is then set to eps, each pair by a third uniform draw u_2 < s_eps_share
    (drawn only when the share is > 0, so share 0 leaves the random stream as it was): the jump to the clean
    estimate, the only s the restart sampler asks for (`sampler_s`).
    Randomness comes from `generator` (drawn on its device, then moved to `device`).
    """
    if not 0.0 <= eps < T < 1.0:
        raise ValueError(f"need 0 <= eps < T < 1, got eps={eps}, T={T}")
    if not 0.0 <= s_eps_share <= 1.0:
        raise ValueError(f"s_eps_share must be in [0, 1], got {s_eps_share}")
    gen_device = generator.device if generator is not None else (device if device is not None else "cpu")
    u = torch.rand(2, n, generator=generator, dtype=torch.float64, device=gen_device).to(device)  # (2, n)
    if mode == "uniform":
        t = eps + (T - eps) * shift_time(u[0], shift)                      # shift 1: u itself, exactly
        s = eps + (t - eps) * u[1]
    elif mode == "lognormal":
        if shift != 1.0:
            raise ValueError("a time shift applies to mode 'uniform' only (lognormal has its own P_mean)")
        lo = torch.log(eta_of(max(eps, ETA_TINY / (1 + ETA_TINY)))).to(u.device).expand(n)
        hi = torch.log(eta_of(T)).to(u.device).expand(n)
        log_eta_t = _sample_trunc_normal(lo, hi, P_mean, P_std, u[0])
        log_eta_s = _sample_trunc_normal(lo, log_eta_t, P_mean, P_std, u[1])
        t = t_of_eta(torch.exp(log_eta_t)).clamp(eps, T)
        s = torch.minimum(t_of_eta(torch.exp(log_eta_s)).clamp(min=eps), t)
    else:
        raise ValueError(f"unknown time sampling mode {mode!r} (expected 'uniform' or 'lognormal')")
    if s_eps_share > 0:
        at_eps = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device).to(device) < s_eps_share
        s = torch.where(at_eps, torch.full_like(s, eps), s)
    return t, s


def k_at(step: int | None, k: float, k_start: float, ramp_steps: int) -> float:
    """Induction depth k at an optimizer step: linear from k_start (step 0) to k (step >= ramp_steps).

    delta = (eta_max - eta_min) / 2^k so the r-gap shrinks geometrically, a coarse-to-fine curriculum of the kind
    consistency training uses for its discretisation (iCT/ECT). Data enters the IMM target only where r reaches s
    (README: "IMM induction depth"); a small k early moves it up the time axis in few induction steps, the final
    k is the paper's. ramp_steps = 0 or step None (evaluation) gives the final k."""
    if ramp_steps <= 0 or step is None or step >= ramp_steps:
        return float(k)
    return float(k_start) + (float(k) - float(k_start)) * max(step, 0) / ramp_steps


def r_of(s: Time, t: Time, *, k: float = 12, min_gap: float = 1e-4, T: float = T_MAX, eps: float = 0.0) -> torch.Tensor:
    """r(s, t) by a constant decrement in eta ([P] §4.2, App. C.6; docs/imm.md §2). s, t (n,) -> r (n,) float64.

        delta = (eta(T) - eta(eps)) / 2^k
        eta_r = clamp(eta_t - delta, eta(eps), eta(T)),   r = t_of_eta(eta_r)
        r = min(r, t - min_gap)     (minimum gap, [P] App. I.6: needed near T where t - r ~ 1e-6 for k = 12)
        r = max(r, s),  r >= eps    (so s <= r <= t; r == s for small t, where eta_r clamps to eta(eps))
    """
    s, t = _f64(s), _f64(t)
    eta_lo, eta_hi = eta_of(eps).item(), eta_of(T).item()
    delta = (eta_hi - eta_lo) / 2 ** k
    eta_r = (eta_of(t) - delta).clamp(eta_lo, eta_hi)
    r = torch.minimum(t_of_eta(eta_r), t - min_gap)
    return torch.maximum(r, s).clamp(min=eps)


# --------------------------------------------------------------------------------------------------------
# Parameterisation, kernel, weight, loss ([P] §4, App. C.3-C.5, Eq. 67; docs/imm.md §3-4)


def euler_fm(x_t: torch.Tensor, G: torch.Tensor, s: Time, t: Time, sigma_d: float = SIGMA_D) -> torch.Tensor:
    """Euler-FM f(x_t, s, t) = x_t - (t - s) sigma_d G ([P] App. C.3). x_t, G (n, ...); s, t (n,) or scalars.

    s == t returns x_t exactly. Float64 inside; promoted dtype of (x_t, G) out (differentiable in G)."""
    gap = _over(t, x_t) - _over(s, x_t)
    return (x_t.double() - gap * sigma_d * G.double()).to(_out_dtype(x_t, G))


def kernel_scale(s: Time, t: Time, sigma_d: float = SIGMA_D) -> torch.Tensor:
    """Laplace-kernel scale w~(s, t) = 1 / |c_out(s, t)| = 1 / (|t - s| sigma_d) for Euler-FM ([P] App. C.5).

    s, t (n,) -> (n,) float64. |t - s| is clamped at MIN_GAP_SCALE = 1e-12 (scale <= 2e12 for sigma_d = 0.5):
    s == t would be an infinite scale, and the kernel's gradient -scale * exp(-scale * d) would be inf * 0 = NaN;
    with the clamp the off-diagonal kernels underflow to exactly 0 with zero gradient (the s -> t limit)."""
    return 1.0 / ((_f64(t) - _f64(s)).abs().clamp(min=MIN_GAP_SCALE) * sigma_d)


def loss_weight(t: Time, *, a: float = 1.0, b: float = 4.0) -> torch.Tensor:
    """w(s, t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t / d t) alpha_t^a / (alpha_t^2 + sigma_t^2) ([P] App. C.4).

    t (any shape) -> same shape, float64; depends on t only. For OT-FM, -d lambda/dt = 2 / (t (1 - t)) and
    sigmoid(b - lambda_t) = t^2 / (t^2 + (1 - t)^2 e^-b), so, with the t and (1 - t) factors cancelled by hand,

        w = t / (t^2 + (1 - t)^2 e^-b) * (1 - t)^(a - 1) / ((1 - t)^2 + t^2),

    finite on [0, 1] for a >= 1 (w(0) = 0; the literal product is 0 * inf at t = 0, docs/imm.md §9). Values for
    (a, b) = (1, 4): t = .01 -> .57, .1 -> 4.9, .2 -> 5.7, .5 -> 3.9, .994 -> 1.0; a = 2 gives .006 at .994.
    """
    t = _f64(t)
    one_t = 1.0 - t
    return t / (t * t + one_t * one_t * math.exp(-b)) * one_t.pow(a - 1.0) / (one_t * one_t + t * t)


def laplace_kernel(x: torch.Tensor, y: torch.Tensor, scale, D: int) -> torch.Tensor:
    """K(x, y) = exp(-scale * max(||x - y||_2, 1e-4) / D) ([P] §4, App. C.5; docs/imm.md §4).

    x, y broadcastable (..., D') with the particle flattened in the last dim (the norm is over it); scale
    broadcastable to the result (...). D is the normaliser (elements of one particle; docs/imm.md §9: D, not sqrt D).
    The floor is on the squared distance (1e-8, as [U]), so identical x and y give a zero, not NaN, gradient."""
    sq = (x - y).pow(2).sum(-1)
    return torch.exp(-scale * sq.clamp(min=SQ_DIST_FLOOR).sqrt() / D)


def mmd_loss(y: torch.Tensor, y_target: torch.Tensor, t: Time, s: Time, *, sigma_d: float = SIGMA_D,
             a: float = 1.0, b: float = 4.0) -> torch.Tensor:
    """Per-group IMM loss ([P] Eq. 67, Alg. 1; docs/imm.md §4). Returns (G,).

    y: (G, M, ...) online particles f_theta(x_t, s, t); y_target: (G, M, ...) target particles f_theta-(x_r, s, r),
    treated as given (the caller detaches or builds it under no_grad). t, s: (G,) times of each group.

        L_g = w(s, t) * 1/M^2 sum_{j,k} [K(y_j, y_k) + K(yh_j, yh_k) - 2 K(y_j, yh_k)]

    V-statistic (diagonal included), Laplace kernel with scale w~(s, t) = `kernel_scale`, D = prod(dims after M).
    The kernel is computed in the promoted dtype of (y, y_target, float32), which is also the output dtype
    (fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs). Memory: G*M*M*D elements for the pairwise differences.
    """
    if y.shape != y_target.shape or y.dim() < 3:
        raise ValueError(f"y and y_target must both be (G, M, ...); got {tuple(y.shape)} and {tuple(y_target.shape)}")
    G, M = y.shape[:2]
    dt = _out_dtype(y, y_target, torch.empty(0, dtype=torch.float32))
    yf = y.to(dt).reshape(G, M, -1)                                             # (G, M, D)
    yh = y_target.to(dt).reshape(G, M, -1)
    D = yf.shape[-1]
    scale = kernel_scale(s, t, sigma_d).to(device=y.device, dtype=dt).reshape(G, 1, 1)   # (G, 1, 1)
    w = loss_weight(t, a=a, b=b).to(device=y.device, dtype=dt).reshape(G)

    def k(u, v):  # (G, M, D), (G, M, D) -> (G, M, M)
        return laplace_kernel(u[:, :, None], v[:, None, :], scale, D)

    mmd = (k(yf, yf) + k(yh, yh) - 2.0 * k(yf, yh)).mean(dim=(1, 2))           # (G,)
    return w * mmd


# --------------------------------------------------------------------------------------------------------
# Sampling ([P] §5, Alg. 2-3, App. I.2; docs/imm.md §6)


def sampling_times(n_steps: int, *, T: float = T_MAX, eps: float = 0.0, schedule: str = "uniform",
                   rho: float = 7.0, shift: float = 1.0) -> torch.Tensor:
    """The t-grid of an n_steps sampler: (n_steps + 1,) float64, t_0 = T > t_1 > ... > t_n = eps.

    "uniform" (default; best in [P] Fig. 6): linspace(T, eps, n_steps + 1); with `shift` != 1, the same grid in u
    moved as training moves its t draws (`sample_t_s`): t_i = eps + (T - eps) shift_time(1 - i/n, shift), so a run
    trained with objective.t_shift = 3 samples where it trained (4 steps from T = 1: 1, .9, .75, .5, 0).
    "edm": eta_i = (eta_max^(1/rho) + i/n (eta_min^(1/rho) - eta_max^(1/rho)))^rho mapped back to t (rho = 7).
    Step i of the pushforward sampler goes from t = ts[i] to s = ts[i + 1]."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if not 0.0 <= eps < T < 1.0:
        raise ValueError(f"need 0 <= eps < T < 1, got eps={eps}, T={T}")
    if shift != 1.0 and schedule != "uniform":
        raise ValueError(f"a time shift ({shift}) applies to the uniform schedule only, not {schedule!r}")
    if schedule == "uniform" and shift == 1.0:
        ts = torch.linspace(T, eps, n_steps + 1, dtype=torch.float64)
    elif schedule == "uniform":  # the u-grid 1 .. 0 moved as sample_t_s moves its draws
        ts = eps + (T - eps) * shift_time(torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64), shift)
    elif schedule == "edm":
        hi, lo = eta_of(T).item() ** (1 / rho), eta_of(eps).item() ** (1 / rho)
        i = torch.arange(n_steps + 1, dtype=torch.float64)
        ts = t_of_eta((hi + i / n_steps * (lo - hi)) ** rho)
    else:
        raise ValueError(f"unknown sampling schedule {schedule!r} (expected 'uniform' or 'edm')")
    ts[0], ts[-1] = T, eps  # exact endpoints (no round-off through eta)
    return ts


def pushforward_step(x_t: torch.Tensor, G: torch.Tensor, t: Time, s: Time, sigma_d: float = SIGMA_D) -> torch.Tensor:
    """One pushforward step from t down to s ([P] Alg. 2): x_s = f(x_t, s, t) = `euler_fm(x_t, G, s, t)`.

    NOTE the argument order (t before s, the direction of travel), unlike `euler_fm`. Shapes as `euler_fm`."""
    return euler_fm(x_t, G, s, t, sigma_d)


def restart_noise(x_hat: torch.Tensor, t_next: Time, noise: torch.Tensor) -> torch.Tensor:
    """Restart sampling ([P] Alg. 3): re-noise the clean estimate to t_next, alpha x_hat + sigma noise.

    x_hat, noise (n, ...) (noise has std sigma_d); t_next (n,) or scalar. Same as `interpolate`."""
    return interpolate(x_hat, noise, t_next)


SAMPLERS = ("pushforward", "restart", "euler")


def sampler_s(sampler: str, t_i: float, t_next: float, eps: float = 0.0) -> float:
    """The s the model is given on the step from t_i to t_next: t_next (pushforward, [P] Alg. 2), eps (restart:
    jump to the clean estimate, Alg. 3), t_i (euler: the flow baseline sees s = t, as in its training)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return t_i if sampler == "euler" else (eps if sampler == "restart" else t_next)


def sampler_step(sampler: str, x: torch.Tensor, G: torch.Tensor, t_i: float, t_next: float, *, eps: float = 0.0,
                 sigma_d: float = SIGMA_D, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One step of a sampler from t_i to t_next, given the model's G at (x, s = `sampler_s(...)`, t_i). x, G (n, ...).

    pushforward, euler   x <- `pushforward_step(x, G, t_i, t_next)` = x - (t_i - t_next) sigma_d G
    restart              x_hat = `euler_fm(x, G, eps, t_i)`; then `restart_noise(x_hat, t_next, noise)`, or x_hat
                         itself when noise is None (the last step, t_next = eps)
    Float64 in gives float64 out (the samplers keep x in float64)."""
    if sampler == "restart":
        x_hat = euler_fm(x, G, eps, t_i, sigma_d)
        return x_hat if noise is None else restart_noise(x_hat, t_next, noise)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return pushforward_step(x, G, t_i, t_next, sigma_d)
