"""`make gpu-check`: everything that needs one CUDA GPU, within 8 minutes, with the Python packages the
machine already has (not this project's pins): tests/test_cuda.py (bf16 logits parity with transformers,
greedy generate equal to transformers, graph and compiled decode steps equal to eager ones, chunked
log-probs, ICRL steps with NCCL at world size 1 under DDP and under --fsdp, an --fsdp resume against the run
straight through, a checkpoint round trip through transformers, host syncs of the update loop), then the GPU
sampler benchmark (tests/bench_gpu.py, Qwen3-0.6B and 4B shapes, batch 1/16/64/256, with the bandwidth
floor; short: ours and transformers, one timed run each). The memory measurements are apart, in `make
gpu-memory` (tests/memory_gpu.py): figures to quote rather than checks, and this budget is nearly spent.

Without a GPU it says so and exits with status 2: nothing was checked.

    python3 tests/gpu_check.py            # or: make gpu-check [GPU_PY=/path/to/python]
"""
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
TESTS_S = 330          # tests/test_cuda.py; the benchmark gets what is left
# The benchmark short: with --configs 0.6B,4B, the compiled peer's compiles and best-of-2 took past 8 minutes
# (README); `python3 tests/bench_gpu.py --configs 0.6B,4B` runs it whole.
BENCH_FLAGS = ("--peers", "ours,hf", "--repeats", "1")


def versions():
    found, missing = {}, []
    for name in ("torch", "transformers", "safetensors", "tqdm", "pytest"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            missing.append(name)
    return found, missing


def run_without_pytest(deadline):
    """tests/test_cuda.py's functions called in order, each with a fresh tmp_path (pytest absent)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_cuda
    failed = 0
    for name in [n for n in dir(test_cuda) if n.startswith("test_")]:
        if time.monotonic() > deadline:
            print(f"  {name}: not run, out of time")
            failed += 1
            continue
        fn = getattr(test_cuda, name)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                fn(Path(tmp)) if fn.__code__.co_argcount else fn()
            print(f"  {name}: passed")
        except Exception:
            failed += 1
            print(f"  {name}: FAILED\n{traceback.format_exc()}")
    return failed == 0


def nvidia_devices():
    """NVIDIA GPUs the machine has, whatever Python sees: `nvidia-smi -L` lines ([] without a driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.stdout.splitlines() if line.startswith("GPU")] if out.returncode == 0 else []


def main():
    start = time.monotonic()
    found, missing = versions()
    print(f"gpu-check: python {sys.version.split()[0]} ({sys.executable}); "
          + ", ".join(f"{k} {v}" for k, v in found.items()) + (f"; missing: {', '.join(missing)}" if missing else ""))
    gpus = nvidia_devices()
    if not gpus and not Path("/dev/nvidia0").exists():
        print("gpu-check: NO GPU on this machine (nvidia-smi lists none, no /dev/nvidia0). Nothing was checked; "
              "run `make gpu-check` on a machine with a CUDA GPU.")
        return 2
    print("gpu-check: " + "; ".join(gpus or ["/dev/nvidia0 present"]))
    if "torch" not in found:
        print("gpu-check: torch is not installed for this Python: nothing was checked (GPU_PY=... picks another)")
        return 2
    import torch
    if not torch.cuda.is_available():
        print(f"gpu-check: NO GPU: torch {torch.__version__} sees no CUDA device (torch.version.cuda = "
              f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES = {os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
              "Nothing was checked; run this on a machine with a CUDA GPU.")
        return 2
    needed = [m for m in ("transformers", "safetensors", "tqdm") if m not in found]
    if needed:
        print(f"gpu-check: missing packages {needed}: pip install them (the versions the image prefers), then rerun")
        return 2
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2 is public from torch 2.6)
    except ImportError:
        print(f"gpu-check: torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2): "
              "icrl.py --fsdp needs torch >= 2.6")
        return 2
    print(f"gpu-check: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
          f"{torch.cuda.device_count()} visible; budget {BUDGET_S} s")

    print("\n== tests/test_cuda.py")
    if "pytest" in found:
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider",
               "--durations=0", str(ROOT / "tests" / "test_cuda.py")]  # --durations=0: each test's time
        try:
            tests_ok = subprocess.run(cmd, cwd=ROOT, timeout=TESTS_S).returncode == 0
        except subprocess.TimeoutExpired:
            print(f"gpu-check: tests/test_cuda.py ran past {TESTS_S} s")
            tests_ok = False
    else:
        print("(pytest is not installed: running the test functions directly)")
        tests_ok = run_without_pytest(start + TESTS_S)

    print("\n== tests/bench_gpu.py (Qwen3-0.6B and 4B shapes, bfloat16)")
    left = int(BUDGET_S - (time.monotonic() - start)) - 5
    bench_ok = False
    if left < 60:
        print(f"gpu-check: only {left} s left of {BUDGET_S} s: benchmark not run")
    else:
        try:
            bench_ok = subprocess.run([sys.executable, str(ROOT / "tests" / "bench_gpu.py"), "--configs", "0.6B,4B",
                                       *BENCH_FLAGS], cwd=ROOT, timeout=left).returncode == 0
        except subprocess.TimeoutExpired:
            print(f"gpu-check: the benchmark ran past the {left} s left")
    took = time.monotonic() - start
    print(f"\ngpu-check: tests {'passed' if tests_ok else 'FAILED'}, benchmark {'done' if bench_ok else 'NOT done'}, "
          f"{took:.0f} s")
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
