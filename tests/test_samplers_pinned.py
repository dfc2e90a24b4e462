"""Pinned sums of every sampler on a fake model with a constant G (in the style of diffusers' scheduler tests).

The fake model answers G = 1 on every token and records the (t, s) it is given. By hand, with sigma_d = 0.5,
T = 0.994, eps = 0 and the uniform grid t_i = T (1 - i/n):
  pushforward, euler   x_n = x_0 - sigma_d * sum_i (t_i - t_{i+1}) = x_0 - 0.497, whatever n (the sum telescopes)
  restart              x_hat_i = x_i - 0.5 t_i;  x_{i+1} = (1 - t_{i+1}) x_hat_i + t_{i+1} e_i;  x_n = x_hat_{n-1}
                       e.g. n = 2: x = 0.503 (x_0 - 0.497) + 0.497 e_0 - 0.2485
The model is given s = t_{i+1} (pushforward), s = t_i (euler), s = 0 (restart). Both samplers (the KV-cached one and
the reference by recomputation) must give these numbers; x_0 and e_i are the generator's draws in that order.
"""

import pytest
import torch

from nextx import generate
from oracles import t2i_reference
from nextx.model import ModelOutput
from nextx.sequence import SpecialIds

SP = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
GRID, C = (2, 2), 3
N = GRID[0] * GRID[1]


class ConstantG(torch.nn.Module):
    """G = 1 on every token; records the (t, s) of every call that carries noise tokens."""

    latent_dim, vocab_size = C, 8

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))     # gives the samplers a device
        self.calls: list[tuple[float, float]] = []

    def forward(self, inp, past=None, use_cache=False, text_mask=None):
        B, L = inp.ids.shape
        if inp.t.numel():
            self.calls.append((float(inp.t[0]), float(inp.s[0])))
        new = [(torch.zeros(B, 1, L, 1), torch.zeros(B, 1, L, 1))]
        if past is not None:
            new = [(torch.cat([past[0][0], new[0][0]], 2), torch.cat([past[0][1], new[0][1]], 2))]
        n = int(text_mask.sum()) if text_mask is not None else B * L
        return ModelOutput(text_logits=torch.zeros(n, self.vocab_size), latent_out=torch.ones(B, L, C),
                           past=new if use_cache else None)


def _draws(n_steps, seed, restart):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((2, N, C), generator=g, dtype=torch.float64) * 0.5
    e = [torch.randn((2, N, C), generator=g, dtype=torch.float64) * 0.5 for _ in range(n_steps - 1)] if restart else []
    return x0, e


@pytest.mark.parametrize("fn", [generate.t2i, t2i_reference], ids=["cached", "reference"])
@pytest.mark.parametrize("sampler", ["pushforward", "euler", "restart"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_constant_G_pinned(fn, sampler, n):
    m = ConstantG()
    x = fn(m, [[5, 6], [7]], SP, grid=GRID, latent_dim=C, steps=n, sampler=sampler,
           generator=torch.Generator().manual_seed(n)).double()
    x0, e = _draws(n, n, sampler == "restart")
    ts = [0.994 * (1 - i / n) for i in range(n + 1)]
    if sampler == "restart":
        want = x0
        for i in range(n):
            x_hat = want - 0.5 * ts[i]
            want = x_hat if i == n - 1 else (1 - ts[i + 1]) * x_hat + ts[i + 1] * e[i]
    else:
        want = x0 - 0.497
    assert (x - want).abs().max() < 1e-6
    if sampler != "restart":
        assert abs(float((x - x0).mean()) + 0.497) < 1e-6             # the pinned sum
    if n == 2 and sampler == "restart":
        assert (x - (0.503 * (x0 - 0.497) + 0.497 * e[0] - 0.2485)).abs().max() < 1e-6
    s_given = {"pushforward": ts[1:], "euler": ts[:-1], "restart": [0.0] * n}[sampler]
    assert [c[0] for c in m.calls] == pytest.approx(ts[:-1], abs=1e-6)       # float32 times
    assert [c[1] for c in m.calls] == pytest.approx(s_given, abs=1e-6)
