"""nextx.imm: every function against hand-computed numbers (the arithmetic is in the comments), boundary cases,
an independent loop implementation of the MMD loss, and gradcheck."""

import math

import pytest
import torch

from nextx import imm

f64 = torch.float64


def T(*v):
    return torch.tensor(v, dtype=f64)


def close(a, b, tol=1e-12):
    a, b = torch.as_tensor(a, dtype=f64), torch.as_tensor(b, dtype=f64)
    assert a.shape == b.shape or b.dim() == 0, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=0, atol=tol), (a, b)


# ------------------------------------------------------------------------------------------------ time maps


def test_alpha_sigma_eta_logsnr_by_hand():
    a, s = imm.alpha_sigma(T(0.0, 0.3, 1.0))
    close(a, T(1.0, 0.7, 0.0))                      # 1 - t
    close(s, T(0.0, 0.3, 1.0))                      # t
    assert a.dtype == s.dtype == f64
    a, s = imm.alpha_sigma(torch.tensor([0.3], dtype=torch.float32))
    assert a.dtype == f64                           # time math is float64 whatever comes in
    close(imm.eta_of(T(0.2, 0.5, 0.0)), T(0.25, 1.0, 0.0))          # 0.2/0.8, 0.5/0.5, 0/1
    close(imm.t_of_eta(T(0.25, 1.0, 0.0)), T(0.2, 0.5, 0.0))        # 0.25/1.25, 1/2
    assert imm.t_of_eta(T(math.inf)).item() == 1.0
    close(imm.log_snr(T(0.5, 0.2)), T(0.0, 2.772588722239781))     # -2 log 1 = 0; -2 log 0.25 = 4 ln 2
    t = torch.linspace(0.001, 0.999, 101, dtype=f64)
    close(imm.t_of_eta(imm.eta_of(t)), t, 1e-14)
    close(imm.log_snr(t), -2 * torch.log(imm.eta_of(t)), 1e-12)


def test_interpolate_ddim_flow_target_by_hand():
    x, e = T(2.0, 1.0), T(-1.0, 3.0)
    # t = 0.25: 0.75*2 + 0.25*(-1) = 1.25;  t = 0.5: 0.5*1 + 0.5*3 = 2
    close(imm.interpolate(x, e, T(0.25, 0.5)), T(1.25, 2.0))
    close(imm.flow_target(x, e), T(-3.0, 2.0))                       # noise - x
    # ddim(x_t=3, x=1, s=0.25, t=0.5): (0.75 - 0.5*0.25/0.5)*1 + (0.25/0.5)*3 = 0.5 + 1.5 = 2
    close(imm.ddim(T(3.0), T(1.0), T(0.25), T(0.5)), T(2.0))
    # x_r = ddim(x_t, x, r, t) = alpha_r x + sigma_r eps with the same eps (docs/imm.md §1)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(3, 4, 5, generator=g, dtype=f64), torch.randn(3, 4, 5, generator=g, dtype=f64) * 0.5
    t, r = T(0.9, 0.5, 0.2), T(0.3, 0.49, 0.0)
    close(imm.ddim(imm.interpolate(x, e, t), x, r, t), imm.interpolate(x, e, r), 1e-14)
    close(imm.ddim(imm.interpolate(x, e, t), x, t, t), imm.interpolate(x, e, t), 1e-14)  # s == t: identity


def test_interpolate_dtypes_and_broadcast():
    x = torch.randn(2, 3, 4)
    y = imm.interpolate(x, torch.zeros(2, 3, 4), T(0.5, 0.25))
    assert y.dtype == torch.float32
    close(y, torch.stack([0.5 * x[0], 0.75 * x[1]]).double(), 1e-6)
    assert imm.interpolate(x.double(), x, T(0.5, 0.5)).dtype == f64
    close(imm.interpolate(x, x, 0.3), x.double(), 1e-6)               # scalar t broadcasts over everything
    with pytest.raises(ValueError):
        imm.interpolate(x, x, T(0.1, 0.2, 0.3))                       # 3 times for 2 samples


# ------------------------------------------------------------------------------------------------ t, s, r


def test_r_of_by_hand():
    # delta = eta(T)/2^12 = (0.994/0.006)/4096 = 0.040445963541666664 (eps = 0)
    # t = 0.5: eta_r = 1 - delta = 0.9595540364583334, r = 0.9595540364583334/1.9595540364583334 = 0.48967980...
    # t = 0.9: eta_r = 9 - delta, r = 0.899593897845289 (gap 4e-4 > min_gap)
    # t = 0.994: eta_r = 165.6262..., r = 0.9939985435918776, gap 1.46e-6 < 1e-4 -> r = t - 1e-4 = 0.9939
    # t = 0.03, s = 0.01: eta_t = 0.0309 < delta -> eta_r = 0 -> r = 0 -> r = max(r, s) = s
    s = T(0.0, 0.1, 0.1, 0.01)
    t = T(0.5, 0.9, 0.994, 0.03)
    r = imm.r_of(s, t)
    close(r, T(0.4896798039785705, 0.899593897845289, 0.9939, 0.01), 1e-9)
    # without the min gap the raw decrement near T is 1.4564e-06
    close(imm.r_of(T(0.1), T(0.994), min_gap=0.0), T(0.9939985435918776), 1e-9)
    # t - min_gap < s: r = s (target = x_s)
    close(imm.r_of(T(0.49995), T(0.5)), T(0.49995))
    # eps > 0: eta_min = eta(eps) and r >= eps
    r = imm.r_of(T(0.006), T(0.01), eps=0.006)
    assert r.item() >= 0.006


def test_k_at_by_hand():
    assert imm.k_at(0, 12, 2.0, 1000) == 2.0
    assert imm.k_at(500, 12, 2.0, 1000) == 7.0          # 2 + 10 * 500/1000
    assert imm.k_at(250, 12, 0.0, 1000) == 3.0
    assert imm.k_at(1000, 12, 2.0, 1000) == 12.0 and imm.k_at(10**6, 12, 2.0, 1000) == 12.0
    assert imm.k_at(None, 12, 2.0, 1000) == 12.0 and imm.k_at(7, 12, 2.0, 0) == 12.0
    # a fractional k is a fractional power: delta = eta(T) / 2^2.5 = 165.6667 / 5.656854 = 29.2862...
    t = T(0.99)                                             # eta = 99 -> eta_r = 69.7138..., r = 0.985859...
    delta = (0.994 / 0.006) / 2 ** 2.5
    close(imm.r_of(T(0.0), t, k=2.5), T((99 - delta) / (1 + 99 - delta)), 1e-12)


def test_r_of_properties_on_random_times():
    g = torch.Generator().manual_seed(1)
    for eps, k, gap in [(0.0, 12, 1e-4), (0.006, 15, 1e-4), (0.0, 10, 0.0), (0.0, 12, 0.05)]:
        t, s = imm.sample_t_s(20000, eps=eps, generator=g)
        r = imm.r_of(s, t, k=k, min_gap=gap, eps=eps)
        assert r.dtype == f64 and r.shape == t.shape
        assert (r >= s).all() and (r <= t).all() and (r >= eps).all()
        room = t - gap >= s
        assert (r[room] <= t[room] - gap + 1e-15).all()              # min gap holds where it can
        assert (r[~room] == s[~room]).all()
        small = imm.eta_of(t) < (imm.eta_of(0.994) - imm.eta_of(eps)) / 2 ** k
        assert (r[small] == s[small]).all()                           # eta clamps to eta_min -> r = s
        assert (r[s < t] < t[s < t]).all()                           # r < t strictly whenever s < t


def test_min_gap_is_active_near_T_only():
    t = T(0.5, 0.9, 0.99, 0.994)
    s = torch.zeros_like(t)
    raw = imm.r_of(s, t, min_gap=0.0)
    gapped = imm.r_of(s, t, min_gap=1e-4)
    active = gapped != raw
    assert active.tolist() == [False, False, True, True]              # t - r: 1e-2, 4e-4, 3.9e-5, 1.5e-6
    close(gapped[active], t[active] - 1e-4, 1e-15)


def test_sample_t_s_uniform():
    t, s = imm.sample_t_s(50000, generator=torch.Generator().manual_seed(0))
    assert t.shape == s.shape == (50000,) and t.dtype == f64
    assert (0 <= s).all() and (s <= t).all() and (t <= 0.994).all()
    assert abs(t.mean().item() - 0.497) < 0.01                         # U(0, 0.994): mean 0.497
    assert abs(s.mean().item() - 0.2485) < 0.01                        # E[s] = E[t]/2
    t2, s2 = imm.sample_t_s(50000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(s, s2)                   # reproducible from the generator
    t, s = imm.sample_t_s(1000, eps=0.006, generator=torch.Generator().manual_seed(0))
    assert (s >= 0.006).all() and (t >= s).all()


def test_sample_t_s_lognormal_is_truncated_properly():
    t, s = imm.sample_t_s(50000, mode="lognormal", generator=torch.Generator().manual_seed(0))
    assert (0 <= s).all() and (s <= t).all() and (t <= 0.994).all()
    # median of log eta_t ~ -1.1 (truncation at 3.1 sd above and ~8.7 sd below moves it by < 0.01);
    # eta = e^-1.1 = 0.333 -> t = 0.25. [U]'s quirk would give t >= 0.5 always.
    assert abs(torch.log(imm.eta_of(t)).median().item() + 1.1) < 0.05
    assert (t < 0.5).float().mean() > 0.6
    t, s = imm.sample_t_s(5000, mode="lognormal", eps=0.006, T=0.9, generator=torch.Generator().manual_seed(0))
    assert (s >= 0.006).all() and (s <= t).all() and (t <= 0.9).all()
    with pytest.raises(ValueError):
        imm.sample_t_s(3, mode="bogus")


# ------------------------------------------------------------------------------------------------ f, scale, weight


def test_euler_fm_by_hand_and_boundary():
    # x_t - (t - s) sigma_d G = 1 - (0.6 - 0.2)*0.5*2 = 0.6
    close(imm.euler_fm(T(1.0), T(2.0), T(0.2), T(0.6)), T(0.6), 1e-15)
    x_t, G = torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    t = T(0.3, 0.7, 0.994)
    out = imm.euler_fm(x_t, G, t, t)
    assert out.dtype == torch.float32 and torch.equal(out, x_t)        # s == t returns x_t exactly
    close(imm.pushforward_step(x_t.double(), G, t, t * 0.5), imm.euler_fm(x_t.double(), G, t * 0.5, t), 0)


def test_exact_velocity_makes_euler_fm_exact():
    # on the straight OT-FM line, G = (eps - x)/sigma_d gives f(x_t, s, t) = x_s for any s
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(4, 6, generator=g, dtype=f64), 0.5 * torch.randn(4, 6, generator=g, dtype=f64)
    t, s = T(0.994, 0.5, 0.3, 0.1), T(0.0, 0.25, 0.29, 0.1)
    G = imm.flow_target(x, e) / 0.5
    close(imm.euler_fm(imm.interpolate(x, e, t), G, s, t), imm.interpolate(x, e, s), 1e-14)
    close(imm.restart_noise(x, T(0.3, 0.3, 0.3, 0.3), e), imm.interpolate(x, e, 0.3), 0)


def test_kernel_scale_by_hand():
    close(imm.kernel_scale(T(0.2, 0.6), T(0.6, 0.2)), T(5.0, 5.0))    # 1/(0.4*0.5), |t - s|
    close(imm.kernel_scale(T(0.0), T(0.5), sigma_d=1.0), T(2.0))       # 1/(0.5*1)
    # s == t: the gap is floored at 1e-12 -> 1/(1e-12*0.5) = 2e12, finite
    close(imm.kernel_scale(T(0.3), T(0.3)), T(2e12), 1e-3)


def test_loss_weight_by_hand_and_table():
    # t = 0.5, (a, b) = (1, 4): lambda = 0, sigmoid(4) = 0.98201379, -dlambda/dt = 2/(0.5*0.5) = 8,
    # alpha/(alpha^2 + sigma^2) = 0.5/0.5 = 1 -> w = 0.5*0.98201379*8 = 3.928055160151634
    close(imm.loss_weight(T(0.5)), T(3.928055160151634), 1e-12)
    # docs/imm.md §4 (rounded): .01 -> .57, .1 -> 4.9, .2 -> 5.7, .5 -> 3.9, .994 -> 1.0; a = 2: .006 at .994
    close(imm.loss_weight(T(0.01, 0.1, 0.2, 0.5, 0.994)), T(0.57, 4.9, 5.7, 3.9, 1.0), 0.05)
    close(imm.loss_weight(T(0.994), a=2.0), T(0.006), 5e-4)


def test_loss_weight_equals_literal_formula_and_is_finite_at_ends():
    t = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=f64)
    for a, b in [(1.0, 4.0), (2.0, 4.0), (1.0, 5.0)]:
        lam = imm.log_snr(t)
        literal = 0.5 * torch.sigmoid(b - lam) * (2 / (t * (1 - t))) * (1 - t) ** a / ((1 - t) ** 2 + t ** 2)
        assert torch.allclose(imm.loss_weight(t, a=a, b=b), literal, rtol=1e-12, atol=0)
    w = imm.loss_weight(T(0.0, 1e-300, 1e-12, 1.0))
    assert torch.isfinite(w).all()
    close(w[:3], T(0.0, 0.0, 0.0), 1e-9)                               # w ~ e^b t as t -> 0
    close(w[3:], T(1.0))                                                # a = 1: t / t^2 / t^2 at t = 1


# ------------------------------------------------------------------------------------------------ kernel, MMD


def test_laplace_kernel_by_hand():
    # ||(0,0) - (3,4)|| = 5, scale 4, D 2: exp(-4*5/2) = exp(-10) = 4.5399929762484854e-05
    close(imm.laplace_kernel(T(0.0, 0.0), T(3.0, 4.0), 4.0, 2), 4.5399929762484854e-05, 1e-18)
    # identical points: distance floored at sqrt(1e-8) = 1e-4: exp(-4*1e-4/2) = 0.9998000199986667
    close(imm.laplace_kernel(T(1.0, 1.0), T(1.0, 1.0), 4.0, 2), 0.9998000199986667, 1e-15)


def test_mmd_loss_by_hand_single_particle():
    # G = M = 1, y = (0,0), yh = (3,4), D = 2, s = 0, t = 0.5 -> scale 1/(0.5*0.5) = 4
    # K(y,y) = K(yh,yh) = 0.9998000199986667, K(y,yh) = exp(-10) = 4.5399929762484854e-05
    # w(0.5) = 3.928055160151634 -> L = w*(2*0.99980002 - 2*4.54e-5) = 7.854182588494191
    out = imm.mmd_loss(T(0.0, 0.0).reshape(1, 1, 2), T(3.0, 4.0).reshape(1, 1, 2), T(0.5), T(0.0))
    close(out, T(7.854182588494191), 1e-12)
    assert out.shape == (1,) and out.dtype == f64


def slow_mmd(y, yh, t, s, sigma_d=0.5, a=1.0, b=4.0):
    """Independent reference: Python loops over groups and particle pairs, written from docs/imm.md §4 directly."""
    out = []
    for g in range(y.shape[0]):
        tg, sg = float(t[g]), float(s[g])
        scale = 1.0 / (abs(tg - sg) * sigma_d)
        lam = 2 * math.log((1 - tg) / tg)
        w = 0.5 / (1 + math.exp(lam - b)) * 2 / (tg * (1 - tg)) * (1 - tg) ** a / ((1 - tg) ** 2 + tg ** 2)
        M, D = y.shape[1], y[g, 0].numel()

        def K(u, v):
            d = max(float(((u - v) ** 2).sum()), 1e-8) ** 0.5
            return math.exp(-scale * d / D)

        tot = 0.0
        for j in range(M):
            for k in range(M):
                tot += K(y[g, j], y[g, k]) + K(yh[g, j], yh[g, k]) - 2 * K(y[g, j], yh[g, k])
        out.append(w * tot / M ** 2)
    return torch.tensor(out, dtype=f64)


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 4, 2, 3, 3), (2, 1, 7)])
def test_mmd_loss_matches_slow_loop(shape):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(shape, generator=g, dtype=f64) * 0.3
    yh = y + 0.2 * torch.randn(shape, generator=g, dtype=f64)
    t = T(0.9, 0.3, 0.6)[: shape[0]]
    s = T(0.2, 0.0, 0.59)[: shape[0]]
    out = imm.mmd_loss(y, yh, t, s)
    assert out.shape == (shape[0],)
    assert torch.allclose(out, slow_mmd(y, yh, t, s), rtol=1e-10, atol=1e-14)
    assert (out > 0).all()                                              # Laplace kernel is characteristic
    out2 = imm.mmd_loss(y, yh, t, s, a=2.0, b=5.0, sigma_d=1.0)
    assert torch.allclose(out2, slow_mmd(y, yh, t, s, sigma_d=1.0, a=2.0, b=5.0), rtol=1e-10, atol=1e-14)


def test_mmd_loss_zero_iff_same_particles():
    y = torch.randn(3, 4, 6, 2, dtype=f64)
    t, s = T(0.9, 0.5, 0.1), T(0.1, 0.4, 0.0)
    assert torch.equal(imm.mmd_loss(y, y.clone(), t, s), torch.zeros(3, dtype=f64))   # V-statistic: exactly 0
    # same set in another order: the V-statistic is permutation invariant
    assert imm.mmd_loss(y, y[:, [2, 0, 3, 1]], t, s).abs().max() < 1e-12


def test_mmd_loss_shapes_agree():
    # (G, M, N, C) and (G, M, C, H, W) holding the same numbers give the same loss (D = N*C = C*H*W = 12)
    y, yh = torch.randn(2, 4, 12, dtype=f64), torch.randn(2, 4, 12, dtype=f64)
    t, s = T(0.7, 0.2), T(0.1, 0.1)
    a = imm.mmd_loss(y.reshape(2, 4, 4, 3), yh.reshape(2, 4, 4, 3), t, s)
    b = imm.mmd_loss(y.reshape(2, 4, 3, 2, 2), yh.reshape(2, 4, 3, 2, 2), t, s)
    assert a.shape == b.shape == (2,)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        imm.mmd_loss(y, yh[:, :3], t, s)


def test_mmd_loss_dtypes():
    y, yh = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5, 3)
    t, s = T(0.7, 0.2), T(0.1, 0.1)
    assert imm.mmd_loss(y, yh, t, s).dtype == torch.float32
    assert imm.mmd_loss(y.bfloat16(), yh.bfloat16(), t, s).dtype == torch.float32   # kernel in >= fp32
    ref = imm.mmd_loss(y.double(), yh.double(), t, s)
    assert ref.dtype == f64
    assert torch.allclose(imm.mmd_loss(y, yh, t, s).double(), ref, rtol=1e-5)
    # float32 times work too (promoted to float64 inside)
    assert torch.allclose(imm.mmd_loss(y.double(), yh.double(), t.float(), s.float()), ref, rtol=1e-6)


def test_mmd_loss_gradcheck():
    g = torch.Generator().manual_seed(4)
    y = torch.randn(2, 3, 2, 3, generator=g, dtype=f64).requires_grad_()
    yh = torch.randn(2, 3, 2, 3, generator=g, dtype=f64)
    t, s = T(0.8, 0.5), T(0.1, 0.0)
    assert torch.autograd.gradcheck(lambda u: imm.mmd_loss(u, yh, t, s), (y,))


def test_mmd_loss_no_nan_grad_when_particles_coincide():
    y = torch.randn(2, 4, 3, 2, dtype=f64)
    y[:, 1] = y[:, 0]                                                  # two online particles coincide
    yh = torch.randn(2, 4, 3, 2, dtype=f64)
    yh[:, 2] = y[:, 2]                                                 # an online particle equals a target one
    y.requires_grad_()
    imm.mmd_loss(y, yh, T(0.9, 0.4), T(0.2, 0.0)).sum().backward()
    assert torch.isfinite(y.grad).all()
    # s == t (scale floored): finite loss and finite gradient
    y.grad = None
    out = imm.mmd_loss(y, yh, T(0.5, 0.3), T(0.5, 0.3))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(y.grad).all()


# ------------------------------------------------------------------------------------------------ sampling grids


def test_sampling_times_uniform_by_hand():
    close(imm.sampling_times(4), T(0.994, 0.7455, 0.497, 0.2485, 0.0), 1e-15)   # linspace(0.994, 0, 5)
    close(imm.sampling_times(1), T(0.994, 0.0))
    close(imm.sampling_times(2, eps=0.006), T(0.994, 0.5, 0.006), 1e-15)


def test_sampling_times_shifted_by_hand():
    # u = 1, .75, .5, .25, 0 -> shift 3: 3u / (1 + 2u) = 1, .9, .75, .5, 0 (by hand), times T = 0.994
    close(imm.sampling_times(4, shift=3.0), T(0.994, 0.8946, 0.7455, 0.497, 0.0), 1e-15)
    # eps = 0.1: t = eps + (T - eps) shift(u); u = .5 -> .75: 0.1 + 0.894 * 0.75 = 0.7705
    close(imm.sampling_times(2, eps=0.1, shift=3.0), T(0.994, 0.7705, 0.1), 1e-15)
    # shift 1 is the plain grid; a shift below 1 moves the steps toward the data
    close(imm.sampling_times(4, shift=1.0), imm.sampling_times(4), 0.0)
    assert (imm.sampling_times(4, shift=0.5)[1:-1] < imm.sampling_times(4)[1:-1]).all()


def test_sampling_times_edm_by_hand():
    # N = 2, eps = 0: eta_1 = (eta_max^(1/7)/2)^7 = eta_max/128 = 165.6667/128 = 1.2942708, t = 0.5641316685584563
    close(imm.sampling_times(2, schedule="edm"), T(0.994, 0.5641316685584563, 0.0), 1e-9)


@pytest.mark.parametrize("schedule", ["uniform", "edm"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_sampling_times_endpoints_and_monotone(schedule, n):
    for eps in (0.0, 0.006):
        ts = imm.sampling_times(n, eps=eps, schedule=schedule)
        assert ts.shape == (n + 1,) and ts.dtype == f64
        assert ts[0].item() == 0.994 and ts[-1].item() == eps
        assert (ts[1:] < ts[:-1]).all()


def test_sampling_times_rejects_bad_arguments():
    with pytest.raises(ValueError):
        imm.sampling_times(0)
    with pytest.raises(ValueError):
        imm.sampling_times(2, schedule="karras")
    with pytest.raises(ValueError, match="uniform schedule only"):
        imm.sampling_times(2, schedule="edm", shift=3.0)
    with pytest.raises(ValueError, match="time shift"):
        imm.sampling_times(2, shift=0.0)


def test_time_shift_moves_t_toward_noise():
    """shift_time by hand, and sample_t_s with a shift: t = eps + (T - eps) shift(u), s | t still U(eps, t)."""
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(imm.shift_time(u, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert torch.equal(imm.shift_time(u, 1.0), u)
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    t0, s0 = imm.sample_t_s(20000, eps=0.01, generator=g0)
    t3, s3 = imm.sample_t_s(20000, eps=0.01, generator=g1, shift=3.0)
    T = imm.T_MAX
    assert torch.allclose(t3, 0.01 + (T - 0.01) * imm.shift_time((t0 - 0.01) / (T - 0.01), 3.0))  # same draws
    assert (s3 <= t3).all() and (s3 >= 0.01).all()
    assert torch.allclose((s3 - 0.01) / (t3 - 0.01), (s0 - 0.01) / (t0 - 0.01))      # s | t: the same share
    assert abs(float(t3.median()) - (0.01 + (T - 0.01) * 0.75)) < 0.01
    with pytest.raises(ValueError, match="lognormal"):
        imm.sample_t_s(4, mode="lognormal", shift=3.0)
    with pytest.raises(ValueError, match="> 0"):
        imm.shift_time(u, 0.0)


def test_s_eps_share_sets_a_share_of_s_to_eps():
    """s_eps_share p: t as without it (the same first draws), s = eps where a third uniform draw is < p, and the
    paper's s | t ~ U(eps, t) elsewhere, the very values drawn without it; 0 leaves the stream alone."""
    g0, g1, g2 = (torch.Generator().manual_seed(5) for _ in range(3))
    t0, s0 = imm.sample_t_s(20000, eps=0.01, generator=g0, shift=3.0)
    t1, s1 = imm.sample_t_s(20000, eps=0.01, generator=g1, shift=3.0, s_eps_share=0.25)
    assert torch.equal(t1, t0)
    g2.manual_seed(5)
    torch.rand(2, 20000, generator=g2, dtype=torch.float64)                          # the (t, s) draws
    at_eps = torch.rand(20000, generator=g2, dtype=torch.float64) < 0.25             # the third draw, by hand
    assert torch.equal(s1[at_eps], torch.full_like(s1[at_eps], 0.01))
    assert torch.equal(s1[~at_eps], s0[~at_eps])
    assert abs(float(at_eps.double().mean()) - 0.25) < 0.01
    t_all, s_all = imm.sample_t_s(100, eps=0.0, generator=torch.Generator().manual_seed(1), s_eps_share=1.0)
    assert torch.equal(s_all, torch.zeros(100, dtype=torch.float64)) and (t_all > 0).all()
    with pytest.raises(ValueError, match="s_eps_share"):
        imm.sample_t_s(4, s_eps_share=1.5)
