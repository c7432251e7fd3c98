"""fp32 batch-1 products on the default model's shapes, four kernels: which one reaches the memory bandwidth?

    .venv/bin/python benchmarks/gemv_kernels.py
"""
import time, statistics, torch
import torch.nn.functional as F
torch.manual_seed(0)
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
Ws = [torch.randn(o, i) for o, i in shapes]
WTs = [w.t().contiguous() for w in Ws]
xs = {i: torch.randn(1, i) for i in (576, 1536)}
def t(f, n=15):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return statistics.median(ts) * 1e3
nbytes = sum(w.numel() * 4 for w in Ws)
cands = {
  "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in Ws],
  "torch.mv": lambda: [torch.mv(w, xs[w.shape[1]][0]) for w in Ws],
  "x @ Wt (d_in, d_out)": lambda: [xs[w.shape[0]] @ w for w in WTs],
  "mul+sum": lambda: [(w * xs[w.shape[1]]).sum(1) for w in Ws],
}
for name, f in cands.items():
    ms = t(f); print(f"{name:24s} {ms:6.1f} ms  {nbytes/ms/1e6:5.1f} GB/s")
x = torch.randn(1, 576)
for k in (1, 2):
    torch.set_num_threads(k); print("threads", k, "F.linear 3072x576 x30:", round(t(lambda: [F.linear(x, Ws[2]) for _ in range(30)]), 2), "ms")
