"""The `grbm_vae` method: presets (the paper's architectures), config errors, joint training on the digits in process
(prior samples decode to digits a classifier trained here recognizes more confidently than decodes of N(0, I)), the
likelihood report on the trained model, and the real 2-rank `deepspeed` launcher with a bit-identical resume."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from launch import resume_is_bit_identical

from core.evaluation.grbm_likelihood import AISConfig, ClassifierConfig, GRBMLikelihoodConfig, evaluate_grbm_vae
from core.evaluation.sample_score import DigitsScorer, DigitsScorerConfig
from core.methods import SampleOptions, build_model
from core.methods.base import MethodContext
from core.methods.grbm_vae import GRBMVAEMethod
from core.training.cli import run_training
from core.training.config import ConfigError, compose_job
from core.training.engine import warmup_cosine
from data_pipelines import build_loader
from data_pipelines.config import LoaderConfig
from data_pipelines.transforms import dynamic_binarize


@pytest.mark.parametrize("experiment, total", [("quickstart", None), ("mnist", 730_240 + 698_128 + 8_448),
                                               ("cifar10", None)])
def test_dry_run_every_preset(experiment, total, capsys):
    assert run_training([f"experiment={experiment}", "dry_run=true"], default_method="grbm_vae") == 0
    out = capsys.readouterr().out
    assert f"experiment: {experiment}" in out and "method: grbm_vae" in out and "GRBM prior" in out
    if total is not None:  # Sec. 4.1: 784-512-512-128 encoder, 64-512-512-784 decoder, GRBM 64 x 128
        totals = [int(line.split()[-1].replace(",", "")) for line in out.splitlines() if line.startswith("total")]
        assert sum(totals) == total


def test_cifar10_preset_is_the_papers_network():
    config, _, _ = compose_job(["method=grbm_vae", "experiment=cifar10"])
    method = GRBMVAEMethod(dataclasses.replace(config, nets=dataclasses.replace(config.nets)),
                           MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=1, sample_count=2))
    nets = method.model.nets
    convs = [m for m in nets.encoder.body if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256] and all(c.stride == (2, 2) for c in convs)
    deconvs = [m for m in nets.decoder.body if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in deconvs] == [128, 64, 32, 3]
    assert method.model.grbm.W.shape == (512, 128) and config.loop.batch_size == 1024
    y, log_det = nets.data.to_targets(torch.rand(2, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    decoded, *_ = method.model(y, torch.zeros(2, 512), torch.randn(1, 2, 512), "vr")
    assert decoded.shape == (2, 3, 32, 32) and torch.isfinite(log_det).all()


@pytest.mark.parametrize("override, message", [
    (["grbm.visible=8"], "grbm.visible=8 must equal nets.latent_dim"),
    (["dataset.binarize=false"], "dataset.binarize=true"),
    (["ssm.variant=exact"], "ssm.variant"),
    (["sampler.method=hmc"], "sampler.method"),
    (["nets.likelihood=laplace"], "goes with"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_job(["method=grbm_vae", "experiment=quickstart", *override])


# ------------------------------------------------------------------------------------------ digits, in process
STEPS = 500


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart preset trained in process for STEPS steps (the job's optimizer, groups and schedule)."""
    config, _, _ = compose_job(["method=grbm_vae", "experiment=quickstart"])
    data = dataclasses.replace(config.dataset, binarize=False,
                               cache_dir=str(tmp_path_factory.getbasetemp() / "data-cache"))
    loader = build_loader(data, LoaderConfig(backend="torch", batch_size=256, num_workers=0, shuffle=False),
                          rank=0, world_size=1, seed=0)
    digits = torch.cat([b["x"] for b in loader.epoch(0)])[:1797]
    loader.close()
    batch = config.loop.batch_size
    ctx = MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=STEPS * batch, sample_count=16)
    method = GRBMVAEMethod(config, ctx)
    opt = method.make_optimizer(method.param_groups())
    o = config.optim
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, STEPS, 0, o.lr, o.lr_min))
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    for step in range(STEPS):
        pos = torch.arange(step * batch, (step + 1) * batch)
        x = dynamic_binarize(digits[perm[pos % len(digits)]], 0, pos)  # the loader's dynamic binarization
        loss, metrics = method.loss(method.model, {"x": x}, step * batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    assert all(math.isfinite(float(v)) for v in metrics.values())
    bundle, weights = method.export()
    return build_model(bundle, weights), digits, metrics


def test_prior_samples_are_more_digit_like_than_normal_decodes(trained, tmp_path_factory):
    model, digits, metrics = trained
    assert metrics["train/alb"] > -90  # the bound improved from ~-180 nats (untrained) on 256 binary pixels
    scorer = DigitsScorer(DigitsScorerConfig(cache_dir=str(tmp_path_factory.getbasetemp() / "scorer")))
    gen = torch.Generator().manual_seed(1)
    prior = model.sample(400, gen).images
    normal = model.decode(torch.randn(400, 16, generator=gen))
    assert prior.shape == (400, 1, 16, 16) and float(prior.min()) >= -1 and float(prior.max()) <= 1
    s_prior, s_normal = scorer.score(prior), scorer.score(normal)
    assert s_prior["mean_confidence"] > s_normal["mean_confidence"] + 0.03, (s_prior, s_normal)
    assert s_prior["frechet_distance"] < s_normal["frechet_distance"]
    # block Gibbs is the other sampler of the same prior; chain strips come back as frames
    model.sampler = dataclasses.replace(model.sampler, method="gibbs")
    gibbs = model.sample(400, gen, SampleOptions(steps=50, strip_frames=5))
    assert gibbs.frames and len(gibbs.frames) >= 5
    assert scorer.score(gibbs.images)["mean_confidence"] > s_normal["mean_confidence"]
    # zero steps is the baseline the end-of-run report compares with: the chain starts N(0, I), decoded
    gen0, gen1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.sample(8, gen0, SampleOptions(steps=0)).images,
                       model.decode(torch.randn(8, 16, generator=gen1)))
    recon = model.reconstruct(digits[:8].sign(), torch.Generator().manual_seed(4))  # binary digits in and out
    assert recon.shape == (8, 1, 16, 16) and float((recon - digits[:8].sign()).abs().mean()) < 0.6
    model.sampler = dataclasses.replace(model.sampler, method="langevin")


def test_likelihood_report_on_the_trained_model(trained):
    model, digits, _ = trained
    x = dynamic_binarize(digits[:64], 1, torch.arange(64))
    train = dynamic_binarize(digits[64:1064], 2, torch.arange(1000))
    config = GRBMLikelihoodConfig(importance_samples=64, chunk=32, ais=AISConfig(chains=32, betas=300),
                                  classifier=ClassifierConfig(hidden=64, steps=150, batch_size=128),
                                  classifier_prior_samples=500, classifier_samples=2)
    rows, metrics = evaluate_grbm_vae(model, [x[:32], x[32:]], train, config, torch.Generator().manual_seed(0))
    assert len(rows) == 5 and metrics["grbm/images"] == 64
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "grbm/log_z_exact")
    assert math.isnan(metrics["grbm/log_z_exact"])  # H = 32: AIS only
    assert metrics["grbm/iwae_nll"] <= metrics["grbm/elbo_nll"] + 1e-6  # IS with K samples is tighter than the ELBO
    assert 0 < metrics["grbm/log_z_stderr"] < 1


# ---------------------------------------------------------------------------------------- 2 ranks, resume
SMALL = ["method=grbm_vae", "experiment=quickstart", "loop.batch_size=8",
         "loop.global_batch=null", "loop.total_nimg=64",
         "loop.checkpoint_every_nimg=32", "loop.report_every_nimg=16", "loop.sample_every_nimg=32",
         "loop.sample_count=4", "loop.progress_bar=false", "loader.num_workers=0", "run.dist_timeout_s=60",
         "sampler.steps=3", "tracking.enabled=false", "report.enabled=false"]


@pytest.mark.integration
def test_two_rank_resume_is_bit_identical(tmp_path):
    """Run A trains 64 images on 2 ranks, checkpointing at 32; run B is A's directory cut back to that checkpoint and
    resumed (two launches instead of three: the checkpoint B resumes from is the one A wrote while continuing)."""
    r = resume_is_bit_identical(SMALL, tmp_path, checkpoint_nimg=32, final_nimg=64)
    assert r.bundle["kind"] == "grbm_vae" and any(k.startswith("grbm.") for k in r.weights)
    # the run directory reads without MLflow: rank 0's log and every report's metrics, appended across the resume
    stats = [json.loads(line) for line in (r.run_b / "stats.jsonl").read_text().splitlines()]
    reports = [s["step"] for s in stats if "train/loss" in s["metrics"]]
    assert reports == [16, 32, 48, 64, 48, 64]  # A's four reports (copied), then the resumed run's two
    log_b = (r.run_b / "log.txt").read_text()
    assert log_b.index("nimg=16 ") < log_b.index("resuming from nimg-000000000032") < log_b.rindex("nimg=64 ")
    assert any((r.run_a / "samples").glob("*-samples.png"))
