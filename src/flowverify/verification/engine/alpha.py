r"""alpha-CROWN (Xu et al. 2021) for :class:`~.crown.EngineProblem`: the lower slopes of
the unstable (leaky) ReLUs optimised for the radius of the final bound.

Every slope in ``[a, 1]`` gives a sound relaxation (the lower line of
:class:`~.activations.LeakyReLUOp` passes through the origin below the activation), so
every iterate's radius is a certified radius; the best one is kept.
"""

from __future__ import annotations

import torch

from flowverify.verification.engine import activations as act

__all__ = ["optimise"]


def optimise(prob, idx, eps_t, bounds, relax) -> torch.Tensor:
    """alpha-CROWN (Xu et al. 2021): the lower slopes of the unstable (leaky) ReLUs,
    one per margin and neuron, optimised by Adam for the final bound; intermediate
    bounds stay CROWN's.  Every slope in ``[a, 1]`` gives a sound bound; the best radius
    seen is kept, and the slopes warm-start the next call on the same image."""
    graph = prob.graph
    m = prob.spec.shape[1]
    nodes = [i for i in relax if isinstance(graph.nodes[i].op, act.LeakyReLUOp)]
    alphas = {}
    for i in nodes:
        lo, up = (t.reshape(len(idx), -1) for t in bounds[graph.nodes[i].inputs[0]])
        init = (up >= -lo).to(lo.dtype)[:, None, :].expand(-1, m, -1).clone()
        for k, img in enumerate(idx):
            saved = prob._alpha.get((int(img), i))
            if saved is not None:
                init[k] = saved
        alphas[i] = init.requires_grad_(True)
    if not alphas:
        return torch.zeros(len(idx), dtype=torch.float64, device=prob.device)
    opt = torch.optim.Adam(list(alphas.values()), lr=prob.lr)
    best = torch.zeros(len(idx), dtype=torch.float64, device=prob.device)
    keep = {i: a.detach().clone() for i, a in alphas.items()}
    cap = eps_t[:, None] * 1.05
    for _ in range(prob.iterations):
        opt.zero_grad()
        rel = dict(relax)
        for i, a in alphas.items():
            node = graph.nodes[i]
            lo, up = bounds[node.inputs[0]]
            s_lo, b_lo, s_up, b_up = node.op.relax(lo, up)
            lo_f, up_f = lo.reshape(len(idx), -1), up.reshape(len(idx), -1)
            unstable = ((lo_f < 0) & (up_f > 0))[:, None, :]
            slope = torch.where(unstable, a.clamp(node.op.a, 1.0), s_lo.reshape(len(idx), 1, -1))
            rel[i] = (slope.reshape(len(idx), m, *node.shape), b_lo, s_up, b_up)
        lin = prob.linear(idx, graph.output, prob.spec[idx], rel)
        rad = prob._radii(lin, eps_t, idx, grad=True)
        val = rad.detach().min(dim=1).values
        better = val > best
        if bool(better.any()):
            best = torch.where(better, val, best)
            for i, a in alphas.items():
                keep[i][better] = a.detach()[better]
        obj = torch.minimum(torch.where(torch.isfinite(rad), rad, cap), cap)
        (-obj.sum()).backward()
        opt.step()
    for i, a in keep.items():
        for k, img in enumerate(idx):
            prob._alpha[(int(img), i)] = a[k]
    return best
