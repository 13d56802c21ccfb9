"""The decode-step matmuls of the embedded model (a few rows times SmolLM2-135M's weight matrices), by row count,
with the threads torch was given. Shows where batched decoding on a shared CPU loses its time: with 2 threads on
2 busy cores, any matmul of 2 or more rows waits for the second thread to be scheduled (one time slice), while a
single row goes through a path that does not wait.

    python bench/cpu_small_matmul.py                     # torch's default threads
    OMP_NUM_THREADS=1 python bench/cpu_small_matmul.py
"""

import time

import torch


def main():
    torch.manual_seed(0)
    print(f"hilos: {torch.get_num_threads()}")
    for k, n in ((576, 1536), (1536, 576), (576, 576), (576, 49152)):
        weight = torch.randn(n, k)
        cells = []
        for rows in (1, 2, 8, 10, 16):
            x = torch.randn(rows, k)
            for _ in range(3):
                torch.nn.functional.linear(x, weight)
            repeats = 20
            start = time.perf_counter()
            for _ in range(repeats):
                torch.nn.functional.linear(x, weight)
            cells.append(f"{rows} filas {(time.perf_counter() - start) / repeats * 1e6:8.0f} us")
        print(f"[{k} -> {n}]  " + " | ".join(cells))


if __name__ == "__main__":
    main()
