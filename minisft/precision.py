"""Which number format the matmuls of a run compute in, chosen in ONE place. Lesson 6 prints it.

The weights stay float32 whatever is chosen (train.build_model says why); what changes is the
format of the matmuls under torch.autocast, and whether the loss is scaled:

    --dtype float32    no autocast: every matmul in float32
    --dtype bfloat16   autocast to bfloat16: float32's range (8 exponent bits), 8 bits of mantissa
    --dtype float16    autocast to float16 + loss scaling (torch.amp.GradScaler): 11 bits of mantissa,
                       but 5 exponent bits -- a gradient below ~6e-8 becomes 0 in float16. The loss is
                       multiplied by a large scale before backward, so small gradients stay representable,
                       and divided out again before clipping; a step whose gradients overflowed to inf is
                       skipped (not applied) and the scale halves. train.sft_step counts those skips.
    --dtype auto       what is correct and fast on the device (`choose` below):
                         CUDA, compute capability >= 8.0 (A100, L4, H100, RTX 30xx+): bfloat16
                         CUDA below 8.0 (T4 is 7.5, V100 7.0): float16 + loss scaling -- these GPUs
                           have float16 tensor cores but no bfloat16 ones. torch.cuda.is_bf16_supported()
                           is no guide: it says True on a T4, where bfloat16 is emulated and slow.
                         CPU: float32 (no bfloat16 matmul units on most CPUs; autocast only adds casts)
                         MPS (Apple GPUs): float32, see docs/gpu.md "Precision per device"

One function decides (`choose`); train.py, the watch's evaluation and the bench all ask it.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
_AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The choice: `dtype` of the autocast (None: plain float32), `scaled` (loss scaling, float16
    only), on `device_type` ("cuda", "cpu", "mps"), and `reason`, one line that says why."""
    dtype: torch.dtype | None
    scaled: bool
    device_type: str
    reason: str

    @property
    def name(self):
        """"float32", "bfloat16" or "float16": what --dtype would spell."""
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]

    def autocast(self):
        """A fresh context for one forward pass: autocast to `dtype`, or nothing for float32."""
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def scaler(self, saved=None):
        """A torch.amp.GradScaler for a float16 run (from its state_dict `saved`, a checkpoint's), else None."""
        if not self.scaled:
            return None
        scaler = torch.amp.GradScaler(self.device_type)
        if saved:
            scaler.load_state_dict(saved)
        return scaler

    def line(self):
        """The console line that opens a run: the format and why."""
        scaling = " + loss scaling (GradScaler)" if self.scaled else ""
        autocast = f"{self.name} autocast{scaling}" if self.dtype is not None else "float32"
        return f"precision: {autocast} on {self.device_type} ({self.reason})"


def choose(dtype_flag, device):
    """--dtype (auto | float32 | bfloat16 | float16) and the device ("cuda:0", "cpu", ...) -> Precision."""
    if dtype_flag not in DTYPES:
        raise ValueError(f"--dtype={dtype_flag!r}: expected one of {', '.join(DTYPES)}")
    device_type = torch.device(device).type
    if dtype_flag != "auto":
        return Precision(_AUTOCAST[dtype_flag], dtype_flag == "float16", device_type, "--dtype " + dtype_flag)
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if (major, minor) >= (8, 0):
            return Precision(torch.bfloat16, False, "cuda", f"compute capability {major}.{minor} >= 8.0: "
                                                            f"bfloat16 tensor cores")
        return Precision(torch.float16, True, "cuda", f"compute capability {major}.{minor} < 8.0: float16 "
                                                      f"tensor cores, no bfloat16 ones")
    if device_type == "mps":
        # Autocast on MPS exists (float16; bfloat16 from macOS 14), but this project has never measured
        # an Apple GPU: float32 is the correct choice until it has (docs/gpu.md, "Precision per device").
        return Precision(None, False, "mps", "Apple GPU: float32 until fp16 on MPS is measured")
    return Precision(None, False, device_type, "the CPU gains nothing from autocast")


def bf16_base(base_dtype_flag, precision):
    """--base-dtype (auto | float32 | bfloat16) -> True when LoRA's frozen base is kept in bfloat16.
    auto: on CUDA when the matmuls run in bfloat16 anyway (not on a float16 GPU, where it is emulated)."""
    return base_dtype_flag == "bfloat16" or (base_dtype_flag == "auto" and precision.device_type == "cuda"
                                             and precision.dtype == torch.bfloat16)
