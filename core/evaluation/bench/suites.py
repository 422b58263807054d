"""The measured loops, ours beside the official baseline (core.evaluation.bench.official), one `Row` each.

Our paths are the package's own entry points, without the DeepSpeed engine: stage 1 is `NVAEMethod.loss` + backward +
the method's Adamax; the stage-2 iteration is `VAEBMMethod.loss` (its negative phase runs
`core.sampling.langevin.run_langevin`) + backward + ClippedAdam; the Langevin chain is `run_langevin` on
`make_vaebm_potential`; sampling is `VAEBMModel.sample` (what launchers/sample.py calls per batch).

The paths of a loop are timed call by call in turn (core.evaluation.bench.measure.measure_group), so load from
other processes falls on both. Before timing, each suite runs both paths once on identical inputs with the Langevin noise switched off and
reports the largest relative difference of their losses / chain states / images (`agree`): the ratio compares two
implementations of the same arithmetic only when that number is at float rounding level.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass
from typing import Callable

import torch

from core.evaluation.bench.config import BenchConfig, BenchPreset
from core.evaluation.bench.measure import Timing, measure_group, peak_tflops, tensor_bytes
from core.evaluation.bench.official import (OfficialNVAEStep, official_langevin, official_sample,
                                            official_vaebm_iteration)

_PROGRESS = 0.1  # stage 1 is timed inside the KL warm-up (the balancer runs), as the first 30% of a run are


@dataclass
class Row:
    """One measured loop on one path."""

    suite: str  # stage1 | langevin | sample | data
    loop: str  # what one step is
    preset: str  # the shapes
    path: str  # ours | ours+compile | baseline
    batch: int  # images or chains per step
    unit: str  # what `throughput` counts per second
    throughput: float  # unit per second
    step_ms: float  # wall milliseconds per step (median call)
    step_ms_mean: float | None  # wall milliseconds per step (mean call)
    peak_mem_bytes: int | None  # CUDA max allocated (GPU) or process peak RSS (CPU); None: not measured
    peak_mem_kind: str  # what peak_mem_bytes measures
    gflop_per_step: float | None  # counted matmul/conv GFLOPs per step (forward and backward)
    pct_peak: float | None  # achieved FLOP/s as % of the device's peak; None where the peak is unknown
    ratio: float | None = None  # throughput / the baseline's throughput of the same loop
    agree: float | None = None  # max relative difference ours vs baseline on identical inputs, noise off
    graph_breaks: int | None = None  # compiled rows: torch._dynamo graph breaks met while compiling
    note: str = ""  # anything the numbers need to be read with


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rel(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor | list[torch.Tensor]) -> float:
    """max |a - b| / max |b| over tensors (or lists of tensors, jointly)."""
    a = [a] if isinstance(a, torch.Tensor) else a
    b = [b] if isinstance(b, torch.Tensor) else b
    num = max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))
    den = max(float(y.double().abs().max()) for y in b)
    return num / max(den, 1e-30)


def _graph_breaks() -> dict[str, int]:
    """torch._dynamo's graph-break counts so far, by reason."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def _breaks_since(before: dict[str, int]) -> tuple[int, str]:
    """(breaks met since `before`, their distinct reasons in one line)."""
    now = _graph_breaks()
    new = {k: v - before.get(k, 0) for k, v in now.items() if v > before.get(k, 0)}
    reasons = "; ".join(f"{n}x {k.splitlines()[0][:120]}" for k, n in new.items())
    return sum(new.values()), reasons


class Bench:
    """Builds the models of one preset and measures its suites."""

    def __init__(self, config: BenchConfig):
        from core.models.energy import EnergyNetConfig
        from core.models.nvae_config import NVAEConfig
        from core.training.config import load_preset

        self.cfg = config
        self.preset: BenchPreset = config.resolved_preset()
        p = self.preset
        want = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(want)
        self.nvae_cfg = load_preset("nvae", p.nvae, NVAEConfig)
        extra = {} if p.energy_channels is None else {"base_channels": p.energy_channels}
        self.energy_cfg = load_preset("energy", p.energy, EnergyNetConfig, image_size=self.nvae_cfg.image_size,
                                      in_channels=self.nvae_cfg.in_channels, **extra)
        self._backbone = None

    # ------------------------------------------------------------------------------------------------ helpers
    def _gen(self, device: torch.device | str, stream: int) -> torch.Generator:
        from core.seeding import derive_seed

        return torch.Generator(device=device).manual_seed(derive_seed(self.cfg.seed, 0xBE4C, stream))

    def _data(self, batch: int) -> torch.Tensor:
        x = torch.rand((batch, *self.nvae_cfg_shape()), generator=self._gen("cpu", 1)) * 2 - 1
        return x.to(self.device)

    def nvae_cfg_shape(self) -> tuple[int, int, int]:
        c = self.nvae_cfg
        return (c.in_channels, c.image_size, c.image_size)

    def _row(self, suite: str, loop: str, path: str, batch: int, unit: str, per_step: float, t: Timing,
             precision: str, units_per_step: int = 1, **extra) -> Row:
        """A row from a timing of one call that does `units_per_step` steps of `per_step` units each."""
        step_s = t.step_s / units_per_step
        flops = None if t.flops is None else t.flops / units_per_step
        peak = peak_tflops(self.device, precision, self.cfg.peak_tflops)
        pct = None if flops is None or peak is None else 100.0 * flops / step_s / (peak * 1e12)
        return Row(suite=suite, loop=loop, preset=self.cfg.preset, path=path, batch=batch, unit=unit,
                   throughput=per_step / step_s, step_ms=1e3 * step_s,
                   step_ms_mean=1e3 * t.mean_s / units_per_step, peak_mem_bytes=t.peak_bytes,
                   peak_mem_kind=t.peak_kind, gflop_per_step=None if flops is None else flops / 1e9,
                   pct_peak=pct, **extra)

    def _measure_group(self, fns: dict[str, Callable[[], object]],
                       resident: dict[str, Callable[[], int]]) -> dict[str, Timing]:
        """The paths of one loop, timed in turn; FLOPs on the eager paths (compiled ones run the same math)."""
        c = self.cfg
        flops = {n: c.flops and not n.endswith("+compile") for n in fns}
        return measure_group(fns, self.device, c.steps, c.warmup, resident, flops)

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _compile(self, fn):
        return torch.compile(fn, mode=self.cfg.compile_mode)

    @staticmethod
    def _with_ratios(rows: list[Row], agree: float | None) -> list[Row]:
        base = {r.loop: r.throughput for r in rows if r.path == "baseline"}
        for r in rows:
            r.ratio = r.throughput / base[r.loop] if r.loop in base else None
            if r.path != "baseline":
                r.agree = agree
        return rows

    # ---------------------------------------------------------------------------------------------- stage 1
    def _our_nvae(self):
        from core.methods.base import MethodContext
        from core.methods.nvae import NVAEMethod, NVAEMethodConfig

        ctx = MethodContext(device=self.device, seed=self.cfg.seed, rank=0, total_nimg=1000)
        method = NVAEMethod(NVAEMethodConfig(nvae=self.nvae_cfg), ctx)  # seeds torch with ctx.seed, builds NVAE
        return method, method.make_optimizer(method.param_groups()), int(_PROGRESS * ctx.total_nimg)

    def _official_nvae(self):
        from core.methods.nvae import NVAEMethodConfig
        from core.models.nvae import NVAE
        from core.objectives.elbo import kl_balance_weights

        torch.manual_seed(self.cfg.seed)  # the same initial weights as NVAEMethod's
        model = NVAE(self.nvae_cfg).to(self.device)
        o = NVAEMethodConfig().optim
        opt = torch.optim.Adamax(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)
        alpha = kl_balance_weights(model.latent_shapes()).to(self.device)
        return OfficialNVAEStep(model, opt, alpha, NVAEMethodConfig().objective, _PROGRESS)

    def check_stage1(self) -> float:
        """Both NVAE steps from identical weights, data and posterior noise: relative difference of the losses and
        of the weights after the step."""
        x = self._data(self.preset.stage1_batch)
        method, opt, nimg = self._our_nvae()
        torch.manual_seed(self.cfg.seed + 1)
        ours, _ = method.loss(method.model, {"x": x}, nimg)
        opt.zero_grad(set_to_none=True)
        ours.backward()
        opt.step()
        step = self._official_nvae()
        torch.manual_seed(self.cfg.seed + 1)
        theirs = step(x)
        diff = max(_rel(ours.detach(), theirs),
                   _rel([p.detach() for p in method.model.parameters()],
                        [p.detach() for p in step.model.parameters()]))
        del method, opt, step
        _free(self.device)
        return diff

    def stage1(self) -> list[Row]:
        c, b = self.cfg, self.preset.stage1_batch
        agree = self.check_stage1() if c.check and c.baseline else None
        x = self._data(b)
        loop = "NVAE train step"
        method, opt, nimg = self._our_nvae()

        def ours(loss_fn=lambda batch: method.loss(method.model, batch, nimg)) -> None:
            with self._autocast():
                loss, _ = loss_fn({"x": x})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns = {"ours": ours}
        resident = {"ours": lambda: tensor_bytes(method.model, opt)}
        if c.baseline:
            step = self._official_nvae()
            fns = {"baseline": lambda: step(x), **fns}
            resident["baseline"] = lambda: tensor_bytes(step.model, step.optimizer)
        if c.compile:
            compiled = self._compile(lambda batch: method.loss(method.model, batch, nimg))
            fns["ours+compile"] = lambda: ours(compiled)
            resident["ours+compile"] = resident["ours"]
        before = _graph_breaks()
        timings = self._measure_group(fns, resident)
        rows = [self._row("stage1", loop, path, b, "images/s", b, t, "fp32" if path == "baseline" else c.precision)
                for path, t in timings.items() if path != "ours+compile"]
        if c.compile:
            breaks, reasons = _breaks_since(before)
            t = dataclasses.replace(timings["ours+compile"], flops=timings["ours"].flops)
            rows.append(self._row("stage1", loop, "ours+compile", b, "images/s", b, t, c.precision,
                                  graph_breaks=breaks, note=f"GFLOP counted on the eager path. {reasons}".strip()))
        del method, opt, fns, resident
        _free(self.device)
        return self._with_ratios(rows, agree)

    # --------------------------------------------------------------------------------------------- stage 2
    def backbone(self):
        """The frozen NVAE of stage 2 (eval mode, no parameter gradients), shared by both paths."""
        if self._backbone is None:
            from core.methods.bundles import freeze
            from core.models.nvae import NVAE

            torch.manual_seed(self.cfg.seed)
            self._backbone = freeze(NVAE(self.nvae_cfg), self.device)
        return self._backbone

    def _vaebm_config(self, for_check: bool = False):
        """Our VAEBM settings. For the agreement checks the Langevin noise is off and the chains run in fp32
        whatever `precision` says, so the checks compare arithmetic, not rounding or random streams."""
        from core.methods.vaebm import SamplerConfig, VAEBMConfig
        from core.sampling.langevin import LangevinConfig

        p = self.preset
        autocast = "bf16" if self.cfg.precision == "bf16" and not for_check else None
        noise_scale = 0.0 if for_check else 1.0
        langevin = LangevinConfig(num_steps=p.langevin_steps, step_size=p.step_size, noise_scale=noise_scale,
                                  autocast=autocast)
        sampler = SamplerConfig(langevin=langevin, target=self.cfg.target, use_mean=p.use_mean,
                                test_steps=p.test_steps)
        return VAEBMConfig(energy=self.energy_cfg, sampler=sampler)

    def _our_vaebm(self, x_pos: torch.Tensor, for_check: bool = False):
        from core.methods.base import MethodContext
        from core.methods.vaebm import VAEBMMethod

        ctx = MethodContext(device=self.device, seed=self.cfg.seed, rank=0, total_nimg=1000)
        method = VAEBMMethod(self._vaebm_config(for_check), ctx, backbone=self.backbone())
        method.setup({"x": x_pos}, fresh=True)  # weight-norm data-dependent init
        return method, method.make_optimizer(method.param_groups())

    def _official_energy(self, state: dict[str, torch.Tensor]):
        from core.models.energy import EnergyNet

        energy = EnergyNet(self.energy_cfg).to(self.device)
        energy.load_state_dict(state)
        o = self._vaebm_config().optim
        opt = torch.optim.Adam(energy.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                               weight_decay=o.weight_decay)
        return energy, opt

    def _official_starts(self, batch: int, iteration: int):
        """Chain starts on the CPU, copied over (train_VAEBM.py draws `torch.Tensor(...).normal_().cuda()`)."""
        gen = self._gen("cpu", 100 + iteration)
        eps_x, eps_z = self.backbone().sample_noise(batch, generator=gen, device=torch.device("cpu"))
        return eps_x.to(self.device), [e.to(self.device) for e in eps_z]

    def check_langevin(self) -> float:
        """The Langevin chain and two stage-2 iterations on identical inputs, noise off: relative difference of the
        chain states, of the losses and of the energy weights afterwards."""
        from core.methods.vaebm import CastingEnergy
        from core.methods.potentials import make_vaebm_potential
        from core.sampling.langevin import LangevinConfig, run_langevin
        from core.sampling.rng import rank_generator

        p, bb = self.preset, self.backbone()
        x_pos = self._data(p.stage2_batch)
        method, opt = self._our_vaebm(x_pos, for_check=True)
        init = {k: v.detach().clone() for k, v in method.energy.state_dict().items()}
        energy, their_opt = self._official_energy(init)
        # the chain alone
        eps_x, eps_z = self._official_starts(p.stage2_batch, 0)
        potential = make_vaebm_potential(bb, CastingEnergy(method.energy), mode=self.cfg.target)
        ours = run_langevin(potential, [eps_x, *eps_z],
                            LangevinConfig(num_steps=p.langevin_steps, step_size=p.step_size, noise_scale=0.0))
        theirs_x, theirs_z = official_langevin(bb, energy, eps_x, eps_z, p.langevin_steps, p.step_size,
                                               self.cfg.target, noise_scale=0.0)
        energy.zero_grad(set_to_none=True)
        diffs = [_rel(ours.state, [theirs_x, *theirs_z])]
        # training iterations: the method draws its starts from its own per-iteration stream; feed those to both
        for it in range(2):
            gen = rank_generator(self.cfg.seed, 0, it, "cpu", stream=0)
            sx, sz = bb.sample_noise(p.stage2_batch, generator=gen, device=torch.device("cpu"))
            loss, _ = method.loss(method.energy, {"x": x_pos}, nimg=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            their_loss = official_vaebm_iteration(
                bb, energy, their_opt, x_pos, sx.to(self.device), [e.to(self.device) for e in sz],
                p.langevin_steps, p.step_size, method.config.objective.alpha_s, self.cfg.target,
                use_mean=p.use_mean, noise_scale=0.0)
            diffs.append(_rel(loss.detach(), their_loss))
        diffs.append(_rel([t.detach() for t in method.energy.parameters()], [t.detach() for t in energy.parameters()]))
        del method, opt, energy, their_opt
        _free(self.device)
        return max(diffs)

    def langevin(self) -> list[Row]:
        """Two loops: the Langevin chain of a training iteration (chain-steps/s) and the whole iteration."""
        from core.methods.vaebm import CastingEnergy
        from core.methods.potentials import make_vaebm_potential
        from core.sampling.langevin import LangevinConfig, run_langevin

        c, p, bb = self.cfg, self.preset, self.backbone()
        b, k = p.stage2_batch, p.langevin_steps
        agree = self.check_langevin() if c.check and c.baseline else None
        x_pos = self._data(b)
        chain, iteration = f"Langevin chain ({k} steps)", f"stage-2 iteration ({k} LD steps)"
        method, opt = self._our_vaebm(x_pos)
        init = {key: v.detach().clone() for key, v in method.energy.state_dict().items()}
        eps_x, eps_z = self._official_starts(b, 0)
        lcfg = LangevinConfig(num_steps=k, step_size=p.step_size,
                              autocast="bf16" if c.precision == "bf16" else None)
        our_gen = self._gen(self.device, 3)
        potential = make_vaebm_potential(bb, CastingEnergy(method.energy), mode=c.target)

        def our_iteration():
            loss, _ = method.loss(method.energy, {"x": x_pos}, nimg=0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        chains = {"ours": lambda: run_langevin(potential, [eps_x, *eps_z], lcfg, generator=our_gen)}
        iterations = {"ours": our_iteration}
        resident = {"ours": lambda: tensor_bytes(bb, method.energy, opt)}
        if c.baseline:
            energy, their_opt = self._official_energy(init)
            gen = self._gen(self.device, 2)

            def their_chain():
                official_langevin(bb, energy, eps_x, eps_z, k, p.step_size, c.target, generator=gen)
                energy.zero_grad()

            counter = iter(range(10**9))

            def their_iteration():
                sx, sz = self._official_starts(b, next(counter))
                official_vaebm_iteration(bb, energy, their_opt, x_pos, sx, sz, k, p.step_size,
                                         method.config.objective.alpha_s, c.target, use_mean=p.use_mean,
                                         generator=gen)

            chains = {"baseline": their_chain, **chains}
            iterations = {"baseline": their_iteration, **iterations}
            resident["baseline"] = lambda: tensor_bytes(bb, energy, their_opt)
        if c.compile:
            compiled = self._compile(potential)
            chains["ours+compile"] = lambda: run_langevin(compiled, [eps_x, *eps_z], lcfg, generator=our_gen)
            resident["ours+compile"] = resident["ours"]
        before = _graph_breaks()
        timings = self._measure_group(chains, resident)
        rows = [self._row("langevin", chain, path, b, "chain-steps/s", b, t,
                          "fp32" if path == "baseline" else c.precision, units_per_step=k)
                for path, t in timings.items() if path != "ours+compile"]
        if c.compile:
            breaks, reasons = _breaks_since(before)
            t = dataclasses.replace(timings["ours+compile"], flops=timings["ours"].flops)
            rows.append(self._row("langevin", chain, "ours+compile", b, "chain-steps/s", b, t, c.precision,
                                  units_per_step=k, graph_breaks=breaks,
                                  note=f"potential compiled; GFLOP counted on the eager path. {reasons}".strip()))
        rows += [self._row("langevin", iteration, path, b, "images/s", b, t,
                           "fp32" if path == "baseline" else c.precision)
                 for path, t in self._measure_group(iterations, resident).items()]
        del method, opt, chains, iterations, resident
        _free(self.device)
        return self._with_ratios(rows, agree)

    # ---------------------------------------------------------------------------------------------- sampling
    def _sampling_model(self, energy_state: dict[str, torch.Tensor], for_check: bool = False):
        from core.methods.bundles import freeze
        from core.methods.vaebm import VAEBMModel
        from core.models.energy import EnergyNet

        energy = EnergyNet(self.energy_cfg)
        energy.load_state_dict(energy_state)
        sampler = self._vaebm_config(for_check).sampler
        return VAEBMModel(self.backbone(), freeze(energy, self.device), sampler)

    def _energy_state(self) -> dict[str, torch.Tensor]:
        """A data-initialized energy network's weights (what a trained model would hold, shape-wise)."""
        from core.models.energy import EnergyNet, data_dependent_init

        torch.manual_seed(self.cfg.seed)
        energy = EnergyNet(self.energy_cfg).to(self.device)
        data_dependent_init(energy, self._data(self.preset.stage2_batch), init_scale=self.energy_cfg.init_scale)
        return {k: v.detach().clone() for k, v in energy.state_dict().items()}

    def check_sample(self, state: dict[str, torch.Tensor]) -> float:
        """Both samplers from the same generator seed, noise off: relative difference of the images."""
        p = self.preset
        model = self._sampling_model(state, for_check=True)
        ours = model.sample(p.sample_batch, self._gen(self.device, 4)).images
        theirs = official_sample(self.backbone(), model.energy_net, p.sample_batch, p.test_steps, p.step_size,
                                 self.cfg.target, generator=self._gen(self.device, 4), noise_scale=0.0)
        return _rel(ours, theirs)

    def sample(self) -> list[Row]:
        c, p = self.cfg, self.preset
        state = self._energy_state()
        agree = self.check_sample(state) if c.check and c.baseline else None
        loop, b = f"test-time sampling ({p.test_steps} LD steps + decode)", p.sample_batch
        model = self._sampling_model(state)
        our_gen = self._gen(self.device, 6)
        fns = {"ours": lambda: model.sample(b, our_gen)}
        if c.baseline:
            gen = self._gen(self.device, 5)
            fns = {"baseline": lambda: official_sample(self.backbone(), model.energy_net, b, p.test_steps,
                                                       p.step_size, c.target, generator=gen), **fns}
        resident = {n: (lambda: tensor_bytes(self.backbone(), model.energy_net)) for n in fns}
        rows = [self._row("sample", loop, path, b, "images/s", b, t, "fp32" if path == "baseline" else c.precision)
                for path, t in self._measure_group(fns, resident).items()]
        del model, fns
        _free(self.device)
        return self._with_ratios(rows, agree)

    # -------------------------------------------------------------------------------------------------- data
    def data(self) -> list[Row]:
        from core.evaluation.bench.data import run_data

        rows = []
        for name, label, fmt, rate in run_data(self.cfg.data):
            b = self.cfg.data.batch_size
            rows.append(Row(suite="data", loop=f"loader {name} {label} {fmt}", preset="photos256", path="ours",
                            batch=b, unit="images/s", throughput=rate, step_ms=1e3 * b / rate, step_ms_mean=None,
                            peak_mem_bytes=None,
                            peak_mem_kind="n/a", gflop_per_step=None, pct_peak=None))
        return rows

    def run(self) -> list[Row]:
        suites = ["stage1", "langevin", "sample", "data"] if self.cfg.suite == "all" else [self.cfg.suite]
        rows: list[Row] = []
        for suite in suites:
            rows.extend(getattr(self, suite)())
        return rows
