"""Import a checkpoint of the official NVAE implementation (NVlabs/NVAE `train.py`, the model VAEBM trains on) into
our `NVAE`, key by key.

    model, config = load_official_nvae("checkpoint.pt")          # eval mode, float32
    model, config = load_official_nvae("checkpoint.pt", dtype=torch.float64)

The checkpoint is `{'epoch', 'global_step', 'args', 'state_dict', 'optimizer', ...}` with `args` a pickled
`argparse.Namespace`. It is unpickled with `weights_only=True` and that one class allowed, so a checkpoint that pickles
anything else (a planted payload) is refused before any of it runs. The architecture comes from `args`; the image
size and channels from `args.dataset`. Only what our NVAE implements is accepted: the `res_mbconv` cells, a Normal
decoder (`num_mixture_dec == 1`; the logistic-mixture decoder is refused), more than one latent group.

What differs between the two implementations and how it is bridged (each checked by the official reference outputs in
tests/fixtures/official_nvae/):
- `*.weight_normalized` entries are cached copies of normalized weights, not parameters: dropped.
- The official inverted-residual expand and depthwise convs are plain convs; ours are weight-normalized, which is a
  reparameterization: g = log(||W|| + 1e-5) reproduces W (`WeightNormalized.log_norm_reproducing`). It is exact to
  rounding in the dtype g is stored in: compare against float64 references with `dtype=torch.float64` (a float32
  import cast to float64 later is off by ~1e-10 per pixel, ~1e-8 nats in log p(z)).
- The official encoder tower holds its combiner cells in bottom-up order and applies them reversed (top-down); ours are
  stored in the order the decoder uses them.
- Our spectral-regularizer power-iteration buffers have no official counterpart: they keep their (seeded) init.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from core.models.cells import Cell, FlowCell
from core.models.layers import FactorizedReduce, InvertedResidual, SqueezeExcitation, UpsampleSkip, WeightNormalized
from core.models.nvae import NVAE
from core.models.nvae_config import NVAEConfig

# Datasets the official model decodes with a Normal (VAEBM's `nvae_model.decoder_output`): (image size, channels).
# MNIST is not among them: its official decoder is a Bernoulli over one channel.
DATASETS: dict[str, tuple[int, int]] = {
    "cifar10": (32, 3), "stacked_mnist": (32, 3), "imagenet_32": (32, 3), "imagenet_64": (64, 3),
    "celeba_64": (64, 3), "celeba_256": (256, 3), "ffhq": (256, 3), "lsun_church_64": (64, 3),
    "lsun_church_128": (128, 3), "lsun_bedroom_128": (128, 3), "lsun_bedroom_256": (256, 3),
}
# `args` fields that are NVAEConfig fields of the same name and meaning.
ARCH_FIELDS = ("use_se", "res_dist", "num_x_bits", "num_latent_scales", "num_groups_per_scale", "num_latent_per_group",
               "ada_groups", "min_groups_per_scale", "num_channels_enc", "num_channels_dec", "num_preprocess_blocks",
               "num_preprocess_cells", "num_cell_per_cond_enc", "num_postprocess_blocks", "num_postprocess_cells",
               "num_cell_per_cond_dec", "num_nf")
SUPPORTED_ARCH = "res_mbconv"  # BN-Swish-conv encoder cells, inverted-residual decoder cells (our cells.py)
_SEED = 0  # our spectral buffers are random at init: a fixed seed makes an import reproducible to the byte


class OfficialCheckpointError(ValueError):
    """The file is not an official NVAE checkpoint we can import exactly, or it holds more than tensors and args."""


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(args as a dict, state_dict) of an official checkpoint, unpickled with only `argparse.Namespace` allowed."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise OfficialCheckpointError(
            f"{path}: refused: the checkpoint pickles objects other than tensors, containers and "
            f"argparse.Namespace, which could run code when loaded ({str(err).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "args" not in checkpoint:
        raise OfficialCheckpointError(f"{path}: not an NVAE train.py checkpoint (a dict with 'args' and 'state_dict')")
    args, state = checkpoint["args"], checkpoint["state_dict"]
    if not isinstance(args, argparse.Namespace):
        raise OfficialCheckpointError(f"{path}: 'args' is a {type(args).__name__}, not an argparse.Namespace")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{path}: 'state_dict' is not a flat dict of tensors")
    return vars(args), state


def config_from_args(args: dict[str, Any]) -> NVAEConfig:
    """Our NVAEConfig for an official checkpoint's `args`; refuses what our NVAE does not implement."""
    missing = [k for k in ("dataset", "arch_instance", "num_mixture_dec", *ARCH_FIELDS) if k not in args]
    if missing:
        raise OfficialCheckpointError(f"checkpoint args lack {missing}: not an NVAE checkpoint we know")
    if args["num_mixture_dec"] != 1:
        raise OfficialCheckpointError(
            f"num_mixture_dec={args['num_mixture_dec']}: a discretized logistic mixture decoder; only the Normal "
            "decoder (num_mixture_dec=1) VAEBM trains on is supported")
    if args["arch_instance"] != SUPPORTED_ARCH:
        raise OfficialCheckpointError(
            f"arch_instance={args['arch_instance']!r}: only {SUPPORTED_ARCH!r} cells are implemented")
    dataset = args["dataset"]
    if dataset == "mnist":
        raise OfficialCheckpointError("dataset='mnist': the official MNIST model decodes with a Bernoulli over one "
                                      "channel; only Normal-decoder datasets are supported")
    if dataset not in DATASETS:
        raise OfficialCheckpointError(f"dataset={dataset!r}: unknown image size and channels; known: "
                                      f"{sorted(DATASETS)}")
    if args["num_latent_scales"] == 1 and args["num_groups_per_scale"] == 1:
        raise OfficialCheckpointError("one latent scale with one group is NVAE's vanilla-VAE variant (no towers), "
                                      "which our NVAE does not implement")
    image_size, channels = DATASETS[dataset]
    try:
        return NVAEConfig(image_size=image_size, in_channels=channels, **{k: args[k] for k in ARCH_FIELDS})
    except (TypeError, ValueError) as err:
        raise OfficialCheckpointError(f"checkpoint args describe an NVAE we cannot build: {err}") from None


# ----------------------------------------------------------------------------------------------- the key map
# (our module, official module, plain): `plain` marks a weight-normalized conv of ours whose official counterpart has
# no weight normalization. Parameters and buffers keep their names below a module, except as `_module_pairs` says.
_Pair = tuple[str, str, bool]


def _cell_pairs(ours: str, theirs: str, cell: Cell) -> list[_Pair]:
    pairs: list[_Pair] = []
    if isinstance(cell.ops, InvertedResidual):  # official: [upsample,] BN, conv-BN-swish x2, conv, BN
        u = int(cell.ops.upsample)
        pairs += [(f"{ours}.ops.bn_in", f"{theirs}._ops.0.conv.{u}.bn", False),
                  (f"{ours}.ops.expand", f"{theirs}._ops.0.conv.{u + 1}.conv.0", True),
                  (f"{ours}.ops.bn_expand", f"{theirs}._ops.0.conv.{u + 1}.conv.1", False),
                  (f"{ours}.ops.depthwise", f"{theirs}._ops.0.conv.{u + 2}.conv.0", True),
                  (f"{ours}.ops.bn_depthwise", f"{theirs}._ops.0.conv.{u + 2}.conv.1", False),
                  (f"{ours}.ops.project", f"{theirs}._ops.0.conv.{u + 3}", False),
                  (f"{ours}.ops.bn_out", f"{theirs}._ops.0.conv.{u + 4}.bn", False)]
    else:  # two BN-Swish-conv ops
        for i in range(len(cell.ops)):
            pairs += [(f"{ours}.ops.{i}.bn", f"{theirs}._ops.{i}.bn_act", False),
                      (f"{ours}.ops.{i}.conv", f"{theirs}._ops.{i}.conv_0", False)]
    if isinstance(cell.skip, FactorizedReduce):
        pairs += [(f"{ours}.skip.convs.{j}", f"{theirs}.skip.conv_{j + 1}", False) for j in range(4)]
    elif isinstance(cell.skip, UpsampleSkip):
        pairs.append((f"{ours}.skip.conv", f"{theirs}.skip.1", False))
    if isinstance(cell.se, SqueezeExcitation):
        pairs += [(f"{ours}.se.fc1", f"{theirs}.se.se.0", False), (f"{ours}.se.fc2", f"{theirs}.se.se.2", False)]
    return pairs


def _flow_pairs(ours: str, theirs: str, cell: FlowCell) -> list[_Pair]:
    pairs: list[_Pair] = []
    for mine, official in (("forward_order", "cell1"), ("reverse_order", "cell2")):
        pairs += [(f"{ours}.{mine}.expand", f"{theirs}.{official}.conv.convz.0", False),
                  (f"{ours}.{mine}.depthwise", f"{theirs}.{official}.conv.convz.2", False),
                  (f"{ours}.{mine}.shift", f"{theirs}.{official}.mu.conv_0", False)]
    return pairs


def _module_pairs(model: NVAE) -> list[_Pair]:
    """Every module of ours that holds parameters or state, with its official counterpart."""
    pairs: list[_Pair] = [("", "", False), ("stem", "stem", False), ("enc0.1", "enc0.1", False),
                          ("image_head.1", "image_conditional.1", False)]  # "": the root's prior_ftr0
    for i, cell in enumerate(model.preprocess):
        pairs += _cell_pairs(f"preprocess.{i}", f"pre_process.{i}", cell)
    # Encoder tower, bottom-up: per group its cells, then its combiner (all groups but the last); a down cell after
    # every scale but the last. The decoder applies the combiners in the reverse order.
    groups_total = len(model.dec_combiners)
    t, combiner_at = 0, []
    for s, groups in enumerate(model.enc_scales):
        for g, cells in enumerate(groups):
            for c, cell in enumerate(cells):
                pairs += _cell_pairs(f"enc_scales.{s}.{g}.{c}", f"enc_tower.{t}", cell)
                t += 1
            if len(combiner_at) < groups_total - 1:
                combiner_at.append(t)
                t += 1
        if s < len(model.enc_down):
            pairs += _cell_pairs(f"enc_down.{s}", f"enc_tower.{t}", model.enc_down[s])
            t += 1
    pairs += [(f"enc_combiners.{l}.conv", f"enc_tower.{at}.conv", False) for l, at in enumerate(combiner_at[::-1])]
    # Per group, top-down: q's head, p's head (all but the top group), the flow cells.
    num_nf = model.config.num_nf
    for l in range(groups_total):
        pairs.append((f"posterior_heads.{l}", f"enc_sampler.{l}", False))
        if l > 0:
            pairs.append((f"prior_heads.{l - 1}.1", f"dec_sampler.{l - 1}.1", False))
        for n, cell in enumerate(model.flows[l]):
            pairs += _flow_pairs(f"flows.{l}.{n}", f"nf_cells.{l * num_nf + n}", cell)
    # Decoder tower, top-down: per group its cells (all but the top group) then its combiner; an up cell between
    # scales.
    t, up = 0, 0
    for l in range(groups_total):
        if l > 0:
            if model._scale_of_group[l] != model._scale_of_group[l - 1]:
                pairs += _cell_pairs(f"dec_up.{up}", f"dec_tower.{t}", model.dec_up[up])
                up, t = up + 1, t + 1
            for c, cell in enumerate(model.dec_cells[l - 1]):
                pairs += _cell_pairs(f"dec_cells.{l - 1}.{c}", f"dec_tower.{t}", cell)
                t += 1
        pairs.append((f"dec_combiners.{l}.conv", f"dec_tower.{t}.conv", False))
        t += 1
    for i, cell in enumerate(model.postprocess):
        pairs += _cell_pairs(f"postprocess.{i}", f"post_process.{i}", cell)
    return pairs


def official_key_map(model: NVAE) -> dict[str, tuple[str, bool]]:
    """our state-dict key -> (official key, plain) for each parameter and buffer of ours the official model has."""
    mapping: dict[str, tuple[str, bool]] = {}
    own = dict(model.named_modules())
    for ours, theirs, plain in _module_pairs(model):
        module = own[ours]
        names = [n for n, _ in module.named_parameters(recurse=False)] + \
                [n for n, _ in module.named_buffers(recurse=False) if n in module.state_dict()]
        for name in names:
            key = f"{ours}.{name}" if ours else name
            if plain and name == "log_weight_norm":
                mapping[key] = (f"{theirs}.weight", True)
            else:
                mapping[key] = (f"{theirs}.{name}" if theirs else name, False)
    return mapping


# Ours only: the spectral regularizer's power-iteration state (the official model keeps it outside its state dict).
_OURS_ONLY = ("spectral.",)


def convert_state_dict(model: NVAE, official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full state dict (in `model`'s dtype) from an official one; checks the mapping both ways: every official
    tensor is used (but the cached `*.weight_normalized` copies) and every tensor of ours is filled."""
    mapping = official_key_map(model)
    ours = model.state_dict()
    dtype = next(model.parameters()).dtype
    unmapped = [k for k in ours if k not in mapping and not k.startswith(_OURS_ONLY)]
    if unmapped:
        raise OfficialCheckpointError(f"no official counterpart for {len(unmapped)} of our tensors, "
                                      f"e.g. {unmapped[:5]}")
    missing = sorted({theirs for theirs, _ in mapping.values()} - official.keys())
    if missing:
        raise OfficialCheckpointError(f"the checkpoint lacks {len(missing)} tensors its args imply, e.g. {missing[:5]}")
    used = {theirs for theirs, _ in mapping.values()}
    unused = [k for k in official if k not in used and not k.endswith(".weight_normalized")]
    if unused:
        raise OfficialCheckpointError(f"{len(unused)} checkpoint tensors have no place in the NVAE its args describe, "
                                      f"e.g. {unused[:5]}")
    state = {}
    for key, value in ours.items():
        if key not in mapping:
            state[key] = value  # ours only: kept at init
            continue
        theirs, plain = mapping[key]
        source = official[theirs]
        if plain:
            source = WeightNormalized.log_norm_reproducing(source)  # our weight-normalized conv = their plain one
        if source.shape != value.shape:
            raise OfficialCheckpointError(f"{theirs} has shape {tuple(source.shape)} but our {key} is "
                                          f"{tuple(value.shape)}: the checkpoint's args do not describe its weights")
        state[key] = source.to(dtype) if value.is_floating_point() else source.to(value.dtype)
    return state


def nvae_from_official(args: dict[str, Any], official: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.float32) -> tuple[NVAE, NVAEConfig]:
    """Our NVAE (eval mode, on the CPU, in `dtype`) and its config from an official checkpoint's args and weights."""
    config = config_from_args(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = NVAE(config).to(dtype)
    model.load_state_dict(convert_state_dict(model, official), strict=True)
    return model.eval(), config


def load_official_nvae(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[NVAE, NVAEConfig]:
    """Our NVAE (eval mode, on the CPU, in `dtype`) and its config from an official NVAE checkpoint file.

    Raises `OfficialCheckpointError` (a ValueError) for files that pickle more than tensors and `argparse.Namespace`,
    for architectures our NVAE does not implement and for weights that do not match their args."""
    return nvae_from_official(*read_official_checkpoint(path), dtype=dtype)
