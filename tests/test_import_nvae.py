"""Official NVAE checkpoints imported into our NVAE, checked against the official implementation's own outputs.

tests/fixtures/official_nvae/{nf0,nf1}/ (README there): two small NVAEs built and run by NVlabs/VAEBM's `nvae_model.py`
(the second with one pair of flow cells per group in q(z|x)); `expected.pt` holds their float64 outputs for given noise.
Also: unsafe or unsupported checkpoints are refused, the launcher writes a model directory that rebuilds the same
NVAE and registers it, and stage 2 trains on an imported backbone.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.models import NVAE, NVAEConfig, OfficialCheckpointError, load_official_nvae
from core.models.distributions import DiagNormal, sum_except_batch
from core.models.official_nvae import convert_state_dict, read_official_checkpoint
from core.tracking import read_model_dir
from launch import ROOT, launch_env

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_nvae"
TOL = dict(rtol=0.0, atol=1e-9)  # the bar; measured: <= 1e-12 for sums over pixels, <= 2e-15 per element


def _checkpoint(name: str) -> Path:
    return FIXTURES / name / "checkpoint.pt"


def _expected(name: str) -> dict:
    return torch.load(FIXTURES / name / "expected.pt", weights_only=True)


@pytest.fixture(scope="module", params=["nf0", "nf1"])
def imported(request):
    """(name, our NVAE in float64, its config, the official outputs)."""
    model, config = load_official_nvae(_checkpoint(request.param), dtype=torch.float64)
    return request.param, model, config, _expected(request.param)


def test_config_comes_from_the_checkpoint_args(imported):
    name, model, config, expected = imported
    args = expected["args"]
    assert (config.image_size, config.in_channels) == (32, 3)  # dataset cifar10
    for key in ("num_latent_scales", "num_groups_per_scale", "num_latent_per_group", "num_channels_enc",
                "num_channels_dec", "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_x_bits", "num_nf"):
        assert getattr(config, key) == args[key], key
    assert config.num_nf == (1 if name == "nf1" else 0)
    assert not model.training and next(model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("temperature", ["1.0", "0.7"])
def test_prior_sampling_matches_official(imported, temperature):
    """Same eps -> same z, decoder mean and scale; log p(z) under the conditionals the sampler drew from (sigma * t,
    the model's log p(z) at t = 1)."""
    _, model, _, expected = imported
    ref = expected[f"gen_t{temperature}"]
    t = ref["t"]
    with torch.no_grad():
        tower = model.T_z([e.double() for e in ref["eps"]], t)
    assert len(tower.z) == len(ref["z"])
    for ours, theirs in zip(tower.z, ref["z"]):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(tower.x_dist.mu, ref["mu_x"], **TOL)
    torch.testing.assert_close(tower.x_dist.sigma, ref["sigma_x"], **TOL)
    tempered = sum(sum_except_batch(DiagNormal(g.prior.mu, t * g.prior.sigma).log_prob(g.z)) for g in tower.groups)
    torch.testing.assert_close(tempered, ref["log_p_z"], **TOL)
    if t == 1.0:
        torch.testing.assert_close(tower.log_p_z(), ref["log_p_z"], **TOL)
        with torch.no_grad():
            torch.testing.assert_close(model.log_p_z(ref["z"]), ref["log_p_z"], **TOL)


def test_posterior_matches_official(imported):
    """Same x and posterior noise -> same reconstruction term, per-group KL (analytic; log q - log p with flows),
    log q(z|x), log p(z) and decoder; the ELBO is their combination."""
    _, model, _, expected = imported
    ref = expected["post"]
    x = 2 * ref["x01"].double() - 1
    with torch.no_grad():
        tower = model.posterior(x, eps_z=[e.double() for e in ref["eps_q"]])
    recon = -model.log_p_x_given_z(tower, x)
    torch.testing.assert_close(recon, ref["recon"], **TOL)
    torch.testing.assert_close(tower.kl_per_group(), ref["kl"], **TOL)
    torch.testing.assert_close(tower.log_q_z(), ref["log_q"], **TOL)
    torch.testing.assert_close(tower.log_p_z(), ref["log_p"], **TOL)
    torch.testing.assert_close(tower.x_dist.mu, ref["mu_x"], **TOL)
    torch.testing.assert_close(tower.x_dist.sigma, ref["sigma_x"], **TOL)
    if model.config.num_nf:  # the KL is the sample estimate, so it sums to log q - log p
        torch.testing.assert_close(tower.kl_per_group().sum(1), ref["log_q"] - ref["log_p"], rtol=0, atol=1e-9)


def test_mapping_uses_every_official_tensor_and_fills_every_one_of_ours():
    args, official = read_official_checkpoint(_checkpoint("nf1"))
    model, _ = load_official_nvae(_checkpoint("nf1"))
    assert len(convert_state_dict(model, official)) == len(model.state_dict())
    extra = dict(official, **{"nf_cells.9.cell1.mu.conv_0.bias": torch.zeros(3)})
    with pytest.raises(OfficialCheckpointError, match="no place"):
        convert_state_dict(model, extra)
    short = {k: v for k, v in official.items() if k != "dec_tower.4.skip.1.weight"}
    with pytest.raises(OfficialCheckpointError, match="lacks"):
        convert_state_dict(model, short)
    # the cached normalized copies are not parameters: they are dropped, everything else is used
    assert any(k.endswith(".weight_normalized") for k in official)


class _Payload:
    """Runs a shell command when unpickled by a plain pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    pass


def _save_variant(tmp_path: Path, name: str, **changes) -> Path:
    checkpoint = torch.load(_checkpoint("nf0"), weights_only=False)  # our own fixture: trusted
    args = argparse.Namespace(**{**vars(checkpoint["args"]), **changes})
    path = tmp_path / f"{name}.pt"
    torch.save({**checkpoint, "args": args}, path)
    return path


@pytest.mark.parametrize("payload", ["reduce", "class"])
def test_planted_pickle_payload_is_refused(tmp_path, payload):
    marker = tmp_path / "ran"
    evil = _Payload(marker) if payload == "reduce" else _Custom()
    path = _save_variant(tmp_path, payload, evil=evil)
    with pytest.raises(OfficialCheckpointError, match="refused.*argparse.Namespace"):
        load_official_nvae(path)
    assert not marker.exists()


@pytest.mark.parametrize("changes, message", [
    ({"num_mixture_dec": 10}, "num_mixture_dec=10: a discretized logistic mixture decoder"),
    ({"arch_instance": "res_bnswish"}, "arch_instance='res_bnswish'"),
    ({"dataset": "mnist"}, "Bernoulli"),
    ({"dataset": "omniglot"}, "dataset='omniglot': unknown"),
])
def test_unsupported_architectures_are_refused_by_name(tmp_path, changes, message):
    path = _save_variant(tmp_path, "variant", **changes)
    with pytest.raises(OfficialCheckpointError, match=message):
        load_official_nvae(path)


def test_extra_top_level_keys_are_ignored(tmp_path):
    checkpoint = torch.load(_checkpoint("nf0"), weights_only=False)
    path = tmp_path / "extra.pt"
    torch.save({**checkpoint, "scheduler": {"last_epoch": 3}, "grad_scalar": {"scale": torch.tensor(2.0)}}, path)
    model, config = load_official_nvae(path)
    assert isinstance(model, NVAE) and config.num_nf == 0


def _run(script: str, args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=launch_env(tmp_path, None),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def imported_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("imported")
    out = tmp / "nvae-official"
    proc = _run("launchers/import_nvae.py", [f"checkpoint={_checkpoint('nf1')}", f"out={out}"], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.integration
def test_launcher_writes_a_model_directory_that_rebuilds_the_same_nvae(imported_dir, tmp_path):
    from core.methods.nvae import build_vae

    bundle, weights = read_model_dir(imported_dir)
    assert bundle["kind"] == "nvae" and bundle["nvae"]["num_nf"] == 1
    rebuilt = build_vae(bundle)
    rebuilt.load_state_dict(weights, strict=True)
    rebuilt.eval()
    reference, config = load_official_nvae(_checkpoint("nf1"))
    assert rebuilt.config == config
    ref = _expected("nf1")
    with torch.no_grad():
        x = 2 * ref["post"]["x01"].float() - 1
        eps_q = [e.float() for e in ref["post"]["eps_q"]]
        got, want = rebuilt.posterior(x, eps_q), reference.posterior(x, eps_q)
        torch.testing.assert_close(got.x_dist.mu, want.x_dist.mu, rtol=0, atol=0)
        torch.testing.assert_close(got.kl_per_group(), want.kl_per_group(), rtol=0, atol=0)
        eps_z = [e.float() for e in ref["gen_t0.7"]["eps"]]
        torch.testing.assert_close(rebuilt.T_z(eps_z, 0.7).x_dist.mu, reference.T_z(eps_z, 0.7).x_dist.mu,
                                   rtol=0, atol=0)
    assert (imported_dir / "source.json").is_file()
    # a refused checkpoint: one line, exit code 2, nothing written
    bad = _save_variant(tmp_path, "mixture", num_mixture_dec=10)
    proc = _run("launchers/import_nvae.py", [f"checkpoint={bad}", f"out={tmp_path / 'never'}"], tmp_path)
    assert proc.returncode == 2 and "logistic mixture" in proc.stderr and not (tmp_path / "never").exists()


@pytest.fixture
def restored_environ():
    """The tracker sets MLflow's HTTP settings process-wide; give the next tests the environment they had."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.integration
def test_register_and_outage(tmp_path, restored_environ):
    """register=<name>: a new version with alias `candidate` in the configured store; an unreachable server: the
    directory is written, the job says so and exits 3."""
    from core.tracking import load_registered_model
    from launchers.import_nvae import EXIT_NOT_REGISTERED, main

    store = tmp_path / "mlruns"
    out = tmp_path / "model"
    assert main([f"checkpoint={_checkpoint('nf0')}", f"out={out}", "register=nvae-official-cifar10",
                 f"tracking.local_store={store}"]) == 0
    bundle, weights = load_registered_model("models:/nvae-official-cifar10@candidate",
                                            tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    assert bundle == read_model_dir(out)[0] and set(weights) == set(read_model_dir(out)[1])

    down = tmp_path / "down"
    code = main([f"checkpoint={_checkpoint('nf0')}", f"out={down}", "register=nvae-official-cifar10",
                 "tracking.tracking_uri=http://127.0.0.1:9", "tracking.request_timeout_s=1",
                 "tracking.retry_interval_s=1", "tracking.flush_timeout_s=2"])
    assert code == EXIT_NOT_REGISTERED
    assert read_model_dir(down)[0]["kind"] == "nvae"


@pytest.mark.integration
def test_stage2_trains_on_an_imported_backbone(imported_dir, tmp_path):
    """`train_vaebm.py backbone=<imported dir>`: a few VAEBM steps on 32x32 RGB digits, the shape of the fixture's
    CIFAR-10 backbone."""
    run = tmp_path / "vaebm"
    args = [f"backbone={imported_dir}", "backbone_train_if_missing=false", "dataset.size=32", "dataset.channels=3",
            "energy.image_size=32", "energy.in_channels=3", "energy.base_channels=8", "sampler.langevin.num_steps=2",
            "sampler.test_steps=2", "loop.batch_size=4",
            "loop.global_batch=null", "loop.total_nimg=16", "loop.checkpoint_every_nimg=16",
            "loop.report_every_nimg=8", "loop.sample_every_nimg=16", "loop.sample_count=4",
            "loop.progress_bar=false", "loader.num_workers=0", "tracking.enabled=false", "report.enabled=false",
            f"run.dir={run}"]
    proc = _run("launchers/train_vaebm.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bundle, weights = read_model_dir(run / "model")
    assert bundle["kind"] == "vaebm" and bundle["backbone"] == read_model_dir(imported_dir)[0]
    assert any(k.startswith("energy.") for k in weights)


def test_our_nvae_is_the_official_one_without_import_options():
    """The two measured differences are our NVAE's own behaviour: a fresh NVAE has the bias-free bilinear up skip
    and the 1.01 top prior, whatever built it."""
    model = NVAE(dataclasses.replace(NVAEConfig(image_size=16), num_nf=1)).double().eval()
    assert model.dec_up[0].skip.conv.bias is None
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    up = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
    conv = torch.nn.Conv2d(4, 2, 1, bias=False).double()
    skip = type(model.dec_up[0].skip)(4, 2).double()
    with torch.no_grad():
        conv.weight.copy_(skip.conv.normalized_weight())
    torch.testing.assert_close(skip(x), conv(up), rtol=0, atol=1e-12)
    tower = model.T_z([e.double() for e in model.sample_noise(2)[1]])
    assert torch.equal(tower.groups[0].prior.sigma, torch.full_like(tower.groups[0].prior.sigma, 1.01))
