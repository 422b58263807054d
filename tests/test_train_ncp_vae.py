"""NCP-VAE's job end to end: dry runs of every preset, and a real `deepspeed` run with 2 CPU ranks whose resume is
bit-identical (the classifiers' weights and Adam state come back from the checkpoint; each step's noise is a function
of (seed, rank, nimg)). The backbone is a randomly initialized tiny NVAE written as a model directory: the job loads
it exactly as a registered one (strict state dict), and training it first would only cost time here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import resume_is_bit_identical

from core.methods.nvae import float_state, vae_bundle
from core.tracking import write_model_dir
from core.training.cli import run_training

SMALL = ["dataset.size=16", "dataset.channels=3", "classifier.base_channels=8", "sampler.candidates=4",
         "sampler.langevin.num_steps=2", "loop.batch_size=4",
         "loop.global_batch=null", "loop.total_nimg=64", "loop.checkpoint_every_nimg=32",
         "loop.report_every_nimg=16", "loop.sample_every_nimg=32", "loop.sample_count=4", "loop.progress_bar=false",
         "loader.num_workers=0", "run.dist_timeout_s=60", "tracking.enabled=false"]


@pytest.mark.parametrize("experiment, preset, groups, batch", [("quickstart", "digits16", 4, 64),
                                                                ("cifar10", "cifar10", 30, 64),
                                                                ("celeba64", "celeba64", 15, 32),
                                                                ("celebahq256", "celebahq256", 20, 16)])
def test_dry_run_every_preset(experiment, preset, groups, batch, capsys):
    """Every preset composes and validates; the classifiers are sized for the preset's backbone (one per group) and
    Table 10's optimizer and batch (512 / 256 / 128 over 8 ranks) are what the job gets."""
    from presets import nvae_preset

    from core.methods.ncp_vae import group_shapes
    from core.models import NVAE
    from core.models.ncp_classifier import NCPClassifierConfig, NCPClassifiers
    from core.training.config import compose_job

    assert run_training(["method=ncp_vae", f"experiment={experiment}", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert f"experiment: {experiment}" in out and "method: ncp_vae" in out and "NCP classifiers" in out
    config, _, _ = compose_job(["method=ncp_vae", f"experiment={experiment}"])
    assert (config.optim.lr, config.optim.lr_min) == (1e-3, 1e-7)  # Table 10
    assert experiment == "quickstart" or config.loop.batch_size * 8 == {"cifar10": 512, "celeba64": 256,
                                                                        "celebahq256": 128}[experiment]
    assert config.loop.batch_size == batch
    with torch.device("meta"):
        shapes = group_shapes(NVAE(nvae_preset(preset)).eval())
        nets = NCPClassifiers(shapes, NCPClassifierConfig(**vars(config.classifier)))
    assert len(shapes) == groups == len(nets)
    assert int(out.strip().splitlines()[-1].split()[-1].replace(",", "")) == sum(p.numel() for p in nets.parameters())


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory) -> Path:
    from presets import nvae_preset

    from core.models import NVAE

    torch.manual_seed(0)
    model = NVAE(nvae_preset("tiny", image_size=16, num_channels_enc=8, num_channels_dec=8)).eval()
    return write_model_dir(tmp_path_factory.mktemp("backbone") / "model", vae_bundle(model), float_state(model))


@pytest.mark.integration
def test_two_rank_resume_is_bit_identical(random_backbone, tmp_path):
    args = ["method=ncp_vae", "experiment=quickstart", *SMALL, f"backbone={random_backbone}",
            "backbone_train_if_missing=false"]
    r = resume_is_bit_identical(args, tmp_path, checkpoint_nimg=32, final_nimg=64)
    run_a = r.run_a
    assert "ncp_accuracy/group_03" in r.out_b  # per-group classifier accuracy is reported
    assert r.bundle["kind"] == "ncp_vae" and len(r.bundle["group_shapes"]) == 4
    assert any(k.startswith("classifier.") for k in r.weights)
    names = {p.name for p in (run_a / "samples").glob("*.png")}
    assert {"nimg-000000000064-t1-ncp.png", "nimg-000000000064-t0.7-backbone.png",
            "nimg-000000000064-chains.png"} <= names
