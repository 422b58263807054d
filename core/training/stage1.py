"""Stage 1: train the NVAE backbone by maximizing the ELBO (vaebm.md Sec. 3.1, Eq. 3) under DeepSpeed.

`train_nvae(config, resolved)` is the whole job: distributed setup, data, model, engine, implicit resume, the loop,
MLflow tracking, and registration of the trained backbone as `nvae-<dataset>` with alias `latest`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from core import dist as vdist
from core.models.nvae import NVAE
from core.objectives.elbo import ELBOConfig, kl_balance_weights, nelbo_loss
from core.tracking import Tracker
from core.training.backbone import backbone_bundle
from core.visuals import save_grid
from core.training.checkpoint import (CheckpointManager, load_run_ids, publish_model, save_run_ids,
                                      stage_lifecycle)
from core.training.config import Stage1Config
from core.training.engine import build_engine
from core.training.loop import LoopState, loader_metrics, loop_state_from_dict, run_loop
from data_pipelines.loader_factory import build_loader

log = logging.getLogger("vaebm.train")
STAGE = "nvae"


def backbone_model_name(dataset_name: str) -> str:
    return f"nvae-{dataset_name}"


class NVAEStage:
    """The stage-1 step: negative ELBO with KL warm-up/balancing plus spectral and BN regularization."""

    def __init__(self, engine, objective: ELBOConfig, total_nimg: int, loop_cfg, device: torch.device, seed: int):
        self.engine = engine
        self.model: NVAE = engine.module
        self.objective = objective
        self.total_nimg = total_nimg
        self.device = device
        self.alpha = kl_balance_weights(self.model.latent_shapes()).to(device)
        self.dtype = next(self.model.parameters()).dtype
        self.sample_count = loop_cfg.sample_count
        self.temperatures = list(loop_cfg.sample_temperatures)
        gen = torch.Generator().manual_seed(vdist.derive_seed(seed, 0xF17ED))  # fixed grid noise, same every run
        self.fixed_noise = self.model.sample_noise(self.sample_count, generator=gen, device=torch.device("cpu"))

    def loss(self, batch: dict[str, Any], cur_nimg: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"].to(self.device, non_blocking=True).to(self.dtype)
        tower = self.engine(x).to(torch.float32)  # objectives in fp32 whatever the network runs in
        terms = nelbo_loss(tower, x.float(), cur_nimg / self.total_nimg, self.objective, self.alpha,
                           self.model.spectral_penalty().float(), self.model.batchnorm_penalty().float())
        metrics = {
            "train/nelbo": terms.nelbo.mean().detach(),
            "train/reconstruction": terms.reconstruction.mean().detach(),
            "train/kl": terms.kl_per_group.sum(1).mean().detach(),
            "train/spectral": terms.spectral.detach(),
            "train/batchnorm": terms.batchnorm.detach(),
            "train/kl_coeff": torch.tensor(terms.kl_coeff),
            "train/norm_coeff": torch.tensor(terms.norm_coeff),
            "train/lr": torch.tensor(self.engine.get_lr()[0]),
        }
        for l, kl in enumerate(terms.kl_per_group.mean(0).detach()):
            metrics[f"kl/group_{l:02d}"] = kl
        return terms.loss, metrics

    @torch.no_grad()
    def sample(self, out_dir: Path, cur_nimg: int) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        self.model.eval()
        paths = []
        eps_x, eps_z = self.fixed_noise
        for t in self.temperatures:
            z = [e.to(self.device, self.dtype) for e in eps_z]
            tower = self.model.T_z(z, temperature=t)
            images = tower.x_dist.mu.float()  # decoder mean: the grid shows what the prior generates, not pixel noise
            paths.append(save_grid(images, out_dir / f"nimg-{cur_nimg:012d}-t{t:g}.png"))
        self.model.train(was_training)
        return paths

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def describe(config: Stage1Config, resolved: dict[str, Any]) -> str:
    """Dry-run text: resolved config and parameter counts (built on the meta device: no memory, any preset)."""
    import yaml

    from core.models.summary import format_summary

    with torch.device("meta"):
        model = NVAE(config.nvae_config())
    return (yaml.safe_dump(resolved, sort_keys=False) + "\nNVAE parameters per module:\n" + format_summary(model))


def train_nvae(config: Stage1Config, resolved: dict[str, Any], parent_run_id: str | None = None) -> Path:
    """Run (or resume) the stage-1 job; returns the run directory. `parent_run_id` nests it in a pipeline run."""
    run_dir = config.run_dir()
    info = vdist.init_distributed(config.run.dist_timeout_s)
    if info.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
    vdist.barrier()

    torch.manual_seed(config.run.seed)  # identical initial weights on every rank
    model = NVAE(config.nvae_config())
    if config.engine.sync_batchnorm and info.device.type == "cuda" and info.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    loop_cfg = config.loop
    global_batch = loop_cfg.batch_size * info.world_size
    total_steps = -(-loop_cfg.total_nimg // global_batch)
    engine, _, _ = build_engine(model, config.optim, config.engine, loop_cfg.batch_size, info.world_size,
                                total_steps)
    stage = NVAEStage(engine, config.objective, loop_cfg.total_nimg, loop_cfg, info.device, config.run.seed)

    checkpoints = CheckpointManager(run_dir, loop_cfg.keep_checkpoints, info.rank, info.world_size)
    state = LoopState()
    restored = checkpoints.load(engine)
    if restored is not None:
        client, rank_state = restored
        state = loop_state_from_dict(client["loop"])
        stage.load_state_dict(client.get("stage", {}))
        if "rng" in rank_state:
            vdist.set_rng_state(rank_state["rng"])
        if info.is_rank0:
            log.info("resuming from %s at nimg=%d", checkpoints.latest_tag(), state.cur_nimg)

    tracker = Tracker(config.tracking, run_dir, info.is_rank0)
    ids = load_run_ids(run_dir) if restored is not None and info.is_rank0 else {}
    tracker.start(pipeline=config.experiment, stage=STAGE, run_id=ids.get("stage"),
                  parent_run_id=ids.get("parent") or parent_run_id)
    if restored is None:
        tracker.log_params(resolved)

    def client_state() -> dict[str, Any]:
        # Run ids may become known only after a tracking outage ends: record them at checkpoint time.
        if info.is_rank0:
            save_run_ids(run_dir, *tracker.run_ids)
        return {}

    loader_cfg = dataclasses.replace(config.loader, batch_size=loop_cfg.batch_size,
                                     device="cuda" if info.device.type == "cuda" else "cpu")
    loader = build_loader(config.dataset, loader_cfg, rank=info.rank, world_size=info.world_size,
                          seed=config.run.seed, cur_nimg=state.cur_nimg)
    data = iter(loader)

    with stage_lifecycle(tracker, loader):
        state = run_loop(
            stage, data, loop_cfg, state, checkpoints, info, config.run.seed, run_dir,
            on_report=lambda m, n: tracker.log_metrics(m, step=n),
            on_samples=lambda paths, n: [tracker.log_artifact(p, "samples") for p in paths],
            client_state=client_state,
            rank_state=lambda: {"rng": vdist.rng_state(), "data": loader.state_dict()},
            stop_after_nimg=config.run.stop_after_nimg, extra_metrics=loader_metrics(loader, info.device))
        finished = state.cur_nimg >= loop_cfg.total_nimg
        if finished and info.is_rank0:
            module = engine.module
            state_dict = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                          for k, v in module.state_dict().items()}
            publish_model(tracker, run_dir, backbone_model_name(config.dataset.name), backbone_bundle(module),
                          state_dict)
        if finished:
            tracker.end("FINISHED")  # a time-sliced invocation leaves its runs open for the next one
    return run_dir
