"""GPU datasheet figures: dense peak FLOP/s per precision, HBM and link bandwidths, keyed by the exact
name ``torch.cuda.get_device_name()`` (and ``nvidia-smi -L``) reports.

Peaks are dense (no 2:4 sparsity), from NVIDIA's datasheets of each part; fp16 equals bf16 on all of
them. ``tf32`` is the tensor-core rate of fp32 matmuls with TF32 allowed (``train.tf32``), ``fp32`` the
plain CUDA-core rate. Bandwidths are bytes/s: ``nvlink`` is the per-GPU NVLink bandwidth in one direction
(half the datasheet's bidirectional total), ``pcie`` likewise for the host link. A name not listed gets no
MFU (``train.peak_tflops`` gives one); substrings are never matched, because the PCIe and NVL parts of a
chip share its name's prefix but not its clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    part: str
    """What the datasheet calls it."""
    names: tuple[str, ...]
    """Exact device names of this part."""
    bf16: float
    """Dense bf16/fp16 tensor-core peak, FLOP/s."""
    tf32: float
    fp32: float
    memory_gib: float
    hbm: float
    """Memory bandwidth, bytes/s."""
    nvlink: float
    """NVLink bandwidth per GPU, one direction, bytes/s (0: none; then the GPUs of a node talk over PCIe)."""
    pcie: float
    """Host link per GPU, one direction, bytes/s."""

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s of ``precision`` (bf16, fp16, tf32 or fp32)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        return self.bf16 if precision in ("bf16", "fp16") else getattr(self, precision)


T = 1e12
G = 1e9
_GEN5, _GEN4 = 64 * G, 32 * G  # PCIe x16, one direction
# One chip's compute under several memories and links: the parts below differ from these only where
# they say (dataclasses.replace).
_H100_SXM = DeviceSpec(part="H100 SXM5 80GB", names=("NVIDIA H100 80GB HBM3",), bf16=989.4 * T, tf32=494.7 * T,
                       fp32=66.9 * T, memory_gib=80, hbm=3.35e12, nvlink=450 * G, pcie=_GEN5)
_H100_NVL = DeviceSpec(part="H100 NVL 94GB", names=("NVIDIA H100 NVL",), bf16=835.5 * T, tf32=417.5 * T,
                       fp32=60.0 * T, memory_gib=94, hbm=3.9e12, nvlink=300 * G, pcie=_GEN5)
_A100_SXM = DeviceSpec(part="A100 SXM4 80GB", names=("NVIDIA A100-SXM4-80GB",), bf16=312 * T, tf32=156 * T,
                       fp32=19.5 * T, memory_gib=80, hbm=2.039e12, nvlink=300 * G, pcie=_GEN4)
DEVICES: tuple[DeviceSpec, ...] = (
    _H100_SXM,
    DeviceSpec(part="H100 PCIe 80GB", names=("NVIDIA H100 PCIe",), bf16=756.5 * T, tf32=378.0 * T,
               fp32=51.2 * T, memory_gib=80, hbm=2.0e12, nvlink=300 * G, pcie=_GEN5),
    _H100_NVL,
    replace(_H100_SXM, part="H800 SXM5 80GB", names=("NVIDIA H800",), nvlink=200 * G),
    replace(_H100_SXM, part="H200 SXM 141GB", names=("NVIDIA H200",), memory_gib=141, hbm=4.8e12),
    replace(_H100_NVL, part="H200 NVL 141GB", names=("NVIDIA H200 NVL",), memory_gib=141, hbm=4.8e12,
            nvlink=450 * G),
    replace(_H100_SXM, part="GH200 96GB", names=("NVIDIA GH200 480GB",), memory_gib=96, hbm=4.0e12, pcie=450 * G),
    _A100_SXM,
    replace(_A100_SXM, part="A100 SXM4 40GB", names=("NVIDIA A100-SXM4-40GB",), memory_gib=40, hbm=1.555e12),
    replace(_A100_SXM, part="A100 PCIe 80GB", names=("NVIDIA A100 80GB PCIe",), hbm=1.935e12),
    replace(_A100_SXM, part="A100 PCIe 40GB", names=("NVIDIA A100-PCIE-40GB",), memory_gib=40, hbm=1.555e12),
    DeviceSpec(part="L40S 48GB", names=("NVIDIA L40S",), bf16=362.05 * T, tf32=183.0 * T, fp32=91.6 * T,
               memory_gib=48, hbm=0.864e12, nvlink=0.0, pcie=_GEN4),
    DeviceSpec(part="L4 24GB", names=("NVIDIA L4",), bf16=121.0 * T, tf32=60.0 * T, fp32=30.3 * T,
               memory_gib=24, hbm=0.3e12, nvlink=0.0, pcie=_GEN4),
    DeviceSpec(part="A10 24GB", names=("NVIDIA A10",), bf16=125.0 * T, tf32=62.5 * T, fp32=31.2 * T,
               memory_gib=24, hbm=0.6e12, nvlink=0.0, pcie=_GEN4),
)
_BY_NAME = {name: spec for spec in DEVICES for name in spec.names}
# `gptforge plan --device` names: the part without spaces, lower case ("h100-sxm5-80gb" ...), and short forms.
ALIASES = {spec.part.lower().replace(" ", "-"): spec for spec in DEVICES} | {
    "h100": _BY_NAME["NVIDIA H100 80GB HBM3"], "h100-sxm": _BY_NAME["NVIDIA H100 80GB HBM3"],
    "h100-pcie": _BY_NAME["NVIDIA H100 PCIe"], "h100-nvl": _BY_NAME["NVIDIA H100 NVL"],
    "h200": _BY_NAME["NVIDIA H200"], "h200-nvl": _BY_NAME["NVIDIA H200 NVL"],
    "a100": _BY_NAME["NVIDIA A100-SXM4-80GB"], "a100-40gb": _BY_NAME["NVIDIA A100-SXM4-40GB"],
    "l40s": _BY_NAME["NVIDIA L40S"],
}


def device_spec(device_name: str | None) -> DeviceSpec | None:
    """The spec of the device named exactly ``device_name`` (None for an unknown name or no GPU)."""
    return _BY_NAME.get(device_name) if device_name else None


def compute_precision(precision: str, tf32: bool) -> str:
    """The precision matmuls run in: ``train.precision``, except fp32 with TF32 allowed runs as tf32."""
    return "tf32" if precision == "fp32" and tf32 else precision
