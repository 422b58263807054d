"""LEBM / joint EBM prior on the shared job: dry runs of every preset, config errors, the amortized objective
(joint_latent_ebm_prior.md Eq. 19) against torch.distributions, and one real `deepspeed` job with 2 CPU ranks (two
launches) that resumes bit-identically, publishes an `lebm` model, and feeds the sampling job and FID."""
from __future__ import annotations


import pytest
import torch
from launch import resume_is_bit_identical

from core.evaluation.fid import InceptionConfig
from core.evaluation.jobs import EvaluateConfig, evaluate
from core.evaluation.sampling import SampleConfig, run_sampling
from core.methods import MethodContext
from core.methods.lebm import LEBMConfig, LEBMMethod, sample_prior
from core.models.lebm_nets import GeneratorConfig, LatentEBMModel, PriorEBMConfig
from core.sampling.rng import rank_generator
from core.tracking import TrackingConfig
from core.training.cli import run_training
from core.training.config import compose_job

PRESETS = ["quickstart", "svhn", "cifar10", "celeba64", "joint_quickstart", "joint_svhn", "joint_cifar10",
           "joint_celeba64"]


@pytest.mark.parametrize("experiment", PRESETS)
def test_dry_run_every_preset(experiment, capsys):
    assert run_training(["method=lebm", f"experiment={experiment}", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert f"experiment: {experiment}" in out and "method: lebm" in out
    config, _, _ = compose_job(["method=lebm", f"experiment={experiment}"])
    assert config.generator.layers == (2 if experiment.startswith("joint") else 1)
    with torch.device("meta"):
        model = LatentEBMModel(config.generator, config.ebm, config.model_inference())
    totals = [int(line.split()[-1].replace(",", "")) for line in out.splitlines() if line.startswith("total")]
    assert sum(totals) == sum(p.numel() for p in model.parameters())


def test_paper_presets_follow_the_tables():
    cfg, _, _ = compose_job(["method=lebm", "experiment=cifar10"])
    assert (cfg.generator.z_dim, cfg.generator.ngf, cfg.sampler.posterior_steps) == (128, 128, 40)  # Table 1-2
    assert (cfg.sampler.prior_steps, cfg.sampler.prior_step_size, cfg.sampler.posterior_step_size) == (60, 0.4, 0.1)
    assert (cfg.optim.lr, cfg.optim.ebm_lr, list(cfg.optim.betas)) == (1e-4, 2e-5, [0.5, 0.999])  # App. D
    joint, _, _ = compose_job(["method=lebm", "experiment=joint_celeba64", "sampler.posterior=inference"])
    assert (joint.ebm.num_hidden, joint.ebm.top_num_hidden, joint.ebm.top_hidden) == (4, 3, 100)  # Table 12
    assert joint.model_inference().enabled and joint.inference.ngf == 128


@pytest.mark.parametrize("override, message", [
    ("generator.layers=3", "generator.layers"),
    ("sampler.posterior=mcmc", "sampler.posterior"),
    ("dataset.resolution=32", "dataset.resolution=16"),
    ("dataset.size=32", "gives 32x32"),
    ("sampler.prior_step_size=0", "prior_step_size"),
])
def test_config_errors_name_the_key(override, message):
    from core.training.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose_job(["method=lebm", "experiment=quickstart", override])


def test_amortized_objective_is_the_negative_elbo_with_the_ebm_prior_plus_the_negative_phase():
    """sampler.posterior=inference, two layers: loss = E_q[||x - g(z1)||^2/(2 sigma^2) + log q(z|x) - log p(z1|z2)
    - log N(z2; 0, I) - f(z)] + f(z-) + log p(z1-|z2-) (Eq. 15-19, log Z's gradient by the prior chains), checked
    with torch.distributions on the same draws."""
    cfg = LEBMConfig(generator=GeneratorConfig(arch="dcgan16", out_channels=1, ngf=4, z_dim=3, top_dim=2, layers=2),
                     ebm=PriorEBMConfig(hidden=8))
    cfg.sampler.posterior, cfg.sampler.prior_steps = "inference", 2
    method = LEBMMethod(cfg, MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=1, sample_count=4))
    m = method.model
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    noise = m.sample_noise(5, generator=torch.Generator().manual_seed(0))
    neg = m.sample_noise(5, generator=torch.Generator().manual_seed(1))
    t = m(x, noise, neg, True)
    normal = torch.distributions.Normal
    h = m.enc(x).flatten(1)
    z1 = h[:, :3] + h[:, 3:].exp() * noise[0]
    h2 = m.enc_top(z1)
    z2 = h2[:, :2] + h2[:, 2:].exp() * noise[1]
    log_q = (normal(h[:, :3], h[:, 3:].exp()).log_prob(z1).sum(1)
             + normal(h2[:, :2], h2[:, 2:].exp()).log_prob(z2).sum(1))
    top = m.top(z2)
    log_p = normal(top[:, :3], top[:, 3:].exp()).log_prob(z1).sum(1) + normal(0.0, 1.0).log_prob(z2).sum(1)
    rec = (x - m.g(z1[:, :, None, None])).pow(2).flatten(1).sum(1) / (2 * 0.3 ** 2)
    f_pos = (m.f[0](z1) + m.f[1](z2)).squeeze(1)
    z2n = neg[1]
    topn = m.top(z2n)
    z1n = topn[:, :3] + topn[:, 3:].exp() * neg[0]  # T(eps-), App. A.3 Eq. 28-29
    f_neg = (m.f[0](z1n) + m.f[1](z2n)).squeeze(1)
    log_c_neg = normal(topn[:, :3], topn[:, 3:].exp()).log_prob(z1n).sum(1)
    torch.testing.assert_close(t["log_q"], log_q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(t["log_prior"], log_p, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(t["rec"], rec, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(t["f_pos"], f_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["f_neg"], f_neg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["logc_neg"], log_c_neg, rtol=1e-5, atol=1e-4)

    # and the method's loss is that combination (same draws: the method seeds its streams from the iteration)
    init = rank_generator(0, 0, 0, "cpu", stream=0)
    eps_neg0, eps_pos0 = m.sample_noise(5, generator=init), m.sample_noise(5, generator=init)
    loss, _ = method.loss(m, {"x": x}, 0)
    prior = sample_prior(m, eps_neg0, 2, 0.4, rank_generator(0, 0, 0, "cpu", stream=1))
    t = m(x, eps_pos0, prior.state, True)
    expected = (t["rec"] + t["log_q"] - t["log_prior"] - t["f_pos"]).mean() + t["f_neg"].mean() + t["logc_neg"].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ 2 CPU ranks
SMALL = ["method=lebm", "experiment=joint_quickstart", "generator.ngf=8", "sampler.prior_steps=6",
         "sampler.posterior_steps=3", "loop.batch_size=4",
         "loop.global_batch=null", "loop.total_nimg=64", "loop.checkpoint_every_nimg=32",
         "loop.report_every_nimg=16", "loop.sample_every_nimg=32", "loop.sample_count=4", "loop.keep_checkpoints=3",
         "loop.progress_bar=false", "loader.num_workers=0", "run.dist_timeout_s=60", "tracking.enabled=false",
         "report.enabled=false"]


@pytest.mark.integration
def test_two_ranks_resume_bit_identical_and_the_model_samples(tmp_path):
    """Run A trains to 64 images with a checkpoint at 32. Run B is A's directory cut back to that checkpoint (what a
    kill right after it leaves) and resumed by the same command: its final weights equal A's bit for bit."""
    r = resume_is_bit_identical(SMALL, tmp_path, checkpoint_nimg=32, final_nimg=64, timeout=600)
    run_a = r.run_a
    assert r.bundle["kind"] == "lebm" and r.bundle["generator"]["layers"] == 2
    assert any(k.startswith("f.1.") for k in r.weights)
    names = {p.name.split("-", 2)[-1] for p in (run_a / "samples").glob("nimg-*")}
    assert {"samples.png", "prior-chains.png", "posterior-chains.png", "reconstructions.png",
            "energies.png"} <= names
    per_rank = torch.load(run_a / "checkpoints" / "nimg-000000000064" / "rank1.pt", weights_only=True)
    assert len(per_rank["curves"]["f_pos"]) == 8  # rank 1's f(z+) curve: one point per step

    # the sampling job and FID (stand-in Inception weights) accept the published model
    out_dir = run_sampling(SampleConfig(model=str(run_a), n=4, out=str(tmp_path / "samples"), steps=3, batch_size=4,
                                        tracking=TrackingConfig(enabled=False)), {})
    assert len(list(out_dir.glob("0*.png"))) == 4 and (out_dir / "chains.png").is_file()
    from test_evaluation_fid import _write_standin_weights

    digest = _write_standin_weights(tmp_path / "inception.pth")
    report = evaluate(EvaluateConfig(
        metric="fid", model=str(run_a), dataset_ref="digits", data={"size": 16}, fid_samples=8,
        fid_reference_samples=16, batch_size=4, steps=3, fid_cache_dir=str(tmp_path / "fidcache"),
        out=str(tmp_path / "eval"), tracking=TrackingConfig(enabled=False),
        inception=InceptionConfig(weights_path=str(tmp_path / "inception.pth"), expected_sha256=digest)), {})
    row = report["rows"][0]
    assert row["model"] == "lebm" and row["samples"] == 8 and row["fid"] > 0


def test_nonfinite_chains_are_reset_counted_and_reported_unhealthy():
    """Chains whose f is NaN (here: z_1 > 0) restart from their start, are counted as a share of the batch in
    `langevin/prior_nonfinite`, and make the report unhealthy (as VAEBM's chains)."""

    class NaNOnTheRight(torch.nn.Module):
        def forward(self, z):
            return torch.where(z[:, :1] > 0, torch.full_like(z[:, :1], float("nan")), -0.5 * z[:, :1] ** 2)

    cfg = LEBMConfig(generator=GeneratorConfig(arch="dcgan16", out_channels=1, ngf=4, z_dim=2),
                     ebm=PriorEBMConfig(hidden=8))
    cfg.sampler.prior_steps, cfg.sampler.posterior_steps = 3, 2
    method = LEBMMethod(cfg, MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=1, sample_count=4))
    method.model.f[0] = NaNOnTheRight()
    init = method.model.sample_noise(64, generator=rank_generator(0, 0, 0, "cpu", stream=0))[0]
    _, metrics = method.loss(method.model, {"x": torch.zeros(64, 1, 16, 16)}, 0)
    share = float((init[:, 0] > 0).float().mean())  # NaN at the start: these chains never leave it
    assert float(metrics["langevin/prior_nonfinite"]) >= share > 0.3
    assert "non-finite" in method.health({k: float(v) for k, v in metrics.items() if torch.isfinite(v)})
