"""The joint latent EBM prior on the shared job: dry runs of every preset, one real 2-rank `deepspeed` run with the
replay buffer (training, bit-identical resume, the published model through the sampling and evaluation jobs), and
the digits check: a classifier trained on the real digits is at least as confident on the method's samples as on the
backbone's own samples from the same noise at the same temperature.

The backbone is a tiny NVAE trained here in-process on the built-in digits (16x16, a few hundred steps) and written
as a model directory, the form `backbone=<dir>` reads.
"""
from __future__ import annotations


from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from launch import resume_is_bit_identical

from core.evaluation.jobs import EvaluateConfig, evaluate
from core.evaluation.sample_score import DigitsScorer, DigitsScorerConfig
from core.evaluation.sampling import SampleConfig, run_sampling
from core.methods.base import MethodContext
from core.methods.latent_ebm import LatentEBMConfig, LatentEBMMethod, decode_latents, latent_negatives
from core.methods.nvae import float_state, vae_bundle
from core.models import NVAE, NVAEConfig
from core.models.latent_energy import LatentEnergyConfig
from core.objectives.elbo import ELBOConfig, kl_balance_weights, nelbo_loss
from core.sampling.langevin import LangevinConfig
from core.tracking import TrackingConfig, write_model_dir
from core.training.cli import run_training

PRESETS = {"quickstart": 107_332, "cifar10": 9_946_350, "celeba64": 4_973_175, "celebahq256": 7_942_900}


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_dry_run_every_preset(experiment, capsys):
    assert run_training(["method=latent_ebm", f"experiment={experiment}", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert f"experiment: {experiment}" in out and "Latent energy f_alpha" in out
    assert f"{PRESETS[experiment]:,}" in out  # Table 10: ~10M for the 30-group CIFAR-10 NVAE, 9M CelebA-HQ-256


def _digits(size: int) -> torch.Tensor:
    images = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return images.repeat(1, 3, 1, 1) * 2 - 1  # RGB in [-1, 1]


@pytest.fixture(scope="module")
def digits_backbone(tmp_path_factory) -> tuple[NVAE, Path, torch.Tensor]:
    """(frozen NVAE, its model directory, the training digits): 16x16, 8 channels, 100 ELBO steps (~20 s)."""
    torch.manual_seed(0)
    x = _digits(16)
    config = NVAEConfig(image_size=16, num_channels_enc=8, num_channels_dec=8)
    model = NVAE(config)
    alpha = kl_balance_weights(config.latent_shapes())
    objective = ELBOConfig(kl_anneal_portion=0.5)
    optimizer = torch.optim.Adamax(model.parameters(), lr=5e-3)
    steps = 100
    for step in range(steps):
        batch = x[torch.randint(0, len(x), (16,))]
        terms = nelbo_loss(model.posterior(batch), batch, step / steps, objective, alpha, model.spectral_penalty(),
                           model.batchnorm_penalty())
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
    model = model.eval().requires_grad_(False)
    directory = write_model_dir(tmp_path_factory.mktemp("backbone") / "nvae", vae_bundle(model), float_state(model))
    return model, directory, x


def test_method_samples_are_at_least_as_confident_as_the_backbone(digits_backbone, tmp_path):
    """The issue's digits check. Both sample sets decode the same 128 eps_z at temperature 1 (decoder means): the
    backbone's directly, the method's after its test-time eps_z Langevin chains. The classifier's mean max-softmax
    (core.evaluation.sample_score) must not drop; both numbers are printed."""
    vae, _, x = digits_backbone
    cfg = LatentEBMConfig(energy=LatentEnergyConfig(channels=16, hidden=64))
    cfg.sampler.langevin = LangevinConfig(num_steps=8, step_size=0.1)
    cfg.optim.lr = 1e-3
    ctx = MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=10_000, sample_count=4)
    m = LatentEBMMethod(cfg, ctx, backbone=vae, backbone_bundle=vae_bundle(vae))
    opt = m.make_optimizer(m.param_groups())
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        loss, metrics = m.loss(m.energy, {"x": x[torch.randint(0, len(x), (16,), generator=gen)]}, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert m.health({k: float(v) for k, v in metrics.items()}) is None
    _, eps_z = vae.sample_noise(128, generator=torch.Generator().manual_seed(2))
    chains = latent_negatives(vae, m.energy, eps_z, LangevinConfig(num_steps=20, step_size=0.1),
                              torch.Generator().manual_seed(3))
    backbone_images = decode_latents(vae, eps_z, 1.0)
    method_images = decode_latents(vae, chains.state, 1.0)
    scorer = DigitsScorer(DigitsScorerConfig())
    base, ours = scorer.score(backbone_images), scorer.score(method_images)
    print(f"digits classifier mean confidence: backbone {base['mean_confidence']:.4f}, latent_ebm "
          f"{ours['mean_confidence']:.4f} (confident fraction {base['confident_fraction']:.3f} -> "
          f"{ours['confident_fraction']:.3f}; Frechet distance {base['frechet_distance']:.2f} -> "
          f"{ours['frechet_distance']:.2f})")
    assert ours["mean_confidence"] >= base["mean_confidence"]


SMALL = ["method=latent_ebm", "dataset.size=16", "dataset.channels=3", "energy.channels=8", "energy.hidden=16",
         "sampler.langevin.num_steps=3", "sampler.test_steps=3", "sampler.persistent=true", "buffer.capacity=32",
         "buffer.anneal_iterations=2", "hierarchy_rows=2", "expected_latent_groups=[2x8x4x4,2x8x8x8]",
         "loop.batch_size=4",
         "loop.global_batch=null", "loop.total_nimg=32", "loop.checkpoint_every_nimg=16", "loop.report_every_nimg=8",
         "loop.sample_every_nimg=32", "loop.sample_count=4", "loop.progress_bar=false", "loader.num_workers=0",
         "run.dist_timeout_s=60", "tracking.enabled=false"]


@pytest.mark.integration
def test_two_rank_resume_is_bit_identical_and_jobs_accept_the_model(digits_backbone, tmp_path, capsys):
    _, backbone_dir, _ = digits_backbone
    args = [*SMALL, f"backbone={backbone_dir}"]
    r = resume_is_bit_identical(args, tmp_path, checkpoint_nimg=16, final_nimg=32)
    run_a = r.run_a
    buffer_state = torch.load(run_a / "checkpoints" / "nimg-000000000016" / "rank1.pt", weights_only=True)["buffer"]
    assert buffer_state["size"] > 0  # rank 1's replay-buffer shard is part of the checkpoint
    assert r.bundle["kind"] == "latent_ebm" and any(k.startswith("energy.") for k in r.weights)
    samples = run_a / "samples"
    for kind in ("samples", "backbone", "chains", "energies", "hierarchy"):
        assert any(samples.glob(f"*-{kind}.png")), kind

    # the sampling and evaluation jobs take the published model (a run directory here; models:/ URIs alike)
    out_dir = run_sampling(SampleConfig(model=str(run_a), n=4, out=str(tmp_path / "samples"), steps=2,
                                        batch_size=4, tracking=TrackingConfig(enabled=False)), {})
    assert len(list(out_dir.glob("0*.png"))) == 4 and (out_dir / "chains.png").is_file()
    assert f"wrote 4 samples (one PNG each) to {out_dir}" in capsys.readouterr().out
    report = evaluate(EvaluateConfig(metric="ood", model=str(run_a), dataset_ref="digits", data={"size": 16},
                                     eval_samples=8, batch_size=4, ood_iwae_samples=2, ood_sets=["noise"],
                                     out=str(tmp_path / "ood"), tracking=TrackingConfig(enabled=False)), {})
    row = report["rows"][0]
    assert row["ood_set"] == "noise" and 0.0 <= row["auroc_vaebm"] <= 1.0
    # metric=iwae on the reweighted prior p(z) exp(f(z)) / Z: importance weights with f, minus a Monte Carlo log Z
    report = evaluate(EvaluateConfig(metric="iwae", model=str(run_a), dataset_ref="digits", data={"size": 16},
                                     eval_samples=8, batch_size=4, iwae_samples=2, iwae_log_z_samples=64,
                                     out=str(tmp_path / "iwae"), tracking=TrackingConfig(enabled=False)), {})
    row = report["rows"][0]
    assert row["images"] == 8 and row["log_z_samples"] == 64 and row["log_z_stderr"] >= 0
    assert row["nll_nats"] == row["nll_nats"] and row["bits_per_dim"] > 0  # finite, not NaN
