"""Throughput of the two hot loops on this machine: NVAE training steps and eps-space Langevin steps.

    python launchers/bench_train.py [nvae=tiny] [energy=cifar10] [energy_channels=16] [batch=16] [steps=5]
                                    [precision=fp32|bf16] [device=auto|cpu|cuda]

Prints a table: stage-1 images/s (forward + backward + Adamax step, one process) and stage-2 Langevin chain-steps/s
(one eps-space gradient of E(T(eps)) + |eps|^2/2 per chain and step). Record results in docs/benchmarks.md.
"""
from __future__ import annotations

import sys
import time

import torch


def _parse(argv: list[str]) -> dict[str, str]:
    args = dict(nvae="tiny", energy="cifar10", energy_channels="16", batch="16", steps="5", precision="fp32",
                device="auto")
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in args:
            raise SystemExit(f"error: expected one of {sorted(args)} as key=value, got {arg!r}")
        args[key] = value
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    from core.models import NVAE, NVAEConfig
    from core.training.config import load_preset
    from core.models.energy import EnergyNet, EnergyNetConfig
    from core.objectives.elbo import ELBOConfig, kl_balance_weights, nelbo_loss
    from core.sampling.langevin import LangevinConfig, run_langevin
    from core.methods.potentials import make_vaebm_potential

    a = _parse(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a["device"] == "auto" else a["device"])
    batch, steps = int(a["batch"]), int(a["steps"])
    autocast = None if a["precision"] == "fp32" else a["precision"]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None)

    cfg = load_preset("nvae", a["nvae"], NVAEConfig)
    model = NVAE(cfg).to(device)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3, eps=1e-3)
    alpha = kl_balance_weights(cfg.latent_shapes()).to(device)
    x = torch.rand(batch, *model.x_shape(), device=device) * 2 - 1

    def train_step() -> None:
        with amp:
            tower = model(x)
        terms = nelbo_loss(tower.to(torch.float32), x, 0.5, ELBOConfig(), alpha, model.spectral_penalty().float(),
                           model.batchnorm_penalty().float())
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        opt.step()

    train_step()  # warm-up (allocations, kernel selection)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_rate = batch * steps / (time.perf_counter() - t0)

    model.eval().requires_grad_(False)
    energy = EnergyNet(load_preset("energy", a["energy"], EnergyNetConfig, image_size=cfg.image_size,
                                   in_channels=cfg.in_channels, base_channels=int(a["energy_channels"]))).to(device)
    potential = make_vaebm_potential(model, energy)
    eps_x, eps_z = model.sample_noise(batch, device=device)
    lcfg = LangevinConfig(num_steps=steps, step_size=1e-5, autocast=autocast)
    run_langevin(potential, [eps_x, *eps_z], LangevinConfig(num_steps=1, step_size=1e-5, autocast=autocast))
    _sync(device)
    t0 = time.perf_counter()
    run_langevin(potential, [eps_x, *eps_z], lcfg)
    _sync(device)
    chain_rate = batch * steps / (time.perf_counter() - t0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}   nvae={a['nvae']}   energy={a['energy']}x{a['energy_channels']}   batch={batch}   "
          f"precision={a['precision']}")
    print("| loop | rate |\n| --- | ---: |")
    print(f"| stage 1: NVAE train step | {train_rate:,.1f} images/s |")
    print(f"| stage 2: eps-space Langevin step | {chain_rate:,.1f} chain-steps/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
