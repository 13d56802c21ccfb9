"""One linear layer of the embedded model's MLP ([2224 x 576] @ [576 x 1536], a training batch of 4 packed
rows) in the number formats a CPU can use for the frozen base: fp32, dynamic int8 (fbgemm), torch._int_mm,
bf16 and fp16. Same process, same run, so the ratios compare; absolute numbers depend on what else runs.

    python bench/cpu_matmul_kinds.py
"""

import time
import warnings

import torch

warnings.filterwarnings("ignore")
M, K, N = 2224, 576, 1536


def timed(fn, repeats=5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    torch.manual_seed(0)
    x, w = torch.randn(M, K), torch.randn(N, K)
    flops = 2 * M * K * N
    fp32 = timed(lambda: x @ w.t())
    print(f"fp32            {fp32 * 1e3:8.1f} ms  {flops / fp32 / 1e9:6.1f} GFLOP/s")
    layer = torch.nn.Linear(K, N, bias=False)
    layer.weight.data = w
    int8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8)
    dyn = timed(lambda: int8(x))
    print(f"int8 dinámico   {dyn * 1e3:8.1f} ms  {flops / dyn / 1e9:6.1f} GOP/s   ({fp32 / dyn:.2f}x fp32)")
    xi = torch.randint(-127, 127, (M, K), dtype=torch.int8)
    wi = torch.randint(-127, 127, (K, N), dtype=torch.int8)
    im = timed(lambda: torch._int_mm(xi, wi), 1)
    print(f"torch._int_mm   {im * 1e3:8.1f} ms  {flops / im / 1e9:6.1f} GOP/s   ({fp32 / im:.2f}x fp32)")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a, b = x.to(dtype), w.to(dtype)
        t = timed(lambda: a @ b.t(), 2)
        print(f"{name:15s} {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s ({fp32 / t:.2f}x fp32)")


if __name__ == "__main__":
    main()
