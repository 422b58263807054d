"""The reproducible 2-D likelihood protocol of vaebm.md Sec. 5.4 (25-Gaussians), end to end on one process.

Data: equal-weight mixture of N(c, 0.1^2 I) over c in {-4,-2,0,2,4}^2; 50k training and 100k test points drawn
with a fixed seed. Models, trained on the one training job (core/training/job.py, a world of one process) from the
training split written as point shards: stage 1 is method `nvae` with the papers' MLP VAE (20-d latent, 4 FC layers
of 256; conf/experiment/nvae/ll2d.yaml) trained by the ELBO; stage 2 is method `vaebm` on it (conf/experiment/vaebm/
ll2d.yaml): an MLP energy (4 FC layers of 256) trained with the contrastive-divergence loss (vaebm.md Eq. 7) and
ClippedAdam (App. E) on negatives from VAEBM's negative phase with SIR chain starts (VAE draws resampled by exp(-E))
and eps-space Langevin on the exact target (Eq. 9). Stage 2 publishes the energy weights with the best
log-likelihood on a held-out validation split (10k draws independent of train and test; the job's model selection,
scored by `ValidationScorer`): EBM training has no converged end point, and the test points must not choose it. The
runs live under the cache directory keyed by data and settings, so a rerun reuses or resumes them.

Likelihoods (nats, averaged over the test points):
- `true`: the analytic mixture density. With sigma = 0.1 the expected value is -H(p) = -1.4516 nats; the paper's
  -1.10 is not consistent with sigma = 0.1 (it would need sigma ~ 0.07), we keep the issue's sigma = 0.1.
- `vae`: log p_vae(x). The paper uses IWAE with 10,000 posterior samples per test point; on 100k points that is 1e9
  decoder passes (~3e14 FLOP, hours on 2 cores). Every test point is therefore scored with the *marginal mixture*
  estimator p_vae(x) ~= (1/M) sum_m N(x; mu(z_m), sigma(z_m)^2), z_m ~ p(z), whose M decoder passes are shared by all
  points (a consistent, unbiased estimator of p_vae(x) itself); IWAE with `iwae_samples` (10,000) is run on the first
  `iwae_points` test points as a cross-check and both are reported.
- `vaebm`: log h(x) = log p_vae(x) - E(x) - log Z (vaebm.md Eq. 5, `vaebm_log_density`) with
  log Z = log int p_vae(x) exp(-E(x)) dx by the midpoint rule on a grid (density2d.log_partition_on), cross-checked
  by the Monte Carlo estimate log E_{x~p_vae}[exp(-E(x))] (density2d.mc_log_partition).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.evaluation.density2d import (Grid2D, vaebm_log_density, grid_points, gaussians25_expected_log_likelihood,
                                       gaussians25_log_density, log_partition_on, mc_log_partition, sample_gaussians25)
from core.evaluation.iwae import iwae_log_likelihood
from core.evaluation.ll2d_grbm_vae import GRBMVAERowConfig, ll2d_row as grbm_vae_row
from core.evaluation.ll2d_latent_ebm import LatentEBMRowConfig, ll2d_row as latent_ebm_row
from core.evaluation.ll2d_ncp_vae import NCPVAERowConfig, ll2d_row as ncp_vae_row
from core.evaluation.ll2d_seam import LL2DContext, LL2DRow
from core.models.energy import EnergyNet
from core.models.mlp_vae import MLPVAE
from core.tracking import TrackingConfig

TRUE_GAUSSIANS25_LL = gaussians25_expected_log_likelihood()  # -1.4516 nats (sigma = 0.1)
GAUSSIANS25_NAMES = ("gaussians25", "25gaussians", "toy2d")  # dataset names of the analytic 25-Gaussians split

# Further rows: name -> ll2d_row(ctx, config) of core/evaluation/ll2d_<name>.py; Toy2DProtocol has a field of that
# name holding the row's typed settings.
LL2D_ROWS: dict[str, Callable[[LL2DContext, Any], LL2DRow]] = {
    "ncp_vae": ncp_vae_row, "latent_ebm": latent_ebm_row, "grbm_vae": grbm_vae_row}


@dataclass
class Toy2DProtocol:
    seed: int = 0  # data split, both stages' run.seed (initialization, data order, Langevin noise) and the estimators
    train_points: int = 50_000  # training points (vaebm.md Sec. 5.4 / ncpvae App. J: 50k)
    test_points: int = 100_000  # test points (vaebm.md Sec. 5.4: 100k)
    # The two stages run on the training job (core/training/job.py) with the methods' presets; every training
    # hyperparameter lives there: conf/experiment/nvae/<vae_experiment>.yaml (the MLP VAE, ELBO) and
    # conf/experiment/vaebm/<vaebm_experiment>.yaml (the energy: CD loss, SIR chain starts, eps-space Langevin).
    vae_experiment: str = "ll2d"  # stage-1 preset of method nvae
    vaebm_experiment: str = "ll2d"  # stage-2 preset of method vaebm
    vae_overrides: list[str] = field(default_factory=list)  # extra key=value overrides of stage 1 (loop.total_nimg=...)
    vaebm_overrides: list[str] = field(default_factory=list)  # extra key=value overrides of stage 2
    # model selection: the energy weights with the best held-out validation log-likelihood are published (never test)
    val_points: int = 10_000  # validation draws, independent of train and test (gaussians25: stream 3*seed+2)
    select_every_nimg: int = 12_800  # training points (images) between validation scores (50 steps of 256)
    val_marginal_samples: int = 30_000  # M of the marginal-mixture log p_vae used for validation
    val_grid_n: int = 150  # grid cells per axis of the validation log Z (over the same box as the test grid)
    # evaluation
    marginal_samples: int = 100_000  # M prior samples of the shared marginal-mixture estimator of p_vae(x)
    iwae_samples: int = 10_000  # K of the IWAE cross-check (vaebm.md Sec. 5.4: 10,000)
    iwae_points: int = 100  # test points scored by IWAE as the cross-check
    grid_n: int = 300  # grid cells per axis for log Z (12/300 = 0.04 = 0.4 of the data std)
    grid_half_width: float = 6.0  # grid covers [-w, w]^2
    mc_samples: int = 200_000  # VAE samples of the Monte Carlo cross-check of log Z
    # further rows (core/evaluation/ll2d_<name>.py), scored on the same splits and, for methods that refine the VAE,
    # on the same frozen VAE; each has its settings in the field of its name
    rows: list[str] = field(default_factory=list)
    ncp_vae: NCPVAERowConfig = field(default_factory=NCPVAERowConfig)  # row `ncp_vae` (ll2d_ncp_vae.py)
    latent_ebm: LatentEBMRowConfig = field(default_factory=LatentEBMRowConfig)  # row `latent_ebm` (ll2d_latent_ebm.py)
    grbm_vae: GRBMVAERowConfig = field(default_factory=GRBMVAERowConfig)  # row `grbm_vae` (ll2d_grbm_vae.py)

    def validate(self) -> None:
        for name in ("train_points", "test_points", "val_points", "select_every_nimg", "val_marginal_samples",
                     "val_grid_n", "marginal_samples", "iwae_samples", "iwae_points", "grid_n", "mc_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ll2d protocol: {name} must be > 0, got {getattr(self, name)}")
        if self.seed < 0 or self.grid_half_width <= 0:
            raise ValueError("ll2d protocol: seed must be >= 0 and grid_half_width > 0")
        if self.iwae_points > self.test_points:
            raise ValueError("ll2d protocol: iwae_points must be <= test_points")
        unknown = [r for r in self.rows if r not in LL2D_ROWS]
        if unknown:
            raise ValueError(f"ll2d protocol: unknown rows {unknown}; choose from {sorted(LL2D_ROWS)}")
        # the protocol decides where the stages run, read and report
        owned = [o for o in (*self.vae_overrides, *self.vaebm_overrides)
                 if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] in ("run", "tracking", "backbone")
                 or o.lstrip("+~").startswith(("dataset.path", "backbone_"))]
        if owned:
            raise ValueError(f"ll2d protocol: {owned} set what the protocol decides (run directories, seed, tracking, "
                             "data path, backbone); use ll2d.seed and the evaluation's tracking instead")


# ------------------------------------------------------------------------------------------------------------- data
def gaussians25_split(protocol: Toy2DProtocol) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, validation, test) float32 draws from independent streams seeded by 3*seed + 0, + 2 and + 1."""
    train = sample_gaussians25(protocol.train_points, torch.Generator().manual_seed(protocol.seed * 3 + 0))
    test = sample_gaussians25(protocol.test_points, torch.Generator().manual_seed(protocol.seed * 3 + 1))
    val = sample_gaussians25(protocol.val_points, torch.Generator().manual_seed(protocol.seed * 3 + 2))
    return train.float(), val.float(), test.float()


def load_points(path: str | Path) -> torch.Tensor:
    """(N, 2) points from an .npy file (any float dtype)."""
    a = np.load(path)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{path}: expected an (N, 2) array of 2-D points, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: points must be finite")
    return torch.from_numpy(a.astype(np.float32))


def digest_points(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------- training
@dataclass
class Stages:
    """The protocol's two training jobs: typed configs, their resolved dicts and the run directories."""

    data_dir: Path  # the training split as point shards (the jobs' dataset.path)
    vae: tuple[Any, dict[str, Any]]  # stage 1 (method nvae): (JobConfig, resolved)
    vaebm: tuple[Any, dict[str, Any]]  # stage 2 (method vaebm): (JobConfig, resolved)
    vae_key: str  # hash of the data and stage 1's training settings (rows cache networks under it)
    key: str  # hash of the data, both stages' training settings and the model selection settings


def _settings_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _training_settings(resolved: dict[str, Any]) -> dict[str, Any]:
    """What a stage's model depends on: the resolved config without where it runs, reports and finds its data (the
    data's digest is keyed separately)."""
    out = {k: v for k, v in resolved.items() if k not in ("run", "tracking", "dry_run", "backbone")}
    out["dataset"] = {k: v for k, v in resolved["dataset"].items() if k != "path"}
    return out | {"seed": resolved["run"]["seed"]}


def plan_stages(protocol: Toy2DProtocol, train: torch.Tensor, val: torch.Tensor, work_root: Path,
                dataset_name: str) -> Stages:
    """Compose both jobs (validated: a bad override fails here, before anything trains) and name their directories:
    <work_root>/ll2d-<vae key>/{data,vae} and <work_root>/ll2d-<key>/vaebm. A rerun with the same data and settings
    finds the finished runs (the job then does nothing) or resumes an interrupted one from its checkpoint."""
    from core.training.config import compose_job

    digest = digest_points(torch.cat([train, val]))
    common = [f"dataset.name={dataset_name}", f"dataset.path={work_root}", f"run.seed={protocol.seed}",
              "loop.progress_bar=false"]  # dataset.path and run.dir are set below, once the key is known
    vae, vae_resolved, _ = compose_job(["method=nvae", f"experiment={protocol.vae_experiment}", *common,
                                        *protocol.vae_overrides])
    vae_key = _settings_key(digest, _training_settings(vae_resolved))
    vaebm, vaebm_resolved, _ = compose_job(["method=vaebm", f"experiment={protocol.vaebm_experiment}", *common,
                                            *protocol.vaebm_overrides])
    select = {k: getattr(protocol, k) for k in ("select_every_nimg", "val_marginal_samples", "val_grid_n",
                                                 "grid_half_width", "val_points")}
    key = _settings_key(vae_key, _training_settings(vaebm_resolved), select)
    # the data and the VAE depend on stage 1's settings only: energies of other settings share them
    data, vae_dir, vaebm_dir = work_root / f"ll2d-{vae_key}" / "data", work_root / f"ll2d-{vae_key}" / "vae", \
        work_root / f"ll2d-{key}" / "vaebm"
    for config, resolved, run_dir in ((vae, vae_resolved, vae_dir), (vaebm, vaebm_resolved, vaebm_dir)):
        config.dataset.path, config.run.dir = str(data), str(run_dir)
        resolved["dataset"]["path"], resolved["run"]["dir"] = config.dataset.path, config.run.dir
    vaebm.backbone, vaebm.backbone_train_if_missing = str(vae_dir), False
    vaebm_resolved["backbone"], vaebm_resolved["backbone_train_if_missing"] = vaebm.backbone, False
    return Stages(data, (vae, vae_resolved), (vaebm, vaebm_resolved), vae_key, key)


def write_training_split(train: torch.Tensor, out: Path, name: str) -> None:
    """The training points as WebDataset point shards (data_pipelines' writer): the jobs read them like any data."""
    from data_pipelines.config import PrepareConfig
    from data_pipelines.shard_writer import build_dataset

    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.parent / "train.npy"
    tmp = out.parent / "train.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, train.numpy().astype(np.float32))
    tmp.replace(source)
    build_dataset(PrepareConfig(source=str(source), out=str(out), name=name), progress=False)


def _run_stage(stage: tuple[Any, dict[str, Any]], tracking, parent_run_id: str | None = None,
               selection: Any = None) -> Path:
    from core.training.job import train as train_job

    config, resolved = stage
    config.tracking = tracking or TrackingConfig(enabled=False)  # untracked unless asked
    resolved["tracking"] = dataclasses.asdict(config.tracking)
    config.validate()
    run_dir = train_job(config, resolved, parent_run_id=parent_run_id, selection=selection)
    if not (run_dir / "model" / "MLmodel").is_file():  # a time slice (run.stop_after_nimg) ended before the end
        raise RuntimeError(f"the {config.method} stage in {run_dir} stopped before the end of training; run the same "
                           "command again to resume it")
    return run_dir


def _model(run_dir: Path):
    """The model a stage published (built on the CPU, frozen)."""
    from core.evaluation.sampling import load_trained_model

    return load_trained_model(str(run_dir), torch.device("cpu"), None)


def train_vae(stages: Stages, train: torch.Tensor, dataset_name: str, tracking=None) -> MLPVAE:
    """Stage 1 on the training job: method nvae with the MLP VAE (vaebm.md Eq. 3) on the training split."""
    write_training_split(train, stages.data_dir, dataset_name)
    run_dir = _run_stage(stages.vae, tracking)
    return _model(run_dir).vae.eval().requires_grad_(False)


def train_vaebm(stages: Stages, vae: MLPVAE, val: torch.Tensor, protocol: Toy2DProtocol,
                tracking=None) -> tuple[EnergyNet, dict[str, Any]]:
    """Stage 2 on the training job: method vaebm on the frozen stage-1 VAE, nested under stage 1's pipeline run,
    publishing the energy weights with the best validation log-likelihood (core.training.selection with
    `ValidationScorer`). Returns the energy and the selection summary."""
    from core.training.checkpoint import load_run_ids
    from core.training.job import SELECTION_FILE
    from core.training.selection import ModelSelection

    scorer = ValidationScorer(vae, val, protocol)
    selection = ModelSelection(scorer.score, protocol.select_every_nimg)
    parent = load_run_ids(Path(stages.vae[0].run.dir)).get("parent")
    run_dir = _run_stage(stages.vaebm, tracking, parent_run_id=parent, selection=selection)
    summary = json.loads((run_dir / SELECTION_FILE).read_text())
    out = {"val_best_log_likelihood": summary["best_score"], "val_best_nimg": summary["best_nimg"],
           "val_vae_log_likelihood": float(scorer.lp_val.mean()), "val_history": summary["history"]}
    return _model(run_dir).energy_net.eval().requires_grad_(False), out


class ValidationScorer:
    """Average validation log-likelihood of the VAEBM, log h = log p_vae - E - log Z (vaebm.md Eq. 5), cheap enough to
    run every few steps: the VAE is frozen, so log p_vae on the validation points and on the log-Z grid is computed
    once (marginal mixture of `val_marginal_samples` components, `val_grid_n`^2 midpoint grid) and each score costs
    only energy evaluations. Stage 2's model selection (core.training.selection) calls `score` at its interval."""

    def __init__(self, vae: MLPVAE, val: torch.Tensor, protocol: Toy2DProtocol):
        gen = torch.Generator().manual_seed(protocol.seed + 505)
        mu, sigma = decoder_components(vae, protocol.val_marginal_samples, gen)
        self.val = val.float()
        self.lp_val = mixture_log_density(self.val, mu, sigma)
        if not torch.isfinite(self.lp_val).all():
            raise RuntimeError("validation: the marginal-mixture log p_vae is -inf at some validation points: raise "
                               "val_marginal_samples")
        w = protocol.grid_half_width
        grid = Grid2D(bounds=((-w, w), (-w, w)), n=protocol.val_grid_n)
        pts, self.log_cell = grid_points(grid)
        self.grid = pts.float()
        self.lp_grid = mixture_log_density(self.grid, mu, sigma)
        self.exact_mean_energy = math.nan  # E_h[E] on the grid at the last score (a sampler diagnostic)

    @torch.no_grad()
    def score(self, energy: EnergyNet) -> float:
        """Mean validation log h of `energy` wherever it lives (the job trains on a GPU when there is one, possibly
        in bf16): points go to its device and dtype, energies come back as float64 on the CPU."""
        was_training = energy.training
        energy.eval()
        p = next(energy.parameters(), self.grid)  # (an energy without parameters reads the CPU float32 points)
        e_grid = energy(self.grid.to(p.device, p.dtype)).double().reshape(-1).cpu()
        e_val = energy(self.val.to(p.device, p.dtype)).double().reshape(-1).cpu()
        energy.train(was_training)
        log_w = vaebm_log_density(self.lp_grid, e_grid)  # unnormalized log h on the grid (Eq. 4)
        log_z = float(torch.logsumexp(log_w, dim=0)) + self.log_cell
        # E_h[E] by the same quadrature: what the Langevin negatives' mean energy would be if they followed h
        self.exact_mean_energy = float((torch.softmax(log_w, dim=0) * e_grid).sum())
        return vaebm_log_density(self.lp_val, e_val, log_z, average=True)  # mean log h over validation (Eq. 5)


# ------------------------------------------------------------------------------------------------------- estimators
@torch.no_grad()
def decoder_components(vae: MLPVAE, num_samples: int, generator: torch.Generator,
                       chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of p(x|z_m) for z_m ~ p(z), m < num_samples: the mixture whose mean is p_vae(x)."""
    mus, sigmas = [], []
    for i in range(0, num_samples, chunk):
        k = min(chunk, num_samples - i)
        _, eps_z = vae.sample_noise(k, generator=generator)
        d = vae.T_z(eps_z).x_dist
        mus.append(d.mu.float())
        sigmas.append(d.sigma.float())
    return torch.cat(mus), torch.cat(sigmas)


@torch.no_grad()
def mixture_log_density(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tile: float = 0.5,
                        cutoff: float = 9.0, chunk_elems: int = 1 << 22,
                        log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """log (1/M) sum_m w_m N(x; mu_m, diag sigma_m^2), float64 result, for (N, 2) points; w_m = exp(log_weights[m])
    (all 1 when None; components with w_m = 0 may be given log_weights = -inf).

    Spatial pruning: points are grouped into square tiles of side `tile`; a tile only sees the components whose mean
    lies within `cutoff` of their own sigma of the tile (per axis). A dropped component contributes less than
    exp(-cutoff^2 / 2) = 2.6e-18 of its peak, far below float32 resolution of the sum. A point that no component
    reaches gets -inf (the caller decides whether that is acceptable).
    """
    x = x.float()
    m = mu.shape[0]
    log_norm = -(torch.log(sigma).sum(dim=1)) - math.log(2 * math.pi)  # (M,)
    if log_weights is not None:
        if log_weights.shape != (m,):
            raise ValueError(f"log_weights must have shape ({m},), got {tuple(log_weights.shape)}")
        log_norm = log_norm + log_weights.to(log_norm.dtype)
    inv = 1.0 / sigma
    tiles = torch.floor(x / tile).to(torch.int64)
    keys = tiles[:, 0] * 100_003 + tiles[:, 1]
    order = torch.argsort(keys)
    keys_sorted = keys[order]
    uniq, counts = torch.unique_consecutive(keys_sorted, return_counts=True)
    out = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
    start = 0
    for c in counts.tolist():
        idx = order[start:start + c]
        start += c
        pts = x[idx]
        lo, hi = pts.min(dim=0).values, pts.max(dim=0).values
        reach = cutoff * sigma
        near = ((mu > lo - reach) & (mu < hi + reach)).all(dim=1)
        if not near.any():
            continue
        mu0, mu1 = mu[near, 0].contiguous(), mu[near, 1].contiguous()
        i0, i1 = inv[near, 0].contiguous(), inv[near, 1].contiguous()
        ln_n = log_norm[near].contiguous()
        rows = max(1, chunk_elems // max(1, mu0.shape[0]))
        for i in range(0, len(idx), rows):
            p = pts[i:i + rows]
            # per-axis (rows, K) planes with in-place ops: ~2x faster than an (rows, K, 2) tensor reduced over axis 2
            lc = torch.sub(p[:, 0:1], mu0).mul_(i0).square_()
            lc.add_(torch.sub(p[:, 1:2], mu1).mul_(i1).square_()).mul_(-0.5).add_(ln_n)
            out[idx[i:i + rows]] = torch.logsumexp(lc, dim=1).double()
    return out - math.log(m)


@torch.no_grad()
def vae_sample(vae: MLPVAE, n: int, generator: torch.Generator) -> torch.Tensor:
    eps_x, eps_z = vae.sample_noise(n, generator=generator)
    return vae.generate(eps_z, eps_x)[0]


@dataclass
class LL2DResult:
    rows: dict[str, float]  # average test log-likelihood (nats) per model: true (if analytic), vae, vaebm
    gap_closed: float | None  # (vaebm - vae) / (true - vae), None without an analytic density
    log_z_grid: float  # log Z of the VAEBM by the grid
    log_z_mc: float  # its Monte Carlo estimate
    log_z_mc_stderr: float  # standard error of the MC estimate
    iwae_check: dict[str, float]  # IWAE vs marginal-mixture log p_vae on the first iwae_points test points
    true_std_error: float | None  # standard error of the `true` row's mean
    num_test: int
    timings_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    gaps: dict[str, float] = field(default_factory=dict)  # gap_closed of each further row (protocol.rows)
    row_details: dict[str, LL2DRow] = field(default_factory=dict)  # their log Z estimates and diagnostics

    def metrics(self) -> dict[str, float]:
        out = {f"ll2d/{k}": v for k, v in self.rows.items()}
        out.update({"ll2d/log_z_grid": self.log_z_grid, "ll2d/log_z_mc": self.log_z_mc,
                    "ll2d/log_z_mc_stderr": self.log_z_mc_stderr})
        out.update({f"ll2d/iwae_check/{k}": v for k, v in self.iwae_check.items()})
        out.update({f"ll2d/{k}": float(v) for k, v in self.extra.items() if isinstance(v, (int, float))})
        if self.gap_closed is not None:
            out["ll2d/gap_closed"] = self.gap_closed
        for name, row in self.row_details.items():
            out[f"ll2d/{name}/log_z"] = row.log_z
            out[f"ll2d/{name}/log_z_stderr"] = row.log_z_stderr
            if row.log_z_check is not None:
                out[f"ll2d/{name}/log_z_check"] = row.log_z_check
            out.update({f"ll2d/{name}/{k}": float(v) for k, v in row.extra.items()})
        out.update({f"ll2d/gap_closed/{k}": v for k, v in self.gaps.items()})
        return out


def evaluate_ll2d(vae: MLPVAE, energy: EnergyNet, test: torch.Tensor, protocol: Toy2DProtocol,
                  analytic: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LL2DResult:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(protocol.seed + 303)
    mu, sigma = decoder_components(vae, protocol.marginal_samples, gen)
    timings["decoder_components"] = time.perf_counter() - t

    def log_p_vae(x: torch.Tensor) -> torch.Tensor:
        return mixture_log_density(x, mu, sigma)

    def energy_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return energy(x.float()).double()

    t = time.perf_counter()
    lp_test = log_p_vae(test)
    if not torch.isfinite(lp_test).all():
        raise RuntimeError("the marginal-mixture estimate of log p_vae is -inf at some test points: raise "
                           "marginal_samples")
    timings["vae_test"] = time.perf_counter() - t

    t = time.perf_counter()
    sub = test[: protocol.iwae_points]
    torch.manual_seed(protocol.seed + 404)
    lp_iwae = torch.cat([iwae_log_likelihood(vae, sub[i:i + 50], num_samples=protocol.iwae_samples,
                                             chunk_size=max(1, min(protocol.iwae_samples, 2000)))
                         for i in range(0, len(sub), 50)])
    timings["iwae_check"] = time.perf_counter() - t

    t = time.perf_counter()
    w = protocol.grid_half_width
    grid = Grid2D(bounds=((-w, w), (-w, w)), n=protocol.grid_n, chunk_size=1 << 20, input_dtype=torch.float32)
    # log p_vae(x) - E(x) on the grid; -inf where no decoder component reaches (exp(-inf) = 0 in the integral).
    # The same grid integral of p_vae alone is reported as a coverage check: log of the VAE mass inside the box
    # (0 when the box holds all of p_vae; the VAEBM is sharper than the VAE, so the box then holds its mass too,
    # which the Monte Carlo log Z below, taken over the whole plane, cross-checks).
    grid_lp: list[torch.Tensor] = []

    def grid_fn(x: torch.Tensor) -> torch.Tensor:
        lp = log_p_vae(x)
        grid_lp.append(lp)
        return vaebm_log_density(lp, energy_fn(x).reshape(-1))  # unnormalized log h (Eq. 4)

    log_z = log_partition_on(grid, grid_fn)
    cell = (2 * w / protocol.grid_n) ** 2
    vae_grid_mass = float(torch.logsumexp(torch.cat(grid_lp), dim=0)) + math.log(cell)
    timings["log_z_grid"] = time.perf_counter() - t

    t = time.perf_counter()
    mc = mc_log_partition(lambda x: -energy_fn(x), lambda n: vae_sample(vae, n, gen), protocol.mc_samples)
    timings["log_z_mc"] = time.perf_counter() - t

    lh_test = vaebm_log_density(lp_test, energy_fn(test).reshape(-1), log_z)  # vaebm.md Eq. 5
    rows: dict[str, float] = {}
    true_se = None
    if analytic is not None:
        lt = analytic(test.double())
        rows["true"] = float(lt.mean())
        true_se = float(lt.std() / math.sqrt(len(lt)))
    rows["vae"] = float(lp_test.mean())
    rows["vaebm"] = float(lh_test.mean())
    gap = None
    if "true" in rows:
        gap = (rows["vaebm"] - rows["vae"]) / (rows["true"] - rows["vae"])
    check = {"points": float(len(sub)), "iwae": float(lp_iwae.mean()), "marginal": float(lp_test[:len(sub)].mean()),
             "mean_abs_diff": float((lp_iwae - lp_test[:len(sub)]).abs().mean())}
    return LL2DResult(rows=rows, gap_closed=gap, log_z_grid=log_z, log_z_mc=mc.log_z, log_z_mc_stderr=mc.std_error,
                      iwae_check=check, true_std_error=true_se, num_test=len(test), timings_s=timings,
                      extra={"log_vae_mass_on_grid": vae_grid_mass})


# ----------------------------------------------------------------------------------------------------------- driver
def split_dataset(protocol: Toy2DProtocol, dataset: str = "gaussians25",
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(train, val, test, analytic log density or None) of `dataset` (see `run_ll2d`)."""
    if dataset in GAUSSIANS25_NAMES:
        train, val, test = gaussians25_split(protocol)
        return train, val, test, gaussians25_log_density
    pts = load_points(dataset)
    perm = torch.randperm(len(pts), generator=torch.Generator().manual_seed(protocol.seed))
    pts = pts[perm]
    n_test = min(protocol.test_points, len(pts) // 3)
    n_val = min(protocol.val_points, (len(pts) - n_test) // 5)
    test, val = pts[:n_test], pts[n_test:n_test + n_val]
    train = pts[n_test + n_val:][: protocol.train_points]
    return train, val, test, None


def make_context(vae: MLPVAE, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor, protocol: Toy2DProtocol,
                 cache_dir: str | Path | None = None, vae_key: str = "") -> LL2DContext:
    """The `LL2DContext` rows are scored in: M = marginal_samples shared decoder components of `vae` (their own
    stream, seed + 606), the marginal-mixture log p_vae of the test points and the protocol's grid."""
    gen = torch.Generator().manual_seed(protocol.seed + 606)
    eps, zs, mus, sigmas = [], [], [], []
    with torch.no_grad():
        for i in range(0, protocol.marginal_samples, 65536):
            k = min(65536, protocol.marginal_samples - i)
            _, eps_z = vae.sample_noise(k, generator=gen)
            tower = vae.T_z(eps_z)
            eps.append(eps_z)
            zs.append(tower.z)
            mus.append(tower.x_dist.mu.float())
            sigmas.append(tower.x_dist.sigma.float())
    eps_z = [torch.cat([e[g] for e in eps]) for g in range(len(eps[0]))]
    z = [torch.cat([t[g] for t in zs]).float() for g in range(len(zs[0]))]
    mu, sigma = torch.cat(mus), torch.cat(sigmas)
    w = protocol.grid_half_width
    grid = Grid2D(bounds=((-w, w), (-w, w)), n=protocol.grid_n, chunk_size=1 << 20, input_dtype=torch.float32)
    return LL2DContext(vae=vae, train=train, val=val, test=test, protocol=protocol, seed=protocol.seed, eps_z=eps_z,
                       z=z, mu=mu, sigma=sigma, log_p_vae_test=mixture_log_density(test, mu, sigma),
                       mixture_fn=mixture_log_density, grid_fn=lambda fn: log_partition_on(grid, fn),
                       cache_dir=Path(cache_dir).expanduser() if cache_dir else None, training_key=vae_key)


def _dataset_name(dataset: str) -> str:
    """The jobs' dataset label (registered models: nvae-ll2d-<name>, vaebm-ll2d-<name>)."""
    if dataset in GAUSSIANS25_NAMES:
        return "ll2d-gaussians25"
    return "ll2d-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(dataset).stem)


def _work_root(cache_dir: str | Path | None) -> tuple[Path, bool]:
    """(directory of the runs, whether it is temporary)."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve(), False
    return Path(tempfile.mkdtemp(prefix="vaebm-ll2d-")), True


def build_context(protocol: Toy2DProtocol, dataset: str = "gaussians25", cache_dir: str | Path | None = None,
                  tracking=None) -> LL2DContext:
    """Split `dataset`, train the protocol's VAE on the job (or find it finished under `cache_dir`) and build the
    rows' context."""
    protocol.validate()
    train, val, test, _ = split_dataset(protocol, dataset)
    root, temporary = _work_root(cache_dir)
    try:
        stages = plan_stages(protocol, train, val, root, _dataset_name(dataset))
        vae = train_vae(stages, train, _dataset_name(dataset), tracking or TrackingConfig(enabled=False))
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    return make_context(vae, train, val, test, protocol, cache_dir, stages.vae_key)


def run_ll2d(protocol: Toy2DProtocol, dataset: str = "gaussians25", cache_dir: str | Path | None = None,
             tracking=None) -> tuple[LL2DResult, dict[str, Any]]:
    """Train the VAE and the VAEBM on the training job (both stages; finished runs under `cache_dir` are reused)
    and evaluate them. `dataset` is `gaussians25` (analytic `true` row) or an .npy file of (N, 2) points (after a
    seeded shuffle: the first third is test, then up to `val_points` (at most a fifth of the rest) validation, the
    rest training; no `true` row). `tracking`: where the two stages report (default: not tracked); they are one
    MLflow pipeline run `ll2d` with the stages `nvae` and `vaebm`. Runs on one process (the jobs form a world of
    one). Returns the result and a description of what was trained/reused."""
    protocol.validate()
    tracking = tracking or TrackingConfig(enabled=False)
    train, val, test, analytic = split_dataset(protocol, dataset)
    name = _dataset_name(dataset)
    root, temporary = _work_root(cache_dir)
    try:
        stages = plan_stages(protocol, train, val, root, name)
        info: dict[str, Any] = {"training_key": stages.key, "train_points": len(train), "val_points": len(val),
                                "test_points": len(test),
                                "runs": None if temporary else str(Path(stages.vaebm[0].run.dir).parent)}
        t0 = time.perf_counter()
        vae = train_vae(stages, train, name, tracking)
        info["vae_train_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        energy, selection = train_vaebm(stages, vae, val, protocol, tracking)
        info["ebm_train_s"] = time.perf_counter() - t1
        info.update(selection)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    result = evaluate_ll2d(vae, energy, test, protocol, analytic)
    result.timings_s.update({k: v for k, v in info.items() if k.endswith("_s")})
    result.extra.update({k: info[k] for k in ("val_best_nimg", "val_best_log_likelihood", "val_vae_log_likelihood")})
    if protocol.rows:
        ctx = make_context(vae, train, val, test, protocol, None if temporary else cache_dir, stages.vae_key)
        for row_name in protocol.rows:
            t1 = time.perf_counter()
            row = LL2D_ROWS[row_name](ctx, getattr(protocol, row_name))
            result.timings_s[f"row_{row_name}"] = time.perf_counter() - t1
            result.rows[row_name] = float(row.log_likelihood.mean())
            result.row_details[row_name] = row
            if "true" in result.rows:
                result.gaps[row_name] = ((result.rows[row_name] - result.rows["vae"])
                                         / (result.rows["true"] - result.rows["vae"]))
    return result, info


def format_ll2d_table(result: LL2DResult) -> str:
    """Markdown table of the rows plus the checks; the last line is `gap_closed=<fraction>`."""
    lines = ["| model | test log-likelihood (nats) |", "|---|---|"]
    for name, v in result.rows.items():
        lines.append(f"| {name} | {v:.4f} |")
    lines.append("")
    lines.append(f"log Z (grid) = {result.log_z_grid:.5f}; log Z (Monte Carlo) = {result.log_z_mc:.5f} "
                 f"+- {result.log_z_mc_stderr:.5f}")
    if "log_vae_mass_on_grid" in result.extra:
        lines.append(f"grid coverage: log of the VAE's mass on the grid = {result.extra['log_vae_mass_on_grid']:.5f}")
    if "val_best_nimg" in result.extra:
        e = result.extra
        lines.append(f"energy checkpoint: nimg {e['val_best_nimg']} (best validation log-likelihood "
                     f"{e['val_best_log_likelihood']:.4f}; VAE {e['val_vae_log_likelihood']:.4f})")
    c = result.iwae_check
    lines.append(f"IWAE check on {int(c['points'])} test points: iwae = {c['iwae']:.4f}, marginal = "
                 f"{c['marginal']:.4f}, mean |diff| = {c['mean_abs_diff']:.4f}")
    for name, row in result.row_details.items():
        check = "" if row.log_z_check is None else f"; second estimate {row.log_z_check:.5f}"
        lines.append(f"{name}: log Z = {row.log_z:.5f} +- {row.log_z_stderr:.5f}{check}")
    for name, gap in result.gaps.items():
        lines.append(f"gap_closed[{name}]={gap:.4f}")
    if "true" in result.rows:
        lines.append(f"true = analytic sigma=0.1 mixture (expected {TRUE_GAUSSIANS25_LL:.4f}; the paper's -1.10 is "
                     "inconsistent with sigma=0.1)")
        lines.append(f"gap_closed={result.gap_closed:.4f}")
    return "\n".join(lines)
