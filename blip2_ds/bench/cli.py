"""``python launch/bench.py``: the training step of both stages against the original-style baseline, one table.

    python launch/bench.py                       # GPU: real shapes; CPU: the demo's tiny shapes
    python launch/bench.py --stage 1 --batch 128 --steps 10
    python launch/bench.py --plan --gpus 16 --gpu-memory 80      # micro batch / accumulation for a cluster
    torchrun --nproc_per_node 8 launch/bench.py  # per-GPU numbers with real gradient reduction

Prints, per stage and step (``project``; ``no-engine``: the project's model and losses with torch's
AdamW instead of DeepSpeed, to separate the step's structure from the engine's cost; ``baseline``): samples/s per GPU, TFLOP/s and MFU (analytic
FLOPs of the project's step; matmul peak measured in this run), peak memory, and milliseconds per
phase; then the speedup of the project's step over the baseline measured in the same run, and what a
full garbage collection costs after this setup with and without the setup's objects frozen.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch

from blip2_ds.config import COMPILE_MODES

SOFTWARE = ("torch", "triton", "deepspeed", "transformers", "open_clip_torch", "timm")
"""The packages whose versions decide a step's speed, printed with every table."""


def software_versions() -> dict[str, str]:
    """Python's and each of :data:`SOFTWARE`'s versions (``absent`` if not installed), torch with its CUDA."""
    versions = {"python": platform.python_version()}
    for package in SOFTWARE:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    if torch.version.cuda:
        versions["torch"] += f" (CUDA {torch.version.cuda})"
    return versions


DEFAULT_BATCH = {("real", 1): 105, ("real", 2): 120, ("tiny", 1): 32, ("tiny", 2): 32}
"""Real: the recipe's per-GPU micro batch (1680 and 1920 over 16 GPUs); tiny: the demo's."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    parser.add_argument("--size", choices=("auto", "real", "tiny"), default="auto",
                        help="real: ViT-g + BERT-base Q-Former (+ OPT-2.7B); tiny: the demo's; auto: real on a GPU")
    parser.add_argument("--batch", type=int, default=None, help="micro batch per GPU (default: the recipe's / the demo's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10 GPU, 4 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 GPU, 1 CPU)")
    parser.add_argument("--no-baseline", action="store_true", help="time only the project's step")
    parser.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute the Q-Former layers in backward in the project's steps")
    parser.add_argument("--compile-vit", default="off", choices=COMPILE_MODES,
                        help="also time the project's step with the frozen tower under torch.compile (this mode)")
    parser.add_argument("--length-groups", type=int, default=None,
                        help="stage 2: language.length_groups of the project's rows (default: the config's, 2)")
    parser.add_argument("--compare-length-groups", action="store_true",
                        help="stage 2: also time the project's step with the frozen LLM on one padded batch "
                             "(language.length_groups=1)")
    parser.add_argument("--plan", action="store_true", help="also plan micro batch x accumulation (see --gpus)")
    parser.add_argument("--gpus", type=int, default=16, help="--plan: number of GPUs")
    parser.add_argument("--gpu-memory", type=float, default=None, help="--plan: GiB per GPU (default: this GPU's)")
    parser.add_argument("--global-batch", type=int, default=None, help="--plan: default the recipe's (1680 / 1920)")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this file")
    args = parser.parse_args(argv)
    if args.length_groups is not None and args.length_groups < 1:
        parser.error(f"--length-groups must be at least 1, got {args.length_groups}")
    return args


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:8.1f}"


def format_table(results, device_name: str, peak_tflops: float, llm_positions: tuple[int, int] | None = None) -> str:
    """The table, then per stage the ratios measured in the same run; ``llm_positions``: the frozen LLM's
    positions per stage-2 step as one padded batch and in length groups (:meth:`Bench.llm_positions`)."""
    from blip2_ds.bench.steps import PHASES

    lines = [f"device: {device_name}; measured matmul peak {peak_tflops:.1f} TFLOP/s "
             f"({'bf16' if 'cuda' in device_name.lower() or 'nvidia' in device_name.lower() else 'fp32'})",
             f"{'config':<20} {'batch':>5} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}  "
             + " ".join(f"{p + ' ms':>11}" for p in PHASES)]
    for r in results:
        tflops = "-" if r.tflops is None else f"{r.tflops:8.2f}"
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:5.1f}%"
        memory = "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:8.2f}"
        lines.append(f"{r.name:<20} {r.batch:>5} {r.samples_per_s:>10.4g} {tflops:>8} {mfu:>6} {memory:>8}  "
                     + " ".join(f"{_ms(r.phases.get(p)):>11}" for p in PHASES))
    by_name = {r.name: r for r in results}
    for stage in (1, 2):
        project, baseline = by_name.get(f"stage{stage} project"), by_name.get(f"stage{stage} baseline")
        no_engine = by_name.get(f"stage{stage} no-engine")
        compiled = by_name.get(f"stage{stage} compiled-vit")
        one_batch = by_name.get(f"stage{stage} one-batch-llm")
        if stage == 2 and llm_positions and any(r.name.startswith("stage2") for r in results):
            padded, grouped = llm_positions
            lines.append(f"stage 2: frozen-LLM positions per step {grouped:,} in length groups vs {padded:,} as one "
                         f"padded batch ({100 * (1 - grouped / padded):.0f}% fewer)")
        if project and one_batch:
            lines.append(f"stage {stage}: length groups / one padded batch = "
                         f"{project.samples_per_s / one_batch.samples_per_s:.2f}x samples/s")
        if project and compiled:
            lines.append(f"stage {stage}: with the frozen tower compiled / eager tower = "
                         f"{compiled.samples_per_s / project.samples_per_s:.2f}x samples/s (vit "
                         f"{_ms(compiled.phases.get('vit')).strip()} ms vs {_ms(project.phases.get('vit')).strip()} ms)")
        if project and baseline:
            lines.append(f"stage {stage}: project / baseline = {project.samples_per_s / baseline.samples_per_s:.2f}x "
                         f"samples/s (same run, same shapes and batch)"
                         + (f"; without the DeepSpeed engine {no_engine.samples_per_s / baseline.samples_per_s:.2f}x"
                            if no_engine else ""))
    return "\n".join(lines)


def format_collection(collection: dict) -> str:
    """One line: a full garbage collection after this setup, and with the setup's objects frozen (as the
    trainer runs its loop, train/garbage.py), both measured in this run."""
    return (f"garbage collection after setup: a full collection {1e3 * collection['seconds']:.1f} ms over "
            f"{collection['objects']:,} objects; with them frozen (the trainer's loop) "
            f"{1e3 * collection['frozen_seconds']:.3f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from blip2_ds import distributed
    from blip2_ds.bench.steps import Bench, measure_interleaved
    from blip2_ds.train.engine import init_distributed
    from blip2_ds.train.garbage import full_collection_seconds
    from blip2_ds.train.metrics import measure_matmul_tflops

    init_distributed()
    device = distributed.local_device()
    cuda = device.type == "cuda"
    size = ("real" if cuda else "tiny") if args.size == "auto" else args.size
    steps, warmup = args.steps or (10 if cuda else 4), args.warmup if args.warmup is not None else (3 if cuda else 1)
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads() // distributed.world_size()))
    precision = "bf16" if cuda else "fp32"  # bf16 matmuls are emulated (slow) on most CPUs
    peak = measure_matmul_tflops(device)
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    results, plans, llm_positions = [], [], None
    for stage in args.stage:
        batch = args.batch or DEFAULT_BATCH[(size, stage)]
        bench = Bench(stage, size, batch, device, precision, args.kernels, args.activation_checkpointing,
                      compile_vit=args.compile_vit, length_groups=args.length_groups)
        rows = ["project"] + (["compiled_vit"] if args.compile_vit != "off" else []) \
            + (["one_batch_llm"] if args.compare_length_groups and stage == 2 else []) \
            + ([] if args.no_baseline else ["no_engine", "baseline"])
        configs = {f"stage{stage} {which.replace('_', '-')}": getattr(bench, f"stage{stage}_{which}") for which in rows}
        if stage == 2:
            bench.build_llm()
            llm_positions = bench.llm_positions()
        results += measure_interleaved(configs, batch, device, steps, warmup, bench.flops_per_sample(), peak)
        _free(device)
        if args.plan:
            plans.append(_plan(args, bench, stage, device, steps, warmup, peak))
        del bench, configs
        _free(device)
    collection = full_collection_seconds()
    if distributed.rank() == 0:
        software = software_versions()
        print(format_table(results, device_name, peak, llm_positions))
        print("software: " + ", ".join(f"{name} {version}" for name, version in software.items()))
        print(format_collection(collection))
        for line in plans:
            print(line)
        if args.json:
            args.json.write_text(json.dumps({"device": device_name, "peak_tflops": peak, "size": size,
                                             "world_size": distributed.world_size(), "software": software,
                                             "plans": plans,
                                             "llm_positions": llm_positions,
                                             "garbage_collection": collection,
                                             "results": [{**vars(r), "tflops": r.tflops, "mfu": r.mfu}
                                                         for r in results]}, indent=1))
    return 0


def _plan(args, bench, stage: int, device: torch.device, steps: int, warmup: int, peak: float) -> str:
    """For the real shapes: memory and time per sample measured at two micro batches when this is a
    GPU running them, the analytic estimate otherwise."""
    from blip2_ds.bench import plan as planner
    from blip2_ds.bench.steps import Bench, measure_interleaved

    trainable, frozen, per_sample = real_shape_estimates(stage, "bf16")  # the GPU recipe's precision
    fixed = planner.zero2_fixed_bytes(trainable, frozen, args.gpus)
    if device.type == "cuda" and bench.size == "real":
        points = []
        for batch in (max(1, bench.batch // 2), bench.batch):
            probe = Bench(stage, bench.size, batch, device, bench.precision, bench.kernels,
                          bench.activation_checkpointing, length_groups=bench.length_groups, reuse=bench)
            if stage == 2:
                probe.build_llm()
            result, = measure_interleaved({"plan": getattr(probe, f"stage{stage}_project")}, batch, device,
                                          max(2, steps // 2), 1, None, peak)
            points.append((batch, result.peak_memory_gib * planner.GIB, batch / result.samples_per_s))
            del probe
            _free(device)
        model = planner.from_measurements(fixed, points)
        memory = args.gpu_memory or torch.cuda.get_device_properties(device).total_memory / planner.GIB
    else:
        model = planner.MemoryModel(fixed, per_sample)
        memory = args.gpu_memory or 80.0
    global_batch = args.global_batch or planner.RECIPE_GLOBAL_BATCH[stage]
    try:
        return f"plan, stage {stage} (real shapes): " + planner.plan(model, args.gpus, memory, global_batch).describe()
    except ValueError as err:
        return f"plan, stage {stage} (real shapes): {err}"


def real_shape_estimates(stage: int, precision: str) -> tuple[int, int, float]:
    """(trainable parameters, frozen parameters, activation bytes per sample) of BLIP-2 at the paper's
    shapes (ViT-g; OPT-2.7B for stage 2), counted on the meta device."""
    from transformers import OPTConfig, OPTForCausalLM

    from blip2_ds.bench.steps import OPT_2_7B
    from blip2_ds.config import Config, QFormerConfig
    from blip2_ds.info import count, frozen_vision_count
    from blip2_ds.models.stage1 import Stage1Model
    from blip2_ds.models.stage2 import Stage2Model
    from blip2_ds.train.dry_run import activation_estimate

    qcfg = QFormerConfig()
    _, vision = frozen_vision_count(qcfg.vision_width)
    cfg = Config(stage=stage, model=qcfg, precision=precision)
    cfg.data.batch_size = 1
    with torch.device("meta"):
        if stage == 1:
            return count(Stage1Model(qcfg)), vision, float(activation_estimate(cfg))
        llm = count(OPTForCausalLM(OPTConfig(**OPT_2_7B)))
        trainable = count(Stage2Model(qcfg, llm=None, llm_hidden=OPT_2_7B["hidden_size"]))
    per_sample = activation_estimate(cfg, OPT_2_7B["num_hidden_layers"], OPT_2_7B["hidden_size"],
                                     OPT_2_7B["num_attention_heads"])
    return trainable, vision + llm, float(per_sample)


if __name__ == "__main__":
    sys.exit(main())
