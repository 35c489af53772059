"""The 7B multi-view train step per card class, on ONE GPU with its allocator capped: which recipe and activation
checkpointing (AC) the preflight picks for the card, and what it costs (63,600 tokens per sample, random weights,
bf16 compute, compiled blocks, the trainer's own step as in ``bench_train_step.py``).

    case       card              cap (GiB)  trainer.recipe  experiment
    full_80    80 GB (A100/H100)  76         full_offload    text2world_multiview_7b_example_waymo_1gpu
    lora_48    48 GB (L40S/A6000) 44         lora            text2world_multiview_7b_lora_example_waymo_1gpu
    lora_40    40 GB (A100 40GB)  37         lora            text2world_multiview_7b_lora_example_waymo_1gpu
    full_141   141 GB (H200)      none       full_offload    text2world_multiview_7b_example_waymo_1gpu

Each case runs in its own process (a cap or an out-of-memory error cannot poison the next): build, 1 warm-up step
(compiles), 2 timed steps. Per case it prints the recipe line of the start log, s/step, MFU (3 x forward model
FLOPs / step time / peak bf16, the full-training convention also for LoRA, whose step skips the base weights'
gradient GEMMs), peak GPU memory (allocated / reserved, whole run) and peak host RSS; then one table.

    pytest benches/bench_recipes.py -s --benchmark-json=recipes.json     (about 6 minutes on an H200)

Knobs (environment): MV_BENCH_CASES=full_80,lora_48,lora_40,full_141 (which, in this order), MV_BENCH_STEPS=2,
MV_BENCH_CASE_TIMEOUT=240 (seconds per case), MV_BENCH_SET="section.key=value ..." (overrides for every case).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

CASES = {  # name: (card, experiment, recipe, cap GiB)
    "full_80": ("80 GB", "text2world_multiview_7b_example_waymo_1gpu", "full_offload", 76),
    "lora_48": ("48 GB", "text2world_multiview_7b_lora_example_waymo_1gpu", "lora", 44),
    "lora_40": ("40 GB", "text2world_multiview_7b_lora_example_waymo_1gpu", "lora", 37),
    "full_141": ("141 GB", "text2world_multiview_7b_example_waymo_1gpu", "full_offload", 0),
}


def run_case(case: str, out_dir: Path) -> dict:
    """One case in this process; returns its figures."""
    import torch

    from mvmodel.configs import make_config
    from bench_train_step import training_inputs  # the same sample as the uncapped step bench
    from mvmodel.trainer import Trainer, step_generator
    from mvmodel.trainer.monitor import peak_flops

    card, experiment, recipe, cap = CASES[case]
    overrides = [f"job.output_root={out_dir}", f"job.name={case}", "checkpoint.load_path=none",
                 "checkpoint.resume=false", "optimizer.warmup_steps=0", "trainer.device=cuda",
                 f"trainer.recipe={recipe}", f"trainer.gpu_memory_cap_gib={cap}", "parallel.compile=true"]
    overrides += os.environ.get("MV_BENCH_SET", "").split()
    cfg = make_config("mvmodel/configs/multiview.py", experiment, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False, with_data=False)  # resolves the recipe + AC for the capped GPU
    build_s = time.perf_counter() - t0
    dev = trainer.info.device
    print(f"[recipes] {case}: built in {build_s:.0f} s; {trainer._recipe_note}", flush=True)
    try:
        x0, cond = training_inputs(dev)
        tokens = trainer.tokens_per_sample
        assert tokens == 63600, tokens
        offload = trainer.offload

        def step():
            return trainer.optimize(x0, cond, step_generator(0, 0, trainer.iteration))

        t1 = time.perf_counter()
        losses = [step()["loss"]]
        torch.cuda.synchronize()
        print(f"[recipes] {case}: warm-up step {time.perf_counter() - t1:.1f} s, peak GPU "
              f"{torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB", flush=True)
        if offload:
            trainer.optimizer.synchronize()
        torch.cuda.synchronize()
        n = int(os.environ.get("MV_BENCH_STEPS", "2"))
        t1 = time.perf_counter()
        losses += [step()["loss"] for _ in range(n)]
        torch.cuda.synchronize()
        s_per_step = (time.perf_counter() - t1) / n  # the offloaded update of the last step overlaps nothing timed
        if offload:
            trainer.optimizer.synchronize()
        flops = 3 * trainer.model.net.forward_flops(tokens)
        return {"case": case, "card": card, "cap_gib": cap, "recipe": cfg.trainer.recipe,
                "ac": cfg.parallel.activation_checkpointing, "s_per_step": s_per_step,
                "mfu": flops / s_per_step / (peak_flops(dev) or float("nan")),
                "gpu_peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
                "gpu_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30,
                "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "trained_params": sum(p.numel() for p in trainer.params), "build_s": build_s,
                "losses": losses, "recipe_note": trainer._recipe_note, "gpu": torch.cuda.get_device_name(dev)}
    finally:
        trainer.close()


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['card']} | {r['case']} | failed: {r['error'][:120]} | | | | |"
    return (f"| {r['card']} | {r['recipe']} | {r['ac']} | {r['s_per_step']:.2f} | {100 * r['mfu']:.1f}% | "
            f"{r['gpu_peak_gib']:.1f} / {r['gpu_reserved_gib']:.1f} | {r['host_peak_gib']:.1f} |")


@pytest.mark.gpu
def test_recipes_per_card(benchmark, tmp_path):
    from conftest import record

    cases = [c for c in os.environ.get("MV_BENCH_CASES", ",".join(CASES)).split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    assert not unknown, f"MV_BENCH_CASES: unknown case(s) {unknown}; expected some of {list(CASES)}"
    results = []
    for case in cases:
        out = tmp_path / f"{case}.json"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, case, str(out), str(tmp_path)],
                                  timeout=float(os.environ.get("MV_BENCH_CASE_TIMEOUT", "240")))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        r = json.loads(out.read_text()) if out.is_file() else {
            "case": case, "card": CASES[case][0], "error": f"no result (exit {rc})"}
        print(f"[recipes] {case}: {time.perf_counter() - t0:.0f} s in its process", flush=True)
        results.append(r)
        if "error" not in r:
            record(benchmark, f"train_step_7b_recipe_{case}", r["s_per_step"] * 1e3, tracked=False,
                   **{k: v for k, v in r.items() if k != "case"})
    print("\n| card | recipe | AC | s/step | MFU | GPU peak alloc / reserved (GiB) | host peak (GiB) |\n"
          "|---|---|---|---|---|---|---|\n" + "\n".join(_row(r) for r in results), flush=True)
    failed = [r["case"] for r in results if "error" in r]
    assert not failed, f"cases without a result: {failed} (their errors are above)"


if __name__ == "__main__":  # one case: python benches/bench_recipes.py CASE OUT.json WORKDIR
    name, out_json, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    try:
        res = run_case(name, work)
    except Exception as exc:  # noqa: BLE001 - an OOM under the cap is a result: the parent reports it
        res = {"case": name, "card": CASES[name][0], "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(f"[recipes] {name}: {res['error']}", flush=True)
    out_json.write_text(json.dumps(res, indent=1))
    sys.exit(0 if "error" not in res else 1)
