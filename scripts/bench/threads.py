"""Thread policies on a busy machine: a small training-step loop, idle and beside one CPU-bound process, per policy.

Each policy runs in a fresh interpreter (OpenMP reads its settings when torch loads it), first on the idle machine,
then with one competing `python -c "while True: pass"` process, started here and stopped by its PID after.

    .venv/bin/python scripts/bench/threads.py                 # every policy, 20 steps each
    .venv/bin/python scripts/bench/threads.py --steps 40 --policies default,llava

The `llava` policy is `llava.runtime.configure_threads()`, what every entry point applies (docs/Performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# name -> (environment added, Python run before torch is imported, threads set after)
POLICIES = {
    "default": ({}, "", None),
    "cores-1": ({}, "", "cores-1"),
    "passive-env": ({"OMP_WAIT_POLICY": "PASSIVE"}, "", None),
    "passive-inproc": ({}, "import os; os.environ['OMP_WAIT_POLICY'] = 'PASSIVE'", None),
    "gomp-spin0": ({"GOMP_SPINCOUNT": "0"}, "", None),
    # bounded spinning (libgomp's default is 300000 spins): between passive and torch's default
    "gomp-spin10k": ({"GOMP_SPINCOUNT": "10000"}, "", None),
    "gomp-spin100k": ({"GOMP_SPINCOUNT": "100000"}, "", None),
    "llava": ({}, "from llava.runtime import configure_threads; configure_threads()", None),
}

WORKLOAD = r"""
{prelude}
import json, os, sys, time
import torch
from torch import nn
if {threads!r} == "cores-1":
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
model = nn.Sequential(nn.TransformerEncoder(layer, 4), nn.Linear(256, 300))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(4, 96, 256)
y = torch.randint(0, 300, (4, 96))
def step():
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range({steps}):
    step()
print(json.dumps({{"per_step": (time.perf_counter() - start) / {steps}, "threads": torch.get_num_threads()}}))
"""


def run_policy(name: str, steps: int) -> dict:
    env_add, prelude, threads = POLICIES[name]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LLAVA_THREADS")
    }
    env.update(env_add)
    code = WORKLOAD.format(prelude=prelude, threads=threads, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"policy {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    names = [p for p in args.policies.split(",") if p]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {list(POLICIES)}")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.steps} training steps per run")
    results = {}
    for name in names:
        idle = run_policy(name, args.steps)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            busy = run_policy(name, args.steps)
        finally:
            hog.kill()
            hog.wait()
        results[name] = {"threads": idle["threads"], "idle_s": idle["per_step"], "busy_s": busy["per_step"]}
        r = results[name]
        print(
            f"{name:15s} threads={r['threads']}  idle {r['idle_s'] * 1000:7.1f} ms/step  "
            f"busy {r['busy_s'] * 1000:7.1f} ms/step  slowdown x{r['busy_s'] / r['idle_s']:.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "cores": os.cpu_count(), "steps": args.steps, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
