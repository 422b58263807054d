"""The Langevin step loop never synchronises the host with the device.

On a GPU every `.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.cpu()` or data-dependent shape (nonzero, boolean
masking) of a device tensor waits for the device. On the CPU they are visible at two levels, both recorded here while
real chains run: tensor methods through a TorchFunctionMode (`tolist`, `item`, `__bool__`, `__float__`, `cpu`, ...)
and aten ops through a TorchDispatchMode (`_local_scalar_dense`, `is_nonzero`, `nonzero`, `masked_select`, boolean
`index`). The detector is itself checked on code that does synchronise.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from core.methods.lebm import posterior_potential, posterior_start, prior_potential
from core.methods.potentials import join_state, make_vaebm_potential
from core.models.lebm_nets import GeneratorConfig, LatentEBMModel, PriorEBMConfig
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.sampling.langevin import ChainEnergyTrace, LangevinConfig, SplitPotential, run_langevin

_SYNC_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_static", "masked_select", "unique_dim",
             "_unique2", "argwhere"}


class SyncCounter:
    """Records every host-device synchronisation point hit while active (use as a context manager)."""

    def __init__(self):
        self.hits: list[str] = []
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in _SYNC_METHODS:
                    counter.hits.append(f"Tensor.{func.__name__}")
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in _SYNC_OPS:
                    counter.hits.append(f"aten.{name}")
                elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                             for i in (args[1] if len(args) > 1 else [])):
                    counter.hits.append("aten.index(bool mask)")
                return func(*args, **(kwargs or {}))

        self._modes = (Functions(), Ops())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def test_the_detector_sees_every_kind_of_synchronisation():
    t = torch.randn(5)
    for fn in (lambda: t.sum().item(), lambda: float(t[0]), lambda: bool((t > 0).any()), lambda: t.tolist(),
               lambda: t[t > 0], lambda: torch.nonzero(t), lambda: int(t.argmax()), lambda: t.cpu()):
        with SyncCounter() as c:
            fn()
        assert c.hits, fn
    with SyncCounter() as c:
        torch.where(t > 0, t, 0.0).sum() / (t > 0).sum().clamp(min=1)
    assert c.hits == []


def _vaebm():
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=4, hidden=32, num_layers=3)).eval()
    energy = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 1))
    return vae, energy


def test_vaebm_chains_with_resets_snapshots_and_autocast_do_not_synchronise():
    vae, energy = _vaebm()
    calls = {"n": 0}
    base = make_vaebm_potential(vae, energy)

    def poisoned(state):  # chain 1 goes NaN at the third evaluation: the reset path runs
        calls["n"] += 1
        t = base.terms(state)
        bad = torch.where(torch.arange(len(t.total)) == 1, float("nan"), 1.0) if calls["n"] == 3 else 1.0
        return t._replace(total=t.total * bad)

    state = join_state(*vae.sample_noise(16, generator=torch.Generator().manual_seed(1)))
    trace = ChainEnergyTrace()
    for cfg in (LangevinConfig(num_steps=5, step_size=1e-2, record_every=2),
                LangevinConfig(num_steps=4, step_size=1e-2, autocast="bf16"),
                LangevinConfig(num_steps=4, step_size=1e-2, reset_nonfinite=False)):
        calls["n"] = 0
        with SyncCounter() as c:
            result = run_langevin(SplitPotential(poisoned), state, cfg, torch.Generator().manual_seed(2))
            metrics = result.metrics()
            trace.add(result)
        assert c.hits == [], (cfg, c.hits)
        # the counters are device tensors; read here, at "report time"
        assert result.num_nonfinite == 1 and float(metrics["langevin/nonfinite"]) == 1.0
        assert result.nonfinite.tolist() == [i == 1 for i in range(16)]


def test_lebm_prior_and_posterior_chains_do_not_synchronise():
    torch.manual_seed(0)
    model = LatentEBMModel(GeneratorConfig(arch="dcgan16", out_channels=1, ngf=4, z_dim=3, top_dim=2, layers=2),
                           PriorEBMConfig(hidden=8))
    eps = model.sample_noise(8, generator=torch.Generator().manual_seed(4))
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    cfg = LangevinConfig(num_steps=3, step_size=0.01)
    start = posterior_start(model, eps)
    with SyncCounter() as c:
        run_langevin(prior_potential(model), eps, cfg, torch.Generator().manual_seed(5))
        run_langevin(posterior_potential(model, x), start, cfg, torch.Generator().manual_seed(7))
    assert c.hits == []


def test_lebm_f_curves_stay_on_the_device_until_read():
    from core.methods.lebm import _Curves
    curves = _Curves(limit=4)
    values = [(torch.tensor(float(i)), torch.tensor(-float(i))) for i in range(6)]
    with SyncCounter() as c:
        for i, (pos, neg) in enumerate(values[:3]):
            curves.add(8 * i, pos, neg)
    assert c.hits == []  # the training step never waits for the curve
    for i, (pos, neg) in enumerate(values[3:], start=3):  # the 4th pending step flushes
        curves.add(8 * i, pos, neg)
    state = curves.state_dict()  # flushes the last two: the 5th point halves the curve, the 6th is appended
    assert state == {"nimg": [0, 16, 32, 40], "f_pos": [0.0, 2.0, 4.0, 5.0], "f_neg": [0.0, -2.0, -4.0, -5.0]}
