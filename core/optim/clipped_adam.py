"""Adam with VAEBM's element-wise gradient clipping (vaebm.md App. E, following Du & Mordatch 2019).

"We clip training gradients that are more than 3 standard deviations from the 2nd-order Adam parameters":
before each Adam update every gradient element is clamped to

    |g_i| <= clip_std * sqrt(v_hat_i) + clip_slack,    v_hat = v_{t-1} / (1 - beta2^(t-1))

where v_{t-1} is Adam's second-moment estimate *before* this step's gradient enters it and t-1 the number of updates
taken so far; clip_slack = 0.1 is the constant VAEBM's code adds. Why the previous estimate: VAEBM's code clips
p.grad before calling optimizer.step(), and it is the right test statistic -- a gradient judged against moments that
already contain it inflates its own bound.

First step: no update has happened, so there is no v_hat (1 - beta2^0 = 0); the gradient passes unclipped, as in
VAEBM's code. (Adam's first update is lr * sign(g) per element anyway, so only the moment estimates see it.)

Weight decay (torch Adam's L2 form, 3e-5 in App. E) is added by Adam after the clamp: the clamp bounds the loss
gradient only, again as in VAEBM's code.

The clamp is element-wise and reads only this optimizer's own state, so it stays exact when DeepSpeed calls step()
itself (ZeRO stage 0) or rewrites param_groups to flat fp32 partitions and calls it on those (ZeRO stages 1-2).
"""
from __future__ import annotations

import torch


class ClippedAdam(torch.optim.Adam):
    """torch.optim.Adam whose step() first clamps each gradient element to +-(clip_std * sqrt(v_hat) + clip_slack).

    Defaults are VAEBM's (App. E / official code): betas (0.99, 0.999), weight decay 3e-5, 3 standard deviations,
    slack 0.1. `clip_std` and `clip_slack` are per-param-group settings and are saved in the state dict.
    After each step, `last_clipped_fraction` holds the fraction of this rank's gradient elements that were clamped
    (a 0-d tensor, so reading it is the only host sync).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.99, 0.999), eps: float = 1e-8,
                 weight_decay: float = 3e-5, clip_std: float = 3.0, clip_slack: float = 0.1, **adam_kwargs):
        if clip_std <= 0:
            raise ValueError(f"clip_std must be > 0, got {clip_std}")
        if clip_slack < 0:
            raise ValueError(f"clip_slack must be >= 0, got {clip_slack}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adam_kwargs)
        self.defaults.update(clip_std=clip_std, clip_slack=clip_slack)
        for group in self.param_groups:  # groups added by Adam's __init__ predate the new defaults
            group.setdefault("clip_std", clip_std)
            group.setdefault("clip_slack", clip_slack)
        self.last_clipped_fraction = torch.zeros(())

    def __setstate__(self, state: dict) -> None:
        # load_state_dict() goes through here: state dicts saved without the clip keys get this instance's defaults
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("clip_std", self.defaults.get("clip_std", 3.0))
            group.setdefault("clip_slack", self.defaults.get("clip_slack", 0.1))

    @torch.no_grad()
    def clip_gradients_(self) -> None:
        """Clamp every gradient in place against the current (pre-step) second-moment estimate."""
        clipped, total = None, 0
        for group in self.param_groups:
            beta2 = float(group["betas"][1])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ClippedAdam does not support sparse gradients")
                total += p.grad.numel()
                state = self.state.get(p)
                if not state or "exp_avg_sq" not in state or float(state["step"]) < 1:
                    continue  # first step: no v_hat yet, pass unclipped (module docstring)
                step = float(state["step"])
                v_hat = state["exp_avg_sq"] / (1.0 - beta2 ** step)
                bound = v_hat.sqrt_().mul_(group["clip_std"]).add_(group["clip_slack"]).to(p.grad.dtype)
                n = (p.grad.abs() > bound).sum()
                clipped = n if clipped is None else clipped + n
                p.grad.clamp_(min=-bound, max=bound)
        if clipped is None:
            self.last_clipped_fraction = torch.zeros(())
        else:
            self.last_clipped_fraction = clipped.float() / max(total, 1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.clip_gradients_()
        super().step()
        return loss
