"""Options of `launchers/bench.py` and the presets it measures (the papers' shapes, and a tiny one for CI)."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.training.config import ConfigError, load_preset, preset_names

SUITES = ("stage1", "langevin", "sample", "data", "all")
TARGETS = ("exact", "reference")


@dataclass(frozen=True)
class BenchPreset:
    """The shapes of one paper setting: which NVAE and energy network, and the per-GPU batches and chain lengths."""

    nvae: str  # conf/nvae/<name>.yaml
    energy: str  # conf/energy/<name>.yaml
    energy_channels: int | None  # energy base width; None: the energy preset's (Table 7: 128 CIFAR-10, else 64)
    stage1_batch: int  # NVAE training images per GPU and step
    stage2_batch: int  # VAEBM data images (= chains) per GPU and iteration (vaebm.md Table 8)
    langevin_steps: int  # training chain length (Table 8)
    step_size: float  # Langevin step size (Table 8)
    test_steps: int  # test-time chain length (vaebm.md App. E: 16 / 20 / 20 / 24)
    sample_batch: int  # chains per sampling batch
    use_mean: bool = False  # CD negatives are decoder means (the official --use_mu_cd of the preset's experiment)


PRESET_GROUP = "bench_preset"  # the presets are conf/bench_preset/<name>.yaml


def bench_preset(name: str) -> BenchPreset:
    """The preset conf/bench_preset/<name>.yaml as a typed BenchPreset (KeyError: no such preset)."""
    return load_preset(PRESET_GROUP, name, BenchPreset)


@dataclass
class DataBenchConfig:
    """The data suite: loader throughput of each backend x stored size x format on photos256 crops."""

    sizes: list[int] = field(default_factory=lambda: [32, 256])  # stored image sides
    formats: list[str] = field(default_factory=lambda: ["png", "jpg"])  # stored encodings
    backends: list[str] = field(default_factory=lambda: ["torch", "dali", "dali-reader"])  # what to time
    resize: int | None = 64  # also time load-time resize of larger stored images to this side (None: skip)
    num_samples: int = 512  # photos256 crops per dataset (the stream cycles through them)
    batch_size: int = 64  # per batch
    workers: int = 2  # torch DataLoader workers / DALI threads
    seconds: float = 3.0  # timed duration per row, after warmup
    warmup_batches: int = 3  # untimed batches first (worker start, pipeline build)
    num_bits: int = 8  # quantization, as training would use
    dali_device: str = "auto"  # auto | cpu | gpu
    cache_dir: str | None = None  # where bench datasets are built (default: <dataset cache>/bench)


@dataclass
class BenchConfig:
    """Options of launchers/bench.py (key=value); None fields take the preset's value."""

    suite: str = "all"  # stage1 | langevin | sample | data | all
    preset: str = "tiny"  # the shapes measured: conf/bench_preset/<name>.yaml
    nvae_preset: str | None = None  # conf/nvae/<name>.yaml instead of the preset's
    energy_preset: str | None = None  # conf/energy/<name>.yaml instead of the preset's
    energy_channels: int | None = None  # energy base width instead of the preset's
    batch: int | None = None  # stage-1 and stage-2 batch per device instead of the preset's
    sample_batch: int | None = None  # chains per sampling batch instead of the preset's
    langevin_steps: int | None = None  # training chain length instead of the preset's
    test_steps: int | None = None  # sampling chain length instead of the preset's
    target: str = "exact"  # Langevin target of both paths: exact (vaebm.md Eq. 9, our default) | reference (official)
    steps: int = 5  # timed calls per row
    warmup: int = 1  # untimed calls first (allocation, kernel selection, compilation)
    precision: str = "fp32"  # our path: fp32 | bf16 (autocast); the baseline is always fp32
    compile: bool = False  # also time our stage-1 step and Langevin chain under torch.compile
    compile_mode: str | None = None  # torch.compile mode (None: default; e.g. max-autotune-no-cudagraphs)
    baseline: bool = True  # also time the official loops' arithmetic (the ratio column needs it)
    check: bool = True  # compare ours with the baseline on identical inputs first (the `agree` column)
    flops: bool = True  # count FLOPs per step with torch's FLOP counter
    peak_tflops: float | None = None  # the device's peak TFLOP/s for %peak (None: the built-in table; CPUs: n/a)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # weights, data and chain noise
    out: str = "bench.json"  # the JSON report (rows, device, config)
    data: DataBenchConfig = field(default_factory=DataBenchConfig)  # suite=data
    dry_run: bool = False  # print the resolved config and exit

    def validate(self) -> None:
        def req(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        req(self.suite in SUITES, f"suite must be one of {'|'.join(SUITES)}, got {self.suite!r}")
        names = preset_names(PRESET_GROUP)
        req(self.preset in names, f"preset must be one of {'|'.join(names)}, got {self.preset!r}")
        req(self.target in TARGETS, f"target must be one of {'|'.join(TARGETS)}, got {self.target!r}")
        req(self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}")
        req(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        req(self.steps >= 1 and self.warmup >= 0, "steps must be >= 1 and warmup >= 0")
        for name in ("batch", "sample_batch", "langevin_steps", "test_steps", "energy_channels"):
            value = getattr(self, name)
            req(value is None or value >= 1, f"{name} must be >= 1")
        req(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops must be > 0")
        d = self.data
        req(not set(d.backends) - {"torch", "dali", "dali-reader"}, f"data.backends: torch|dali|dali-reader, "
            f"got {d.backends}")
        req(not set(d.formats) - {"png", "jpg"}, f"data.formats: png|jpg, got {d.formats}")
        req(d.seconds > 0 and d.batch_size > 0 and d.workers >= 0, "data.seconds, data.batch_size > 0, "
            "data.workers >= 0")

    def resolved_preset(self) -> BenchPreset:
        """The preset with this config's overrides applied."""
        import dataclasses

        p = bench_preset(self.preset)
        return dataclasses.replace(
            p, nvae=self.nvae_preset or p.nvae, energy=self.energy_preset or p.energy,
            energy_channels=self.energy_channels or p.energy_channels,
            stage1_batch=self.batch or p.stage1_batch, stage2_batch=self.batch or p.stage2_batch,
            langevin_steps=self.langevin_steps or p.langevin_steps, test_steps=self.test_steps or p.test_steps,
            sample_batch=self.sample_batch or p.sample_batch)
