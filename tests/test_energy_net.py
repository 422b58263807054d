"""Energy networks: Table 7 structure, per-sample energies, activations, spectral penalty, data-dependent init."""
import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from core.dist import all_reduce_sum
from core.models.energy import EnergyNet, EnergyNetConfig, data_dependent_init, wn_layers
from core.models.energy_blocks import Swish
from core.models.layers import WNLinear
from core.models.layers import WNConv2d
from presets import energy_preset

# vaebm.md Table 7, transcribed in absolute widths (README n_channel: 128 for CIFAR-10, 64 otherwise):
# stem width, then (width, down) per ResBlock.
TABLE7 = {
    "cifar10": (128, [(128, True), (128, False), (256, True), (256, False), (256, True), (256, False)]),
    "celeba64": (64, [(64, True), (128, True), (128, False), (128, True), (256, False), (256, True), (256, False)]),
    "lsun_church64": (64, [(64, True), (64, False), (128, True), (128, False), (128, False), (128, True),
                           (256, False), (256, False), (256, True), (256, False)]),
    "celebahq256": (64, [(64, True), (64, False), (128, True), (128, True), (128, False), (256, True), (256, False),
                         (256, True), (256, False), (512, True), (512, False)]),
}
# The official code's nets (VAEBM ebm_models.py, EBM_CelebA64 / EBM_CelebA256): (width, down-samples) per block.
OFFICIAL = {
    "celeba64_official": (64, [(64, True), (64, False), (128, True), (128, False), (128, True), (256, False),
                               (256, True), (256, False)]),
    "celebahq256_official": (64, [(64, True), (64, False), (128, True), (128, False), (128, True), (128, False),
                                  (256, True), (256, False), (256, True), (256, False), (512, True), (512, False)]),
}
RESOLUTION = {"cifar10": 32, "celeba64": 64, "lsun_church64": 64, "celebahq256": 256, "celeba64_official": 64,
              "celebahq256_official": 256}


def _structure(net: EnergyNet):
    blocks = [(b.conv2.out_channels, b.down) for b in net.blocks]
    return net.stem.out_channels, blocks


@pytest.mark.parametrize("name", sorted({**TABLE7, **OFFICIAL}))
def test_presets_match_table7_and_run_at_their_resolution(name):
    cfg = energy_preset(name)
    assert cfg.image_size == RESOLUTION[name]
    assert cfg.swish == ("swish_official" if name in OFFICIAL else "swish")
    meta = cfg.image_size == 256  # a 256x256 forward on CPU is slow: check shapes on the meta device
    with torch.device("meta" if meta else "cpu"):
        net = EnergyNet(cfg)
        x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
        features = []
        net.blocks[-1].register_forward_hook(lambda m, i, o: features.append(o.shape))
        energy = net(x)
    stem, blocks = _structure(net)
    assert (stem, blocks) == {**TABLE7, **OFFICIAL}[name]
    assert energy.shape == (2,)
    assert net.head.in_features == blocks[-1][0] and net.head.out_features == 1
    downs = sum(d for _, d in blocks)
    assert features[0][2:] == (cfg.image_size // 2 ** downs,) * 2 == (4, 4)  # Table 7 nets all end at 4x4
    # shortcut: identity unless the width changes or the block down-samples (then a 1x1 conv)
    c_in = stem
    for block, (c_out, down) in zip(net.blocks, blocks):
        assert (block.skip is None) == (c_in == c_out and not down)
        c_in = c_out
    if not meta:
        assert torch.isfinite(energy).all()


def test_mlp_preset_and_config_from_dict():
    net = EnergyNet(energy_preset("mlp"))
    assert net(torch.randn(5, 2)).shape == (5,)
    assert len(net.hidden_layers) == 3 and all(isinstance(m, WNLinear) for m in net.hidden_layers)
    cfg = energy_preset("celeba64", base_channels=8, swish="swish_official")
    assert (cfg.arch, cfg.base_channels, cfg.image_size, cfg.swish) == ("celeba64", 8, 64, "swish_official")
    with pytest.raises(KeyError):
        energy_preset("cifar10", n_channel=3)
    with pytest.raises(ValueError):
        EnergyNet(EnergyNetConfig(arch="cifar10", image_size=20))  # 3 down-samplings need a multiple of 8
    with pytest.raises(ValueError):
        EnergyNet(energy_preset("cifar10", base_channels=4))(torch.randn(1, 3, 64, 64))  # wrong resolution


@pytest.mark.parametrize("name", ["cifar10", "mlp"])
def test_energy_of_a_sample_does_not_depend_on_the_batch(name):
    cfg = energy_preset(name, base_channels=8) if name != "mlp" else energy_preset("mlp", hidden=16)
    net = EnergyNet(cfg)
    x = torch.randn(6, 2) if name == "mlp" else torch.rand(6, 3, 32, 32) * 2 - 1
    data_dependent_init(net, x)
    batch = net(x)
    alone = torch.cat([net(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    shuffled = net(torch.cat([x[3:], torch.randn_like(x[:3])]))  # other batch-mates, same samples
    torch.testing.assert_close(shuffled[:3], batch[3:], rtol=1e-5, atol=1e-5)


def test_swish_variants():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(Swish("swish")(x), x * torch.sigmoid(x))
    torch.testing.assert_close(Swish("swish_official")(x), x * torch.sigmoid(x) / 1.1)
    with pytest.raises(ValueError):
        Swish("relu")


@pytest.mark.parametrize("variant,scale", [("swish", 1.0), ("swish_official", 1 / 1.1)])
def test_network_applies_the_configured_activation(variant, scale):
    net = EnergyNet(energy_preset("mlp", hidden=8, num_layers=1, swish=variant))
    x = torch.randn(4, 2)
    layer = net.hidden_layers[0]
    h = F.linear(x, layer.normalized_weight(), layer.bias)
    expected = F.linear(h * torch.sigmoid(h) * scale, net.head.normalized_weight(), net.head.bias).squeeze(1)
    torch.testing.assert_close(net(x), expected)


def test_spectral_penalty_covers_every_conv_and_is_differentiable():
    net = EnergyNet(energy_preset("celeba64", base_channels=4))
    convs = [m for m in net.modules() if isinstance(m, WNConv2d)]
    # stem + 2 per block + one 1x1 shortcut per block that changes width or down-samples
    assert len(convs) == 1 + 2 * 7 + 5
    assert net.spectral._layers == convs
    for _ in range(10):
        penalty = net.spectral_penalty()
    exact = sum(torch.linalg.matrix_norm(c.normalized_weight().detach().reshape(c.out_channels, -1), 2) for c in convs)
    torch.testing.assert_close(penalty.detach(), exact, rtol=2e-2, atol=0)
    penalty.backward()
    assert net.stem.log_weight_norm.grad is not None and net.head.weight.grad is None  # the head is not penalized
    assert "spectral.u0" in net.state_dict()  # power-iteration vectors are checkpointed


def _wn_outputs(net, x):
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for m in wn_layers(net)]
    net(x)
    for h in hooks:
        h.remove()
    return outputs


@pytest.mark.parametrize("name", ["lsun_church64", "mlp"])
def test_data_dependent_init_standardizes_every_wn_layer(name):
    if name == "mlp":
        net, x = EnergyNet(energy_preset("mlp", hidden=32)), torch.randn(64, 2) * 3 + 1
    else:
        net, x = EnergyNet(energy_preset(name, base_channels=4)), torch.rand(4, 3, 64, 64) * 2 - 1
    before = _wn_outputs(net, x)
    assert any(o.transpose(0, 1).reshape(o.shape[1], -1).std(dim=1).sub(1).abs().max() > 0.3 for o in before)
    data_dependent_init(net, x)
    outputs = _wn_outputs(net, x)
    assert len(outputs) == len(wn_layers(net)) == (1 + 2 * 10 + 5 + 1 if name != "mlp" else 3 + 1)
    for out in outputs:  # pre-activation of every WN layer (head included): per-channel mean 0, variance 1
        per_channel = out.transpose(0, 1).reshape(out.shape[1], -1).double()
        torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(out.shape[1], dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(per_channel.var(dim=1, unbiased=False), torch.ones(out.shape[1],
                                   dtype=torch.float64), atol=1e-3, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_batch() -> torch.Tensor:
    # the two halves differ in distribution, so averaging per-rank moments would give a different init
    gen = torch.Generator().manual_seed(7)
    first = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    second = (torch.rand(5, 3, 32, 32, generator=gen) * 0.5 + 0.3).clamp(-1, 1)
    return torch.cat([first, second])


def _tiny_cifar() -> EnergyNetConfig:
    return energy_preset("cifar10", base_channels=4)


def _init_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different random V per rank: the caller makes them rank 0's first
        net = EnergyNet(_tiny_cifar())
        for t in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(t.data, src=0)
        x = _init_batch()
        shard = x[:3] if rank == 0 else x[3:]  # unequal halves: counts must be summed over ranks too
        data_dependent_init(net, shard, reduce=all_reduce_sum)
        torch.save(net.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_dependent_init_over_two_ranks_equals_single_process_on_full_batch(tmp_path):
    mp.spawn(_init_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    torch.manual_seed(100)  # rank 0's seed
    single = EnergyNet(_tiny_cifar())
    data_dependent_init(single, _init_batch())
    reference = single.state_dict()
    for key, value in reference.items():
        if key.startswith("spectral."):
            continue  # power-iteration vectors are broadcast by the caller too but are not part of the init
        assert torch.equal(r0[key], r1[key]), key  # bit-identical across ranks
        torch.testing.assert_close(r0[key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.manual_seed(100)
    untouched = EnergyNet(_tiny_cifar()).state_dict()
    assert not torch.equal(r0["stem.log_weight_norm"], untouched["stem.log_weight_norm"])  # the init did run
    assert torch.equal(r0["stem.weight"], untouched["stem.weight"])  # directions V: rank 0's, unchanged


def test_data_dependent_init_sums_moments_only_through_reduce():
    """Every cross-rank statistic goes through `reduce`: a reduce that doubles (two identical ranks) leaves the init
    unchanged, and each WN layer reduces twice (sums and counts, then centred squares)."""
    torch.manual_seed(0)
    cfg = energy_preset("mlp", hidden=16)
    x = torch.randn(32, 2)
    single, doubled = EnergyNet(cfg), EnergyNet(cfg)
    doubled.load_state_dict(single.state_dict())
    data_dependent_init(single, x)
    calls = []
    data_dependent_init(doubled, x, reduce=lambda t: calls.append(t.dtype) or t * 2)
    assert calls == [torch.float64] * 2 * len(wn_layers(doubled))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(doubled.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", [*sorted(TABLE7), "mlp"])
def test_num_wn_layers_and_their_order_match_the_network(name):
    """`num_wn_layers` (what init_scales is validated against) counts what EnergyNet builds, and `wn_layers` lists
    them in the order the forward pass reaches them (the order of init_scales)."""
    cfg = energy_preset(name, hidden=8) if name == "mlp" else energy_preset(name, base_channels=2)
    with torch.device("meta"):
        net = EnergyNet(cfg)
        x = torch.empty(1, 2) if name == "mlp" else torch.empty(1, 3, cfg.image_size, cfg.image_size)
    layers = wn_layers(net)
    assert cfg.num_wn_layers() == len(layers)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, i: seen.append(m)) for m in layers]
    net(x)
    for h in hooks:
        h.remove()
    assert [id(m) for m in seen] == [id(m) for m in layers]
    assert dataclasses.replace(cfg, weight_norm=False).num_wn_layers() == 0


def test_init_scales_are_validated_against_the_layers():
    assert energy_preset("mlp", num_layers=2, init_scales=[3.0, 1.0, 0.2]).init_scales == [3.0, 1.0, 0.2]
    with pytest.raises(ValueError, match="3 weight-normalized layers, got 2"):
        energy_preset("mlp", num_layers=2, init_scales=[3.0, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        energy_preset("mlp", num_layers=2, init_scales=[3.0, 0.0, 0.2])
    with pytest.raises(ValueError, match="weight-normalized layers"):
        energy_preset("cifar10", base_channels=4, init_scales=[1.0])
    n = energy_preset("cifar10").num_wn_layers()
    assert n == 1 + 2 * 6 + 3 + 1  # stem, two convs per block, three 1x1 shortcuts (Table 7 down blocks), head
    assert energy_preset("cifar10", init_scales=[0.5] * n).init_scales == [0.5] * n


def test_per_layer_init_scales_set_each_layer_std():
    torch.manual_seed(0)
    net = EnergyNet(energy_preset("mlp", hidden=64, init_scales=[8.0, 1.0, 1.0, 0.2]))
    x = torch.randn(2048, 2) * 3
    data_dependent_init(net, x, init_scale=0.7)  # the config's per-layer scales take precedence
    outputs = _wn_outputs(net, x)
    for out, scale in zip(outputs, [8.0, 1.0, 1.0, 0.2]):
        torch.testing.assert_close(out.double().std(dim=0, unbiased=False), torch.full((out.shape[1],), scale,
                                   dtype=torch.float64), rtol=1e-3, atol=0)
        torch.testing.assert_close(out.double().mean(dim=0), torch.zeros(out.shape[1], dtype=torch.float64),
                                   atol=1e-4 * scale, rtol=0)


@torch.no_grad()
def _former_layer_scaled_init(net: EnergyNet, x_batch: torch.Tensor, scales: list[float], eps: float = 1e-6) -> None:
    """Verbatim arithmetic of the per-layer init the 2-D protocol used before EnergyNetConfig.init_scales existed
    (single process, MLP only): the reference the config path must reproduce bit for bit."""
    def make_hook(scale: float):
        def hook(layer, inputs):
            v = layer.weight / (layer._direction_norm(layer.weight) + 1e-5)
            y = F.linear(inputs[0], v)
            y = y.movedim(-1, 0).reshape(y.shape[-1], -1).double()
            first = torch.cat([y.sum(dim=1), torch.tensor([float(y.shape[1])], dtype=torch.float64)])
            mean = first[:-1] / first[-1]
            var = ((y - mean[:, None]) ** 2).sum(dim=1) / first[-1]
            inv_std = scale / torch.sqrt(var + eps)
            layer.log_weight_norm.copy_(torch.log(inv_std).reshape(layer.log_weight_norm.shape))
            layer.bias.copy_(-mean * inv_std)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(s)) for m, s in zip(wn_layers(net), scales)]
    net(x_batch)
    for handle in handles:
        handle.remove()


def test_init_scales_reproduce_the_former_per_layer_init_bit_for_bit():
    scales = [8.0, 1.0, 1.0, 0.2]  # the 2-D protocol's layout (conf/experiment/vaebm/ll2d.yaml)
    x = torch.randn(1024, 2, generator=torch.Generator().manual_seed(6)) * 3
    torch.manual_seed(5)
    reference = EnergyNet(EnergyNetConfig(arch="mlp", data_dim=2, hidden=256, num_layers=3))
    torch.manual_seed(5)
    net = EnergyNet(EnergyNetConfig(arch="mlp", data_dim=2, hidden=256, num_layers=3, init_scales=scales))
    _former_layer_scaled_init(reference, x, scales)
    data_dependent_init(net, x, init_scale=net.config.init_scale)
    for key, value in reference.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_conf_presets_are_diffs_over_the_defaults():
    """conf/energy/<name>.yaml holds only what differs from EnergyNetConfig's defaults, and cifar10 is the defaults."""
    import pathlib

    import yaml

    assert energy_preset("cifar10") == EnergyNetConfig()
    defaults = dataclasses.asdict(EnergyNetConfig())
    files = sorted((pathlib.Path(__file__).resolve().parents[1] / "conf" / "energy").glob("*.yaml"))
    assert {p.stem for p in files} == {*TABLE7, *OFFICIAL, "mlp"}
    for path in files:
        diff = yaml.safe_load(path.read_text()) or {}
        assert all(defaults[k] != v for k, v in diff.items()), f"{path.name} repeats a default"
    with pytest.raises(KeyError, match="unknown energy preset"):
        energy_preset("cifar100")


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_energy_reads_pixels_in_fp32(autocast):
    """Two images that differ by 5e-4 near 0.5 (below bf16's 2^-8 spacing there) are one image once cast to bf16;
    the energy's first layer reads fp32 pixels, so a bf16 network (or an fp32 one under bf16 autocast) still tells
    them apart, and its first layer's output matches the fp32 convolution of the fp32 pixels with its own weights."""
    torch.manual_seed(0)
    cfg = EnergyNetConfig(arch="cifar10", image_size=32, base_channels=8)
    net = EnergyNet(cfg).eval()
    if not autocast:
        net = net.to(torch.bfloat16)
    x = torch.full((1, 3, 32, 32), 0.5005)
    x2 = x.clone()
    x2[..., 16, 16] += 5e-4
    assert torch.equal(x.bfloat16(), x2.bfloat16())  # the two images are one image in bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        stem = net.stem(x2)
        assert not torch.equal(net.stem(x), stem), "the first layer saw bf16-rounded pixels"
    x_grad = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        net(x_grad).sum().backward()
    assert x_grad.grad.dtype == torch.float32 and x_grad.grad.abs().sum() > 0  # Langevin's gradient in fp32
    w = net.stem.normalized_weight().float()
    want = F.conv2d(x2, w, net.stem.bias.float(), padding=1)
    assert stem.dtype == (torch.float32 if autocast else torch.bfloat16)
    torch.testing.assert_close(stem.float(), want.to(stem.dtype).float(), rtol=0, atol=0)


def test_mlp_energy_first_layer_reads_fp32_inputs():
    net = EnergyNet(EnergyNetConfig(arch="mlp", data_dim=2, hidden=16, num_layers=2)).to(torch.bfloat16)
    x = torch.tensor([[0.5005, 0.25]])
    x2 = x + torch.tensor([[5e-4, 0.0]])
    assert torch.equal(x.bfloat16(), x2.bfloat16())
    with torch.no_grad():
        assert not torch.equal(net.hidden_layers[0](x), net.hidden_layers[0](x2))
