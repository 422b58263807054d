"""The evaluation job behind `launchers/evaluate.py`: FID, 2-D exact likelihoods, IWAE NLL and OOD AUROC.

    python launchers/evaluate.py metric=fid  model=models:/vaebm-digits@latest dataset=digits [fid_samples=50000]
    python launchers/evaluate.py metric=ll2d dataset=gaussians25            # or dataset=<points.npy>
    python launchers/evaluate.py metric=iwae model=<nvae or vaebm ref> dataset=<name or shard dir> eval_samples=1000
    python launchers/evaluate.py metric=ood  model=<vaebm ref> dataset=<in-distribution test shards>

Results go to `<out>/evaluate_<metric>.json` and `.md`, are printed as a markdown table and logged to MLflow as an
`evaluate` stage run: nested under the evaluated model's pipeline run (the registered version's run -> its
`mlflow.parentRunId`), or a standalone `evaluate` run when the model has no MLflow run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.evaluation.fid import InceptionConfig
from core.evaluation.grbm_likelihood import GRBMLikelihoodConfig
from core.evaluation.toy2d import Toy2DProtocol
from core.tracking import TrackingConfig
from core.training.config import CONF_DIR, ConfigError
from data_pipelines.config import DatasetConfig

log = logging.getLogger("vaebm.evaluate")

METRICS = ("fid", "ll2d", "iwae", "ood", "digits", "recon", "grbm_ll")
OOD_SETS = ("photos256", "faces25", "noise", "inverted", "interpolation")
FID_PRESETS = {"paper": 50_000, "paper_celebahq256": 30_000}  # vaebm.md Sec. 5.1 / App. E sample counts


@dataclass
class EvaluateConfig:
    # fid | ll2d | iwae | ood | digits (method vs its baseline, digits classifier score) | recon (held-out
    # reconstruction MSE of eval_samples images, models with inference: posterior chains or an encoder) | grbm_ll
    # (a grbm_vae model's log-likelihood: AIS or exact log Z, importance-sampled Eqs. 2-4, the classifier estimate)
    metric: str = "fid"
    model: str | None = None  # MLflow model URI (models:/..., runs:/...), run directory or model directory
    # conf/dataset/<name>.yaml, a shard directory, or (ll2d) gaussians25 | <points.npy>. On the command line it is
    # `dataset=<...>`: launchers/evaluate.py renames it (Hydra reserves `dataset=` for the conf/dataset group).
    dataset_ref: str = "digits"
    data: dict[str, Any] = field(default_factory=dict)  # DatasetConfig overrides; command line: dataset.size=16
    out: str = "runs/evaluate"  # where the JSON/markdown results (and the ll2d model cache) are written
    batch_size: int = 64  # images per rank per forward pass (generation, Inception, IWAE)
    # fid samples are a function of (seed, batch_size, index) on any number of ranks (sample.py's blocks: with the
    # same seed and batch_size, and n = fid_samples, sample.py writes exactly the images scored); the estimators of
    # recon/iwae/ood draw from (seed, rank, batch)
    seed: int = 0
    eval_samples: int = 1000  # iwae/ood: in-distribution images evaluated (all ranks together); OOD sets the same
    # fid
    fid_samples: int = 1000  # generated images; the paper protocol is 50,000 (30,000 for CelebA-HQ-256): fid_preset
    fid_preset: str | None = None  # paper | paper_celebahq256: sets fid_samples to the paper's count
    fid_reference_samples: int | None = None  # reference images from the dataset; None: the whole dataset
    fid_cache_dir: str = "~/.cache/vaebm/fid"  # reference statistics cache, keyed by the dataset manifest hash
    nvae_use_mean: bool = True  # fid of a plain NVAE: images are decoder means (VAEBM follows its sampler config)
    steps: int | None = None  # VAEBM Langevin steps at test time; None: the model's test_steps
    step_size: float | None = None  # VAEBM Langevin step size; None: as trained
    inception: InceptionConfig = field(default_factory=InceptionConfig)  # offline FID weights (file or hub cache)
    # iwae / ood
    iwae_samples: int = 100  # metric=iwae: importance samples K per image
    iwae_chunk: int = 10  # importance samples per forward pass (memory)
    iwae_log_z_samples: int = 10_000  # metric=iwae, reweighted priors (ncp_vae, latent_ebm): prior draws of log Z
    ood_iwae_samples: int = 20  # metric=ood: K of the log p(x) estimate inside both scores
    ood_sets: list[str] = field(default_factory=lambda: list(OOD_SETS))  # subset of photos256 faces25 noise
    #                                                                      inverted interpolation
    # digits (eval_samples images per row, same starting noise for both rows; steps as above)
    digits_scorer_cache_dir: str | None = "~/.cache/vaebm/digits_scorer"  # the digits classifier's weights
    # grbm_ll (eval_samples test images on rank 0)
    grbm: GRBMLikelihoodConfig = field(default_factory=GRBMLikelihoodConfig)  # estimators and their sample counts
    grbm_train_dataset: str | None = None  # conf/dataset name or shard dir of the classifier's training images;
    #                                       None: the evaluated dataset
    # ll2d
    ll2d: Toy2DProtocol = field(default_factory=Toy2DProtocol)  # the 2-D protocol (core/evaluation/toy2d.py)
    ll2d_cache_dir: str | None = None  # trained 2-D models are reused from here; None: <out>/ll2d-cache
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow (models:/ URIs and result logging)
    progress: bool = True  # progress bars with the ETA on rank 0 (the loops of fid, recon, iwae and ood)
    dist_timeout_s: float = 600.0  # collective timeout under deepspeed/torchrun
    dry_run: bool = False  # print the resolved config and exit

    def validate(self) -> None:
        req = _require
        req(self.metric in METRICS, f"metric must be one of {'|'.join(METRICS)}, got {self.metric!r}")
        if self.metric in ("fid", "iwae", "ood", "digits", "recon", "grbm_ll"):
            req(bool(self.model), f"metric={self.metric} needs model=<MLflow model URI or run/model directory>")
        req(self.batch_size > 0 and self.eval_samples > 0 and self.fid_samples > 1,
            "batch_size and eval_samples must be > 0, fid_samples > 1")
        req(self.fid_preset is None or self.fid_preset in FID_PRESETS,
            f"fid_preset must be one of {sorted(FID_PRESETS)} or null")
        req(self.fid_reference_samples is None or self.fid_reference_samples > 1, "fid_reference_samples must be > 1")
        req(self.iwae_samples > 0 and self.iwae_chunk > 0 and self.ood_iwae_samples > 0,
            "iwae_samples, iwae_chunk and ood_iwae_samples must be > 0")
        req(self.iwae_log_z_samples >= 2, "iwae_log_z_samples must be >= 2")
        bad = [s for s in self.ood_sets if s not in OOD_SETS]
        req(not bad, f"unknown ood_sets {bad}; choose from {list(OOD_SETS)}")
        req(self.steps is None or self.steps >= 1, "steps must be >= 1")
        req(self.step_size is None or self.step_size > 0, "step_size must be > 0")
        try:
            self.ll2d.validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.metric == "ll2d":
            req(self.dataset_ref in ("gaussians25", "25gaussians", "toy2d") or self.dataset_ref.endswith(".npy"),
                f"metric=ll2d needs dataset=gaussians25 or an .npy file of (N, 2) points, got {self.dataset_ref!r}")
            if self.dataset_ref.endswith(".npy"):
                req(Path(self.dataset_ref).expanduser().is_file(), f"dataset file {self.dataset_ref} does not exist")
            # its two training stages run in this process, a world of one
            req(int(os.environ.get("WORLD_SIZE", "1")) == 1, "metric=ll2d runs on one process: start it with "
                "`python launchers/evaluate.py`, not with the deepspeed launcher")
        else:
            try:
                self.dataset_config()
            except (ValueError, TypeError) as err:
                raise ConfigError(f"dataset: {err}") from None

    def dataset_config(self) -> DatasetConfig:
        """conf/dataset/<name>.yaml or a shard directory, plus `data` overrides. The YAML is resolved as training
        resolves it (`${oc.env:VAEBM_DATA,data}` and other interpolations)."""
        from omegaconf import OmegaConf

        yaml_path = CONF_DIR / "dataset" / f"{self.dataset_ref}.yaml"
        if yaml_path.is_file():
            values = OmegaConf.to_container(OmegaConf.load(yaml_path), resolve=True) or {}
        elif Path(self.dataset_ref).expanduser().is_dir():
            values = {"name": Path(self.dataset_ref).name, "path": str(Path(self.dataset_ref).expanduser())}
        else:
            raise ValueError(f"{self.dataset_ref!r} is neither a conf/dataset name nor a shard directory")
        values.update(self.data)
        unknown = set(values) - {f.name for f in dataclasses.fields(DatasetConfig)}
        if unknown:
            raise ValueError(f"unknown DatasetConfig fields {sorted(unknown)}")
        cfg = DatasetConfig(**values)
        cfg.validate()
        return cfg

    def num_fid_samples(self) -> int:
        return FID_PRESETS[self.fid_preset] if self.fid_preset else self.fid_samples

    def out_dir(self) -> Path:
        return Path(self.out).expanduser().resolve()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def describe(config: EvaluateConfig, resolved: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(resolved, sort_keys=False)


# -------------------------------------------------------------------------------------------------------- models
def load_model(reference: str, device: torch.device, tracking_uri: str):
    """Any published model (core.methods.TrainedModel); metrics use what it can do (sample, vae, energy)."""
    from core.evaluation.sampling import load_trained_model

    return load_trained_model(reference, device, tracking_uri)


def model_runs(reference: str | None, tracking_uri: str) -> dict[str, str | None]:
    """{'run': the run that produced the model, 'parent': its pipeline run, 'pipeline': the pipeline name, 'method'
    and 'dataset': the run's `vaebm.method` and `vaebm.dataset` tags}.

    models:/<name>@<alias> | models:/<name>/<version|latest>: the registered version's run_id; runs:/<id>/...: id;
    a run or model directory: its run-id file (written by the training job). Unknown parts are None.
    """
    from core.training.checkpoint import RUN_IDS

    out: dict[str, str | None] = {"run": None, "parent": None, "pipeline": None, "method": None, "dataset": None}
    if not reference:
        return out
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if reference.startswith("models:/"):
            from mlflow.store.artifact.utils.models import get_model_name_and_version

            name, version = get_model_name_and_version(client, reference)  # MLflow's own resolution
            out["run"] = client.get_model_version(name, version).run_id
        elif reference.startswith("runs:/"):
            out["run"] = reference[len("runs:/"):].split("/", 1)[0]
        else:
            path = Path(reference).expanduser()
            for d in (path, path.parent):
                ids = d / RUN_IDS
                if ids.is_file():
                    data = json.loads(ids.read_text())
                    out["run"], out["parent"] = data.get("stage"), data.get("parent")
                    break
        if out["run"]:
            run = client.get_run(out["run"])
            out["parent"] = run.data.tags.get("mlflow.parentRunId") or out["parent"]
            out["pipeline"] = run.data.tags.get("vaebm.pipeline")
            out["method"] = run.data.tags.get("vaebm.method")
            out["dataset"] = run.data.tags.get("vaebm.dataset")
    except Exception as err:  # noqa: BLE001 -- telemetry only: a missing run costs the nesting, never the result
        log.warning("could not resolve the MLflow run of %s (%s); logging a standalone evaluate run", reference, err)
    return out


# -------------------------------------------------------------------------------------------------------- helpers
def _progress(iterable, config: EvaluateConfig, info, desc: str, total: int | None = None, unit: str = "batch"):
    """`iterable` with a progress bar and ETA on rank 0 (`config.progress`); unchanged elsewhere."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not (info.is_rank0 and config.progress))


def _gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor over ranks (rank order); identity without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


def _images(dataset: DatasetConfig, limit: int | None, batch_size: int, rank: int, world: int,
            device: torch.device) -> list[torch.Tensor]:
    """This rank's share of the first `limit` images of one pass in dataset order (shuffle=False), model space."""
    from data_pipelines import build_loader
    from data_pipelines.config import LoaderConfig

    loader = build_loader(dataset, LoaderConfig(backend="torch", batch_size=batch_size, num_workers=0,
                                                shuffle=False, drop_last=True, pin_memory=False),
                          rank=rank, world_size=world, seed=0)
    share = None if limit is None else -(-limit // world)
    out, n = [], 0
    try:
        for batch in loader.epoch(0):
            x = batch["x"].to(device).float()
            if share is not None:
                x = x[: share - n]
            out.append(x)
            n += x.shape[0]
            if share is not None and n >= share:
                break
    finally:
        loader.close()
    if not out:
        raise ValueError(f"dataset {dataset.name} gave no images (fewer than world_size * batch_size = "
                         f"{world * batch_size}?); lower batch_size")
    return out


def _x_shape(model) -> tuple[int, ...]:
    """(C, H, W) of what a model generates."""
    if model.vae is not None:
        return tuple(model.vae.x_shape())
    return tuple(model.sample(1, torch.Generator(device="cpu").manual_seed(0)).images.shape[1:])


def _require_vae(model, metric: str):
    if model.vae is None:
        raise ValueError(f"metric={metric} needs a model with a VAE inside (a {model.kind!r} model has none)")
    return model.vae


def _fit_dataset(dataset: DatasetConfig, x_shape: tuple[int, ...]) -> DatasetConfig:
    """Present the data at the model's size and channels (load-time resize), as a user would expect."""
    c, h, _ = x_shape
    res = dataset.resolution if dataset.resolution is not None else (None if dataset.size == h else h)
    return dataclasses.replace(dataset, resolution=res, channels=c)


def _ood_dataset(name: str, like: DatasetConfig, x_shape: tuple[int, ...], count: int) -> DatasetConfig:
    c, h, _ = x_shape
    base = dict(cache_dir=like.cache_dir, channels=c, resolution=h, num_bits=like.num_bits, centered=True,
                flip=False)
    if name == "photos256":
        return DatasetConfig(name="photos256", num_samples=max(count, 16), size=64, **base)
    return DatasetConfig(name="faces25", **base)


# -------------------------------------------------------------------------------------------------------- metrics
def run_fid(config: EvaluateConfig, info, model, uri: str) -> tuple[list[dict], dict[str, float]]:
    from core.evaluation.fid import compute_fid, load_inception, reference_stats
    from data_pipelines import dataset_manifest_hash

    inception = load_inception(dataclasses.replace(config.inception, device=str(info.device)))
    # The reference statistics come from the real 8-bit images whatever bit depth a backbone was trained on
    # (CelebA-HQ-256: 5 bits for NVAE, 8-bit images for VAEBM's FID).
    dataset = dataclasses.replace(_fit_dataset(config.dataset_config(), _x_shape(model)), num_bits=8)
    key = (f"{dataset_manifest_hash(dataset)}-r{dataset.resolution or 'native'}-c{dataset.channels}"
           f"-b{dataset.num_bits}-n{config.fid_reference_samples or 'all'}")
    ref = reference_stats(_LazyBatches(lambda: _progress(
        _images(dataset, config.fid_reference_samples, config.batch_size, info.rank, info.world_size, info.device),
        config, info, "fid: reference images")), Path(config.fid_cache_dir).expanduser(), key, inception)
    n_total = config.num_fid_samples()
    t = time.perf_counter()
    fid = compute_fid(fid_sample_batches(model, config, info), ref, inception)
    rows = [{"model": model.kind, "dataset": dataset.name, "samples": n_total, "reference_images": ref.n,
             "fid": round(fid, 4)}]
    return rows, {"fid": fid, "fid/samples": float(n_total), "fid/reference_images": float(ref.n),
                  "fid/seconds": time.perf_counter() - t}


def fid_sample_batches(model, config: EvaluateConfig, info):
    """This rank's FID images, model space: the blocks of `core.evaluation.sampling.sample_blocks` over
    num_fid_samples() with the generators of `block_generator`, so the images scored do not depend on the number of
    ranks. A plain VAE's images follow `nvae_use_mean`; an energy-based model's its trained sampler settings."""
    from core.evaluation.sampling import block_generator, sample_blocks
    from core.methods import SampleOptions

    options = SampleOptions(steps=config.steps, step_size=config.step_size,
                            use_mean=None if model.energy_based else config.nvae_use_mean)
    blocks = sample_blocks(config.num_fid_samples(), config.batch_size, info.rank, info.world_size)
    for block in _progress(blocks, config, info, "fid: sampling + Inception"):
        gen = block_generator(config.seed, block.index, info.device)
        yield model.sample(len(block), gen, options).images.float()


def run_recon(config: EvaluateConfig, info, model) -> tuple[list[dict], dict[str, float]]:
    """Mean per-pixel squared error of `model.reconstruct` on the first eval_samples images (all ranks)."""
    import torch.distributed as dist

    from core import dist as vdist

    dataset = _fit_dataset(config.dataset_config(), _x_shape(model))
    total = torch.zeros(3, dtype=torch.float64, device=info.device)
    images = _images(dataset, config.eval_samples, config.batch_size, info.rank, info.world_size, info.device)
    for b, x in enumerate(_progress(images, config, info, "recon")):
        gen = torch.Generator(device=info.device).manual_seed(vdist.derive_seed(config.seed, info.rank, b))
        rec = model.reconstruct(x, gen)
        if rec is None:
            raise ConfigError(f"metric=recon needs a model with inference; model kind {model.kind!r} has none")
        err = (rec.float() - x.float()).pow(2)
        total += torch.stack([err.sum().double(), torch.tensor(float(err.numel()), dtype=torch.float64,
                                                               device=info.device),
                              torch.tensor(float(len(x)), dtype=torch.float64, device=info.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    mse = float(total[0] / total[1])
    rows = [{"model": model.kind, "dataset": dataset.name, "images": int(total[2]), "mse_per_pixel": round(mse, 6)}]
    return rows, {"recon/mse_per_pixel": mse, "recon/images": float(total[2])}


def run_grbm_likelihood(config: EvaluateConfig, info, model) -> tuple[list[dict], dict[str, float]]:
    """Every likelihood estimator of a grbm_vae model side by side (core/evaluation/grbm_likelihood.py), rank 0."""
    from core.evaluation.grbm_likelihood import evaluate_grbm_vae

    if not hasattr(model, "grbm_params"):
        raise ConfigError(f"metric=grbm_ll needs a grbm_vae model, got kind {model.kind!r}")
    dataset = _fit_dataset(config.dataset_config(), _x_shape(model))
    test = _images(dataset, config.eval_samples, config.batch_size, 0, 1, info.device)
    train_ds = dataset
    if config.grbm_train_dataset:
        train_ds = _fit_dataset(dataclasses.replace(config, dataset_ref=config.grbm_train_dataset).dataset_config(),
                                _x_shape(model))
    train = torch.cat(_images(train_ds, config.grbm.classifier_prior_samples, config.batch_size, 0, 1, info.device))
    return evaluate_grbm_vae(model, test, train, config.grbm,
                             torch.Generator(device=info.device).manual_seed(config.seed))


def run_digits(config: EvaluateConfig, info, model) -> tuple[list[dict], dict[str, float]]:
    """The model's samples against its baseline's from the same noise, scored by the digits classifier (rank 0)."""
    from core.evaluation import baseline as cmp

    if model.baseline is None:
        raise ConfigError(f"metric=digits compares a method with its baseline; model kind {model.kind!r} has none")
    rows = cmp.compare_with_baseline(model, cmp.digits_scorer(config.digits_scorer_cache_dir), config.eval_samples,
                                     config.batch_size, config.seed, config.steps, info.device)
    log.info(cmp.verdict(rows))
    return rows, cmp.metrics_of(rows, "digits")


class _LazyBatches:
    """Iterable that reads the reference images only if reference_stats actually iterates it (cache miss)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def run_iwae(config: EvaluateConfig, info, model) -> tuple[list[dict], dict[str, float]]:
    import torch.distributed as dist

    from core.evaluation.iwae import bits_per_dim, iwae_log_likelihood, prior_log_partition

    vae = _require_vae(model, "iwae")
    dataset = _fit_dataset(config.dataset_config(), vae.x_shape())
    dims = math.prod(vae.x_shape())
    # A reweighted prior p(z) r(z) / Z (NCP-VAE, the joint latent EBM prior): weights with r, then minus log Z, one
    # Monte Carlo estimate shared by every rank (same generator everywhere).
    log_tilt = model.prior_log_tilt if model.reweighted_prior else None
    log_z = log_z_se = 0.0
    if log_tilt is not None:
        gen = torch.Generator(device=info.device).manual_seed(config.seed * 7919 + 17)
        log_z, log_z_se = prior_log_partition(vae, log_tilt, config.iwae_log_z_samples, config.batch_size, gen)
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    torch.manual_seed(config.seed * 1000 + info.rank)
    images = _images(dataset, config.eval_samples, config.batch_size, info.rank, info.world_size, info.device)
    for x in _progress(images, config, info, f"iwae (K={config.iwae_samples})"):
        lp = iwae_log_likelihood(vae, x, config.iwae_samples, config.iwae_chunk, log_tilt) - log_z
        total += torch.stack([lp.sum(), torch.tensor(float(len(lp)), dtype=torch.float64, device=lp.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    n = int(total[1].item())
    ll = float(total[0].item()) / n
    nll = -ll
    bpd = float(bits_per_dim(ll, dims, num_bits=dataset.num_bits))
    row = {"model": model.kind, "dataset": dataset.name, "images": n, "dims": dims, "K": config.iwae_samples,
           "nll_nats": round(nll, 4), "nll_nats_per_dim": round(nll / dims, 6), "bits_per_dim": round(bpd, 4)}
    metrics = {"iwae/nll_nats": nll, "iwae/bits_per_dim": bpd, "iwae/images": float(n)}
    if log_tilt is not None:
        row.update(log_z=round(log_z, 4), log_z_stderr=round(log_z_se, 4), log_z_samples=config.iwae_log_z_samples)
        metrics.update({"iwae/log_z": log_z, "iwae/log_z_stderr": log_z_se})
    return [row], metrics


def run_ood(config: EvaluateConfig, info, model) -> tuple[list[dict], dict[str, float]]:
    from core.evaluation.iwae import iwae_log_likelihood
    from core.evaluation.ood import auroc

    vae = _require_vae(model, "ood")
    dataset = _fit_dataset(config.dataset_config(), vae.x_shape())
    gen = torch.Generator().manual_seed(config.seed * 7919 + info.rank)
    torch.manual_seed(config.seed * 1000 + info.rank)
    num_bits = dataset.num_bits
    levels = 2 ** num_bits - 1

    def scores(batches: list[torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        lp, lh = [], []
        for x in _progress(batches, config, info, f"ood: {name}"):
            p = iwae_log_likelihood(vae, x, config.ood_iwae_samples, config.iwae_chunk)
            lp.append(p)
            if model.energy_based:
                lh.append(p - model.energy(x))  # log h + log Z = log p_vae - E (vaebm.md Eq. 4; Z cancels)
        return _gather_cat(torch.cat(lp)), _gather_cat(torch.cat(lh)) if lh else torch.empty(0)

    in_batches = _images(dataset, config.eval_samples, config.batch_size, info.rank, info.world_size, info.device)
    in_p, in_h = scores(in_batches, dataset.name)
    rows, metrics = [], {"ood/images": float(len(in_p))}
    for name in config.ood_sets:
        if name == dataset.name:
            continue
        if name in ("photos256", "faces25"):
            batches = _images(_ood_dataset(name, dataset, vae.x_shape(), config.eval_samples), config.eval_samples,
                              config.batch_size, info.rank, info.world_size, info.device)
        elif name == "noise":  # uniform noise on the data's quantization levels
            batches = [torch.randint(0, levels + 1, x.shape, generator=gen).to(x.device).float() * (2.0 / levels) - 1
                       for x in in_batches]
        elif name == "inverted":  # photometric negative of the in-distribution images
            batches = [-x for x in in_batches]
        else:  # interpolation: midpoint of two in-distribution images (pixel space)
            batches = [0.5 * (x + x.roll(1, dims=0)) for x in in_batches]
        p, h = scores(batches, name)
        row = {"ood_set": name, "images": len(p), "auroc_vae": round(auroc(in_p, p), 4)}
        metrics[f"ood/{name}/auroc_vae"] = row["auroc_vae"]
        if model.energy_based:
            row["auroc_vaebm"] = round(auroc(in_h, h), 4)
            metrics[f"ood/{name}/auroc_vaebm"] = row["auroc_vaebm"]
        rows.append(row)
    return rows, metrics


def run_ll2d_metric(config: EvaluateConfig) -> tuple[list[dict], dict[str, float], str, dict[str, Any]]:
    from core.evaluation.toy2d import format_ll2d_table, run_ll2d

    cache = config.ll2d_cache_dir or str(config.out_dir() / "ll2d-cache")
    # both stages train on the job, as one MLflow pipeline run `ll2d` beside this evaluation's run
    result, info = run_ll2d(config.ll2d, config.dataset_ref, cache, tracking=config.tracking)
    rows = [{"model": k, "test_log_likelihood_nats": round(v, 4)} for k, v in result.rows.items()]
    extra = {"log_z_grid": result.log_z_grid, "log_z_mc": result.log_z_mc, "log_z_mc_stderr": result.log_z_mc_stderr,
             "iwae_check": result.iwae_check, "gap_closed": result.gap_closed, "true_std_error": result.true_std_error,
             "num_test": result.num_test, "timings_s": result.timings_s, **info}
    return rows, result.metrics(), format_ll2d_table(result), extra


# ------------------------------------------------------------------------------------------------------------ job
def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def evaluate(config: EvaluateConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    from core import dist as vdist
    from core.tracking import resolve_tracking_uri

    info = vdist.init_distributed(config.dist_timeout_s)
    uri = resolve_tracking_uri(config.tracking)
    out = config.out_dir()
    if info.is_rank0:
        out.mkdir(parents=True, exist_ok=True)
    vdist.barrier()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    text = None
    if config.metric == "ll2d":
        rows, metrics, text, extra = run_ll2d_metric(config)
        model = None
    else:
        model = load_model(config.model, info.device, uri)
        if config.metric == "fid":
            rows, metrics = run_fid(config, info, model, uri)
        elif config.metric == "iwae":
            rows, metrics = run_iwae(config, info, model)
        elif config.metric == "grbm_ll":
            rows, metrics = run_grbm_likelihood(config, info, model) if info.is_rank0 else ([], {})
        elif config.metric == "recon":
            rows, metrics = run_recon(config, info, model)
        elif config.metric == "digits":
            rows, metrics = run_digits(config, info, model) if info.is_rank0 else ([], {})
        else:
            rows, metrics = run_ood(config, info, model)
    seconds = time.perf_counter() - t0
    table = markdown_table(rows)
    report = {"metric": config.metric, "model": config.model, "dataset": config.dataset_ref, "rows": rows,
              "metrics": metrics, "seconds": seconds, "world_size": info.world_size, **extra}
    if info.is_rank0:
        report["summary"] = summary_line(config, rows, metrics, extra, seconds, info.world_size)
        body = text if text is not None else table
        md = f"# evaluate: metric={config.metric}\n\nmodel: {config.model}\ndataset: {config.dataset_ref}\n\n{body}\n"
        (out / f"evaluate_{config.metric}.json").write_text(json.dumps(report, indent=2, default=str))
        (out / f"evaluate_{config.metric}.md").write_text(md)
        print(body, flush=True)
        _log_to_mlflow(config, uri, out, resolved, metrics, model)
        print(report["summary"], flush=True)
    vdist.barrier()
    return report


def headline(metric: str, rows: list[dict], metrics: dict[str, float]) -> dict[str, float]:
    """The values a metric is read by (the summary line), out of its full metrics."""
    keys = {"fid": ("fid",), "iwae": ("iwae/nll_nats", "iwae/bits_per_dim"), "recon": ("recon/mse_per_pixel",)}
    if metric in keys:
        return {k: metrics[k] for k in keys[metric] if k in metrics}
    if metric == "ll2d":
        return {f"ll2d/{r['model']}": r["test_log_likelihood_nats"] for r in rows}
    if metric == "ood":
        return {k: v for k, v in metrics.items() if "/auroc" in k}
    if metric == "grbm_ll":
        return {k: v for k, v in metrics.items() if k.endswith("_nll")}
    return dict(metrics)  # digits: baseline and model rows, three scores each


def summary_line(config: EvaluateConfig, rows: list[dict], metrics: dict[str, float], extra: dict[str, Any],
                 seconds: float, world_size: int) -> str:
    """One line, last on rank 0: the metric, its values, how many samples, the time and the ranks."""
    values = ", ".join(f"{k}={v:.6g}" for k, v in headline(config.metric, rows, metrics).items())
    m = config.metric
    if m == "fid":
        count = (f"{int(metrics['fid/samples'])} samples vs {int(metrics['fid/reference_images'])} reference "
                 "images")
    elif m in ("iwae", "recon", "ood", "grbm_ll"):
        key = {"iwae": "iwae/images", "recon": "recon/images", "ood": "ood/images", "grbm_ll": "grbm/images"}[m]
        count = f"{int(metrics.get(key, 0))} {'in-distribution ' if m == 'ood' else ''}images"
    elif m == "ll2d":
        count = f"{extra.get('num_test', 0)} test points"
    else:
        count = f"{config.eval_samples} samples per row"
    return (f"evaluated metric={m} ({values}) on {count} in {seconds:.1f} s on {world_size} rank(s)")


def _log_to_mlflow(config: EvaluateConfig, uri: str, out: Path, resolved: dict, metrics: dict[str, float],
                   model) -> None:
    from core.tracking import Tracker

    if not config.tracking.enabled:
        return
    runs = model_runs(config.model, uri)
    pipeline = runs["pipeline"] or "evaluate"
    parent = runs["parent"] or runs["run"]
    tracker = Tracker(config.tracking, out, is_rank0=True)
    try:
        # named and tagged like the run it evaluates: <method>-<dataset>-<id> in the same pipeline
        method = runs["method"] or getattr(model, "kind", None)
        tracker.start(pipeline=pipeline, stage="evaluate", parent_run_id=parent, method=method,
                      dataset=runs["dataset"])
        tracker.set_tags({"vaebm.metric": config.metric, "vaebm.evaluated_model": config.model or "",
                          "vaebm.evaluated_run": runs["run"] or ""})
        tracker.log_params(resolved)
        tracker.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
        tracker.log_artifact(out / f"evaluate_{config.metric}.json")
        tracker.log_artifact(out / f"evaluate_{config.metric}.md")
        tracker.end("FINISHED")  # also re-terminates the model's pipeline run, which start() marked RUNNING
    finally:
        tracker.close()
