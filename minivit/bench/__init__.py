"""`minivit bench`: time a training step against the machine's matmul limit and against PyTorch eager.

A case is a model config, a batch size and a kind of step, all float32:

    training step = forward + softmax cross-entropy + backward + AdamW update   (weight decay 0.05, lr 1e-3)
    forward only  = vit_forward in evaluation mode

    mnist-tiny     28x28x1, patch 7, width 64, depth 4, heads 4, MLP 128, 10 classes, batch 128, training
    cifar-small    32x32x3, patch 4, width 192, depth 6, heads 3, MLP 768, 10 classes, batch 128, training
    vit-s16        224x224x3, ViT-S/16, 1000 classes, batch 8, training
    vit-b16-infer  224x224x3, ViT-B/16, 1000 classes, batch 8, forward only

What is reported per case:
- ms per step: median, min and max over `--steps` steps after `--warmup` steps; images per second.
- Matmul FLOPs per step, counted analytically (`matmul_flops`; a multiply-add is 2 FLOPs), the GFLOP/s achieved,
  and that rate as a fraction of the machine's float32 matmul rate (`matmul_peak`, one large square product timed
  in the same run, with the same threads).
- The GEMM floor: the time of exactly the step's matrix products (`matmul_shapes`: the same shapes, batch
  dimensions and transpositions) into preallocated outputs, each at the best of two ways NumPy can run it (plain
  np.matmul on BLAS's threads, or backend.matmul as the layers call it: large products split over the threads,
  one BLAS thread each), and the step's
  ratio to it. A step cannot be faster than its products; everything above the floor is elementwise work,
  copies, allocation and Python.
- Memory: the resident set size (RSS) of the process. Each framework of each case runs in its own process, so
  nothing pollutes the other. `base` is the RSS once parameters, optimizer state and the batch exist, before the
  first step; `peak` is the RSS high-water mark over the steps (Linux: VmHWM, reset after setup); `step` =
  peak - base is the memory a step needs (activations kept for backward, gradients, temporaries), which is what
  the comparison with PyTorch uses: their bases differ by the size of the libraries loaded.
- `--profile`: a few more steps with every `*_forward`, `*_backward` and `optimizer_step` of the package timed,
  each op's own time (its callees excluded), in ms per step.
- `--vs-torch` (PyTorch installed; never a dependency): the same model in PyTorch eager (torch_twin.py: explicit
  attention math, GELU tanh, LayerNorm eps 1e-6, torch.optim.AdamW with the same decay mask) with the same
  weights, timed the same way in its own process, the two processes taking turns (so drift on a shared machine
  hits both; a short pause between turns lets the idle one's threads go to sleep). A turn is one step when steps
  take 0.1 s or more; shorter steps go in turns of about half a second (at least five turns each), after one
  untimed step that wakes the threads and refills the caches the other process took (else a 30 ms step measures
  its cold start);
  then the logits and every gradient compared on one batch (max relative difference), and the ratio minivit/torch.

`--device gpu`: the same steps on CuPy (and PyTorch on CUDA), synchronized before every clock read. Memory is
device memory: base = bytes in use after setup, peak = the high-water mark of a step (CuPy's memory pool, recorded
by its allocator over one more step; PyTorch: memory_allocated, max_memory_allocated), step = peak - base. The GEMM
floor and the matmul rate are measured on the GPU with CuPy's matmul (cuBLAS), products queued back to back
between two synchronizations.

The FLOP formula (`cases.matmul_flops`). With R = B*N token rows, Np patches, P*P*C patch length and L blocks,
one forward pass costs

    F = 2 B Np (P*P*C) D                      patch embedding
      + L (2 R D 3D + 2 R D D + 2 R D M + 2 R M D)   qkv, proj, fc1, fc2   = L 2R (4D^2 + 2DM)
      + L (2 B nh N N hs + 2 B nh N N hs)            q k^T and A v          = L 4 B N^2 D
      + 2 B D K                                      head (2 B D rep + 2 B rep K with a pre-logits layer)

and a training step 3F: the backward pass does two products of the forward one's size for each forward product
(dx = dy w^T and dw = x^T dy; for attention dq, dk and dA, dv), the input gradient of the patch embedding
included (vit_backward returns dimages).

Stable numbers: run on an idle machine with `--threads` equal to the physical cores; the benchmark sets
OMP/OpenBLAS/MKL thread counts and OMP_WAIT_POLICY=PASSIVE in each worker process and keeps freed memory in the
process (backend.tune_allocator, glibc). OPENBLAS_CORETYPE forces an older BLAS kernel and slows everything:
the header names the kernel in use (with threadpoolctl installed). Repeat the run: medians of separate runs
differ by a few percent on a shared machine.

The rooms of this package, arrows one way (report -> timing -> worker -> runner, floor, profiler -> cases):
    cases.py       the cases, the FLOP formula, the matrix products of a step, the weights and the batch
    floor.py       the GEMM floor and the matmul rate
    runner.py      the minivit step of one case in one process, and the RSS probes
    torch_twin.py  the same model and step in PyTorch eager (imported only by a torch worker)
    profiler.py    --profile: wraps the package's functions while entered (it monkeypatches: kept apart)
    worker.py      the worker processes and their pipe protocol
    timing.py      one case: the workers take turns; memory, floor, profile and the torch check
    report.py      the table, --json and the command line (`python -m minivit.bench` runs report.main)
    loading.py     a separate benchmark: loading a ViT-B/16 .npz checkpoint and one forward pass
"""
from minivit.bench.report import add_bench_arguments, main, run_bench   # what minivit/cli.py calls
