"""ClippedAdam against an independent float64 Adam+clamp, and inside DeepSpeed engines (ZeRO 0, 1, 2) on CPU.

Run as a script (`python tests/test_energy_clipped_adam.py OUT.pt`) this file is the DeepSpeed worker: DeepSpeed needs
a process group, which the test gives it in a fresh subprocess so pytest's process stays clean.
"""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.optim import ClippedAdam

LR, BETAS, EPS, WD = 0.05, (0.99, 0.999), 1e-8, 3e-5


def reference_clipped_adam(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float],
                           eps: float, wd: float, clip_std: float, slack: float):
    """Plain float64 Adam (L2 weight decay) with the App. E clamp, written from the equations.

    Returns the parameter after each step, the clamped gradient of each step and the mask of clamped elements.
    """
    b1, b2 = betas
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    params, clamped, masks = [], [], []
    for t, g in enumerate(grads, start=1):
        g = g.double().clone()
        if t > 1:  # the bound uses v_{t-1}, bias-corrected with t-1 (no bound at the first step)
            bound = clip_std * torch.sqrt(v / (1 - b2 ** (t - 1))) + slack
            masks.append(g.abs() > bound)
            g = torch.maximum(torch.minimum(g, bound), -bound)
        else:
            masks.append(torch.zeros_like(g, dtype=torch.bool))
        clamped.append(g.clone())
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (torch.sqrt(v_hat) + eps)
        params.append(p.clone())
    return params, clamped, masks


def _gradient_sequence(n: int, steps: int) -> list[torch.Tensor]:
    """Ordinary gradients with occasional large spikes (so some elements get clamped and most do not)."""
    gen = torch.Generator().manual_seed(1)
    grads = []
    for t in range(steps):
        g = torch.randn(n, generator=gen) * 0.5
        if t in (0, 3, 5):  # a spike at the first step too: it must pass unclipped
            spikes = torch.rand(n, generator=gen) < 0.2
            g = torch.where(spikes, g * 40.0, g)
        grads.append(g)
    return grads


@pytest.mark.parametrize("clip_std,slack", [(3.0, 0.1), (1.0, 0.0)])
def test_matches_float64_adam_with_elementwise_clamp(clip_std, slack):
    n, steps = 300, 8
    p0 = torch.randn(n)
    grads = _gradient_sequence(n, steps)
    ref_params, ref_clamped, masks = reference_clipped_adam(p0, grads, LR, BETAS, EPS, WD, clip_std, slack)

    p = torch.nn.Parameter(p0.clone())
    opt = ClippedAdam([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, clip_std=clip_std, clip_slack=slack)
    for t in range(steps):
        p.grad = grads[t].clone()
        opt.step()
        # the gradient is clamped in place: element-wise equal to the formula
        torch.testing.assert_close(p.grad.double(), ref_clamped[t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.detach().double(), ref_params[t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.last_clipped_fraction.item(), masks[t].double().mean().item())

    assert not masks[0].any()  # first step: no v_hat, nothing clipped even though it has 40x spikes
    assert torch.equal(ref_clamped[0], grads[0].double())
    spike_steps = [masks[3], masks[5]]
    assert all(0 < mask.sum() < n for mask in spike_steps), [int(mask.sum()) for mask in spike_steps]


def test_bound_uses_previous_second_moment_not_the_updated_one():
    # step 1 with g = 1 gives v_1 = 0.001 and v_hat = 1 -> bound at step 2 is 3 * 1 + 0.1 = 3.1 exactly
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ClippedAdam([p], lr=0.0, weight_decay=0.0)
    p.grad = torch.ones(3)
    opt.step()
    p.grad = torch.tensor([100.0, -100.0, 2.0])
    opt.step()
    torch.testing.assert_close(p.grad, torch.tensor([3.1, -3.1, 2.0]))


def test_state_dict_round_trip_keeps_clip_settings_and_trajectory():
    grads = _gradient_sequence(50, 6)
    p = torch.nn.Parameter(torch.randn(50))
    opt = ClippedAdam([p], lr=LR, clip_std=2.0, clip_slack=0.05)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["clip_std"] == 2.0 and saved["param_groups"][0]["clip_slack"] == 0.05

    q = torch.nn.Parameter(p.detach().clone())
    resumed = ClippedAdam([q], lr=LR)  # default clip settings, overwritten by the loaded state
    resumed.load_state_dict(saved)
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(p, q)


def test_rejects_invalid_clip_settings():
    with pytest.raises(ValueError):
        ClippedAdam([torch.nn.Parameter(torch.zeros(1))], clip_std=0.0)
    with pytest.raises(ValueError):
        ClippedAdam([torch.nn.Parameter(torch.zeros(1))], clip_slack=-1.0)


# ---------------------------------------------------------------------------------------------------- DeepSpeed
LOSS_SCALES = (1.0, 1.0, 1.0, 30.0, 1.0, 50.0, 1.0)  # gradient spikes at steps 4 and 6 trigger the clamp
STAGES = (0, 1, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_batches():
    from core.models.energy import EnergyNet
    from presets import energy_preset

    torch.manual_seed(0)
    model = EnergyNet(energy_preset("mlp", hidden=16, num_layers=2))
    batches = [torch.randn(2, 2) for _ in LOSS_SCALES]
    return model, batches


def _train(model, optimizer, batches, engine=None):
    for x, scale in zip(batches, LOSS_SCALES):
        if engine is None:
            optimizer.zero_grad()
            (scale * model(x).mean()).backward()
            optimizer.step()
        else:
            loss = scale * engine(x).mean()
            engine.backward(loss)
            engine.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _deepspeed_worker(out_path: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model, batches = _model_and_batches()
    results = {}
    standalone = copy.deepcopy(model)
    results["standalone"] = _train(standalone, ClippedAdam(standalone.parameters(), lr=LR), batches)
    plain = copy.deepcopy(model)
    results["plain_adam"] = _train(plain, torch.optim.Adam(plain.parameters(), lr=LR, betas=BETAS,
                                                           weight_decay=WD), batches)
    for stage in STAGES:
        net = copy.deepcopy(model)
        optimizer = ClippedAdam(net.parameters(), lr=LR)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                  "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
                  "steps_per_print": 2**62, "wall_clock_breakdown": False}
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
        results[f"stage{stage}"] = _train(engine.module, None, batches, engine)
        results[f"stage{stage}_wrapped"] = ds_optimizer is not optimizer
        # DeepSpeed steps ours: directly (stage 0) or as the base optimizer inside its ZeRO wrapper
        results[f"stage{stage}_base_is_ours"] = getattr(ds_optimizer, "optimizer", ds_optimizer) is optimizer
    torch.save(results, out_path)


def test_same_trajectory_inside_deepspeed_zero_0_1_2(tmp_path):
    out = tmp_path / "trajectories.pt"
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(out)

    standalone = results["standalone"]
    # the spikes were clamped: plain Adam ends elsewhere, so equality below is not vacuous
    assert (results["plain_adam"] - standalone).abs().max() > 1e-3
    for stage in STAGES:
        assert results[f"stage{stage}_base_is_ours"], stage
        torch.testing.assert_close(results[f"stage{stage}"], standalone, rtol=1e-5, atol=1e-6, msg=f"ZeRO {stage}")
    assert not results["stage0_wrapped"]  # stage 0: the engine calls our step() directly
    assert results["stage1_wrapped"] and results["stage2_wrapped"]  # ZeRO 1/2: steps on flat fp32 partitions


if __name__ == "__main__":
    _deepspeed_worker(sys.argv[1])
