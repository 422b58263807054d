"""Stage 2: train the VAEBM energy network with a Langevin negative phase in the backbone's noise space.

    loss = E(x+) - E(x-) + alpha_s * SR(E)                                   (vaebm.md Eq. 7, App. E)
    x- = T(eps) after Langevin on U(eps) = E(T(eps)) + 1/2 ||eps||^2          (vaebm.md Eq. 9, App. B)

The backbone is frozen and stays outside the DeepSpeed engine; only the energy network is trained. Chains start from
fresh noise or, for eps_z, from the cross-rank replay buffer with a probability that ramps up (App. E).
`train_vaebm(config, resolved)` is the whole job; when the configured backbone is not registered yet and
`backbone_train_if_missing` is set, it first trains one as a nested stage (the quickstart does this).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from core import dist as vdist
from core.models.energy import EnergyNet, data_dependent_init
from core.objectives.ebm import vaebm_loss
from core.optim.clipped_adam import ClippedAdam
from core.sampling.langevin import run_langevin
from core.sampling.replay_buffer import ReplayBuffer, replay_probability
from core.sampling.rng import rank_generator
from core.sampling.targets import make_vaebm_potential, split_state
from core.tracking import Tracker
from core.visuals import energy_histogram, save_grid
from core.training.backbone import BackboneNotFound, load_backbone
from core.training.checkpoint import (CheckpointManager, load_run_ids, publish_model, save_run_ids,
                                      stage_lifecycle)
from core.training.config import Stage1Config, Stage2Config, compose
from core.training.engine import build_engine
from core.training.loop import LoopState, loader_metrics, loop_state_from_dict, run_loop
from data_pipelines.loader_factory import build_loader

log = logging.getLogger("vaebm.train")
STAGE = "vaebm"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def vaebm_model_name(dataset_name: str) -> str:
    return f"vaebm-{dataset_name}"


class CastingEnergy(torch.nn.Module):
    """E(x) in fp32 for inputs of any dtype: the energy net may hold bf16/fp16 weights under DeepSpeed."""

    def __init__(self, energy: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.energy = energy
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x.to(self.dtype)).float()


class VAEBMStage:
    """One stage-2 step: sample negatives by Langevin in eps-space, then the contrastive-divergence update."""

    def __init__(self, engine, backbone, config: Stage2Config, buffer: ReplayBuffer | None, info: vdist.DistInfo):
        self.engine = engine
        self.energy: EnergyNet = engine.module
        self.backbone = backbone
        self.config = config
        self.buffer = buffer
        self.info = info
        self.iteration = 0
        self.energy_dtype = next(self.energy.parameters()).dtype
        self.energy_input = CastingEnergy(self.energy, self.energy_dtype)
        gen = torch.Generator().manual_seed(vdist.derive_seed(config.run.seed, 0xF17ED))
        self.fixed_noise = backbone.sample_noise(config.loop.sample_count, generator=gen, device=torch.device("cpu"))
        self.reference_batch: torch.Tensor | None = None  # data images for the energy histogram (set by the job)

    def negatives(self, batch_size: int):
        """Run this step's chains; returns (x_neg, final eps_z, Langevin result, replayed mask)."""
        device, seed, rank = self.info.device, self.config.run.seed, self.info.rank
        init_gen = rank_generator(seed, rank, self.iteration, "cpu", stream=0)  # chain starts (buffer needs CPU)
        noise_gen = rank_generator(seed, rank, self.iteration, device, stream=1)  # Langevin noise
        eps_x, eps_z = self.backbone.sample_noise(batch_size, generator=init_gen, device=torch.device("cpu"))
        replayed = torch.zeros(batch_size, dtype=torch.bool)
        if self.buffer is not None:  # vaebm.md App. E: eps_z replayed with probability p, eps_x always fresh
            p = replay_probability(self.iteration, self.config.buffer.max_p, self.config.buffer.anneal_iterations)
            eps_z, replayed = self.buffer.init_chains(batch_size, p, init_gen, device=torch.device("cpu"))
        state = [eps_x.to(device), *[e.to(device) for e in eps_z]]
        result = run_langevin(self.potential(), state, self.config.sampler.langevin, generator=noise_gen)
        with torch.no_grad():
            x_neg = self.decode(result.state)
        return x_neg, split_state(result.state)[1], result, replayed

    def potential(self):
        sampler = self.config.sampler
        return make_vaebm_potential(self.backbone, self.energy_input, mode=sampler.target,
                                    temperature=sampler.temperature, use_mean=sampler.use_mean)

    def decode(self, state: list[torch.Tensor]) -> torch.Tensor:
        """x = T(eps) (vaebm.md Eq. 11): the decoder mean or a decoder sample, as configured."""
        eps_x, eps_z = split_state(state)
        x, tower = self.backbone.generate(eps_z, eps_x, self.config.sampler.temperature)
        return (tower.x_dist.mu if self.config.sampler.use_mean else x).float()

    def loss(self, batch: dict[str, Any], cur_nimg: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = self.info.device
        x_pos = batch["x"].to(device, non_blocking=True).float()
        x_neg, eps_z, chain, replayed = self.negatives(x_pos.shape[0])
        energies = self.engine(torch.cat([x_pos, x_neg]).to(self.energy_dtype)).float()
        e_pos, e_neg = energies.chunk(2)
        terms = vaebm_loss(e_pos, e_neg, self.energy.spectral_penalty().float(), self.config.objective.alpha_s)
        if self.buffer is not None:
            self.buffer.push(eps_z)
        self.iteration += 1
        metrics = {
            "ebm/energy_pos": terms.e_pos.detach(), "ebm/energy_neg": terms.e_neg.detach(),
            "ebm/energy_gap": terms.gap.detach(), "ebm/spectral": terms.spectral.detach(),
            "ebm/replay_ratio": replayed.float().mean(), "langevin/nonfinite": torch.tensor(float(chain.num_nonfinite)),
            "langevin/grad_norm": chain.grad_norm[-1].detach().float(),
            "langevin/energy_start": chain.energy[0].detach().float(),
            "langevin/energy_end": chain.energy[-1].detach().float(),
        }
        return terms.loss, metrics

    def sample(self, out_dir: Path, cur_nimg: int) -> list[Path]:
        """Test-time chains from fixed noise: a grid of samples, a chain strip (vaebm.md Fig. 2b), energy histograms."""
        out_dir.mkdir(parents=True, exist_ok=True)
        steps = self.config.sampler.test_steps
        lcfg = dataclasses.replace(self.config.sampler.langevin, num_steps=steps, record_every=max(steps // 8, 1))
        device = self.info.device
        eps_x, eps_z = self.fixed_noise
        gen = torch.Generator(device=device).manual_seed(vdist.derive_seed(self.config.run.seed, 0x5A3))
        result = run_langevin(self.potential(), [eps_x.to(device), *[e.to(device) for e in eps_z]], lcfg,
                              generator=gen)
        tag = f"nimg-{cur_nimg:012d}"
        paths = [out_dir / f"{tag}-samples.png", out_dir / f"{tag}-chains.png", out_dir / f"{tag}-energies.png"]
        with torch.no_grad():
            x = self.decode(result.state)
            save_grid(x, paths[0])
            rows = min(8, len(x))
            frames = [self.decode([t[:rows] for t in snap]) for snap in result.snapshots]
            save_grid(torch.stack(frames, dim=1).flatten(0, 1), paths[1], nrow=len(frames))
            e_neg = self.energy_input(x).cpu()
            e_pos = self.energy_input(self.reference_batch.to(device)).cpu() if self.reference_batch is not None else None
        energy_histogram(e_pos, e_neg, paths[2], f"energies at nimg={cur_nimg}")
        return paths

    def health_check(self, metrics: dict[str, float]) -> str | None:
        """Divergence as the official README describes it ("training eventually explodes"): the energy gap blows up
        or the chains produce non-finite values."""
        gap = metrics.get("ebm/energy_gap", 0.0)
        if not abs(gap) < self.config.objective.max_energy_gap:  # also catches NaN
            return f"|E(x+) - E(x-)| = {abs(gap):.3g} exceeds {self.config.objective.max_energy_gap:g}"
        if metrics.get("langevin/nonfinite", 0.0) > 0:
            return f"{metrics['langevin/nonfinite']:.3g} non-finite chain samples per step"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))


def describe(config: Stage2Config, resolved: dict[str, Any]) -> str:
    import yaml

    from core.models.summary import format_summary

    with torch.device("meta"):
        energy = EnergyNet(config.energy)
    return yaml.safe_dump(resolved, sort_keys=False) + "\nEnergy network parameters per module:\n" + format_summary(energy)


def _ensure_backbone(config: Stage2Config, info: vdist.DistInfo, tracker: Tracker, run_dir: Path):
    """Load the configured backbone; train it first as a nested stage when allowed and missing."""
    from core.tracking import resolve_tracking_uri
    from core.training.stage1 import train_nvae

    uri = resolve_tracking_uri(config.tracking)
    dtype = DTYPES[config.backbone_dtype]
    try:
        return load_backbone(config.backbone, uri, info.device, dtype)
    except BackboneNotFound:
        if not config.backbone_train_if_missing:
            raise
    if info.is_rank0:
        log.info("backbone %s is not registered: training it first (experiment=%s)", config.backbone,
                 config.backbone_experiment)
    s1_config, s1_resolved = compose(Stage1Config, "train_nvae", [
        f"experiment={config.backbone_experiment}", f"run.dir={run_dir / 'backbone'}", f"run.seed={config.run.seed}",
        f"loop.progress_bar={str(config.loop.progress_bar).lower()}"])
    s1_config.tracking = config.tracking
    backbone_dir = train_nvae(s1_config, s1_resolved, parent_run_id=tracker.run_ids[0])
    vdist.barrier()
    return load_backbone(str(backbone_dir), uri, info.device, dtype)


def train_vaebm(config: Stage2Config, resolved: dict[str, Any]) -> Path:
    run_dir = config.run_dir()
    info = vdist.init_distributed(config.run.dist_timeout_s)
    if info.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
    vdist.barrier()

    checkpoints = CheckpointManager(run_dir, config.loop.keep_checkpoints, info.rank, info.world_size)
    tracker = Tracker(config.tracking, run_dir, info.is_rank0)
    resuming = checkpoints.latest_tag() is not None
    ids = load_run_ids(run_dir) if resuming and info.is_rank0 else {}
    tracker.start(pipeline=config.experiment, stage=STAGE, run_id=ids.get("stage"), parent_run_id=ids.get("parent"))
    backbone, bundle = _ensure_backbone(config, info, tracker, run_dir)

    x_shape = tuple(backbone.x_shape())
    want = (config.energy.in_channels, config.energy.image_size, config.energy.image_size)
    if config.energy.arch != "mlp" and x_shape != want:
        raise ValueError(f"the backbone generates {x_shape} but the energy network expects {want}: "
                         f"set energy.image_size / energy.in_channels")
    torch.manual_seed(config.run.seed)
    energy = EnergyNet(config.energy).to(info.device)
    loop_cfg = config.loop
    loader_cfg = dataclasses.replace(config.loader, batch_size=loop_cfg.batch_size,
                                     device="cuda" if info.device.type == "cuda" else "cpu")
    state = LoopState()
    init_loader = build_loader(config.dataset, loader_cfg, rank=info.rank, world_size=info.world_size,
                               seed=config.run.seed, cur_nimg=0)
    first = next(iter(init_loader))["x"].to(info.device).float()
    init_loader.close()
    if not resuming:  # weight-norm data-dependent init, moments over all ranks (identical weights everywhere)
        data_dependent_init(energy, first, init_scale=config.energy.init_scale)
    global_batch = loop_cfg.batch_size * info.world_size
    total_steps = -(-loop_cfg.total_nimg // global_batch)
    optim = config.optim
    engine, _, _ = build_engine(
        energy, optim, config.engine, loop_cfg.batch_size, info.world_size, total_steps,
        optimizer_factory=lambda params: ClippedAdam(params, lr=optim.lr, betas=tuple(optim.betas),
                                                     weight_decay=optim.weight_decay, clip_std=optim.clip_std,
                                                     clip_slack=optim.clip_slack))
    buffer = ReplayBuffer(backbone.latent_shapes(), config.buffer) if config.sampler.persistent else None
    stage = VAEBMStage(engine, backbone, config, buffer, info)
    stage.reference_batch = first[: config.loop.sample_count].cpu()

    restored = checkpoints.load(engine)
    if restored is not None:
        client, rank_state = restored
        state = loop_state_from_dict(client["loop"])
        stage.load_state_dict(client.get("stage", {}))
        if buffer is not None and "buffer" in rank_state:
            buffer.load_state_dict(rank_state["buffer"])
        if info.is_rank0:
            log.info("resuming from %s at nimg=%d", checkpoints.latest_tag(), state.cur_nimg)
    if restored is None:
        tracker.log_params(resolved)

    loader = build_loader(config.dataset, loader_cfg, rank=info.rank, world_size=info.world_size,
                          seed=config.run.seed, cur_nimg=state.cur_nimg)
    data = iter(loader)

    def client_state() -> dict[str, Any]:
        if info.is_rank0:
            save_run_ids(run_dir, *tracker.run_ids)
        return {}

    def rank_state() -> dict[str, Any]:
        out = {"rng": vdist.rng_state(), "data": loader.state_dict()}
        if buffer is not None:
            out["buffer"] = buffer.state_dict()
        return out

    with stage_lifecycle(tracker, loader):
        state = run_loop(stage, data, loop_cfg, state, checkpoints, info, config.run.seed, run_dir,
                         on_report=lambda m, n: tracker.log_metrics(m, step=n),
                         on_samples=lambda paths, n: [tracker.log_artifact(p, "samples") for p in paths],
                         client_state=client_state, rank_state=rank_state,
                         stop_after_nimg=config.run.stop_after_nimg, extra_metrics=loader_metrics(loader, info.device),
                         health_check=stage.health_check, patience=config.objective.divergence_patience)
        finished = state.cur_nimg >= loop_cfg.total_nimg
        if finished and info.is_rank0:
            model_bundle = {"kind": "vaebm", "energy": dataclasses.asdict(config.energy), "backbone": bundle,
                            "sampler": dataclasses.asdict(config.sampler)}
            weights = {f"energy.{k}": v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
            weights.update({f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()})
            publish_model(tracker, run_dir, vaebm_model_name(config.dataset.name), model_bundle, weights)
        if finished:
            tracker.end("FINISHED")
    return run_dir

