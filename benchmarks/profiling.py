"""Where a compiled step's time goes: XLA's own trace of our step, PyTorch's profiler of the reference loop,
both reduced to the same op categories so the two tables compare row by row.

Used by `bench_sampling.py --profile=DIR`. Ours: a `jax.profiler` trace (Perfetto JSON, written by jaxlib
itself, no TensorBoard needed) of a few calls of the compiled sampler; each trace event that names an
instruction of the compiled HLO (on CPU the thunk's name, on GPU the kernel's `hlo_op` argument) is charged
to that instruction, and the instruction to a category by what it computes (a fusion by the ops inside it)
and by the Flax module it came from (its `op_name` metadata). PyTorch: `torch.profiler` self times of the
aten ops, categorised by name.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

CATEGORIES = ("convolution", "attention core (QK, softmax, PV)", "matmul (projections, feed-forward)",
              "group/layer norm", "elementwise, copies, other")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _parse_hlo(text: str):
    """{instruction: (opcode, op_name metadata, shape, called computation)} and {computation: [opcodes]}."""
    instructions, computations, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        match = _COMPUTATION.match(line)
        if match and "=" not in line.split("{")[0]:
            current = match.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"(?:calls|to_apply|body)=%?([\w.\-]+)", rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        instructions[name] = (opcode if not target else f"custom-call:{target.group(1)}",
                              op_name.group(1) if op_name else "", shape, called.group(1) if called else None)
        computations[current].append(opcode if not target else f"custom-call:{target.group(1)}")
    return instructions, computations


def _category(opcodes, op_name: str) -> str:
    path = op_name.lower()
    attention_scope = "attn1" in path or "attn2" in path
    projection = any(p in path for p in ("to_q", "to_k", "to_v", "to_out"))
    if any("fmha" in o or "flash" in o or "attention" in o for o in opcodes):
        return CATEGORIES[1]
    if "convolution" in opcodes or any("conv" in o for o in opcodes if o.startswith("custom-call")):
        return CATEGORIES[0]
    if "dot" in opcodes or any("gemm" in o or "matmul" in o for o in opcodes if o.startswith("custom-call")):
        return CATEGORIES[1] if attention_scope and not projection else CATEGORIES[2]
    if attention_scope and not projection and ("softmax" in path or "dot_product_attention" in path):
        return CATEGORIES[1]
    if "reduce" in opcodes and "norm" in path:
        return CATEGORIES[3]
    return CATEGORIES[4]


def _trace_events(trace_dir: str):
    """The complete ('X') events of the newest trace under trace_dir, and the pids of device (GPU/TPU) lines."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise RuntimeError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and re.search(r"/device:(GPU|TPU)", str((e.get("args") or {}).get("name", "")))}
    return [e for e in events if e.get("ph") == "X"], devices


def profile_compiled(compiled, args, trace_dir: str, calls: int = 2):
    """Trace `calls` runs of a compiled JAX function; return ({op: seconds per call}, parsed HLO).

    On CPU the events named after HLO instructions (the thunks) are counted; on an accelerator every
    kernel on a device line, charged to its `hlo_op` (or the instruction its name spells), else kept
    under its own kernel name.
    """
    import jax

    jax.block_until_ready(compiled(*args))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(compiled(*args))
    instructions, computations = _parse_hlo(compiled.as_text())
    spelled = {name.replace(".", "_").replace("-", "_"): name for name in instructions}
    events, devices = _trace_events(trace_dir)
    seconds = collections.Counter()
    for event in events:
        name = (event.get("args") or {}).get("hlo_op") or event["name"]
        name = name if name in instructions else spelled.get(name, name)
        on_device = event.get("pid") in devices
        if (devices and not on_device) or (name not in instructions and not on_device):
            continue
        if instructions.get(name, ("",))[0] not in ("while", "call", "conditional"):
            seconds[name] += event.get("dur", 0) * 1e-6 / calls
    return seconds, (instructions, computations)


def jax_table(seconds, parsed):
    """(category shares, top instructions) of a profile_compiled result."""
    instructions, computations = parsed
    by_category, rows = collections.Counter(), []
    for name, s in seconds.items():
        opcode, op_name, shape, called = instructions.get(name, ("kernel", "", "", None))
        opcodes = computations.get(called, []) if opcode == "fusion" or called else [opcode]
        category = _category(opcodes + [opcode], op_name) if name in instructions else _category_by_name(name)
        by_category[category] += s
        scope = "/".join(p for p in op_name.split("/") if not p.startswith(("jit(", "while", "body", "closed_call")))
        rows.append((s, name, category, shape.split("{")[0][:40], scope[-70:]))
    return by_category, sorted(rows, reverse=True)


# Categories by op or kernel name (PyTorch's aten ops and CUDA kernels, and our kernels that name no HLO
# instruction). Order matters: cuDNN's convolution kernels are "implicit_gemm" / "fprop" GEMMs.
_NAME_RULES = (("conv", 0), ("fprop", 0), ("implicit_gemm", 0), ("scaled_dot_product", 1), ("fmha", 1),
               ("flash", 1), ("softmax", 1), ("bmm", 1), ("group_norm", 3), ("layer_norm", 3), ("norm", 3),
               ("addmm", 2), ("aten::mm", 2), ("linear", 2), ("matmul", 2), ("gemm", 2), ("xmma", 2))


def _category_by_name(name: str) -> str:
    return CATEGORIES[next((c for key, c in _NAME_RULES if key in name.lower()), 4)]


def torch_table(loop, calls: int = 1):
    """(category shares, top ops) of the PyTorch loop: self time per aten op (CPU, or CUDA kernels on GPU)."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    loop()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            loop()
    by_category, rows = collections.Counter(), []
    for item in prof.key_averages():
        s = (item.self_device_time_total if cuda else item.self_cpu_time_total) * 1e-6 / calls
        if s <= 0 or (cuda and getattr(item, "device_type", None) is not None and "CUDA" not in str(item.device_type)):
            continue
        category = _category_by_name(item.key)
        if item.key.startswith(("aten::", "mkldnn", "void", "sm", "cudnn", "ampere", "cutlass", "flash")) or cuda:
            by_category[category] += s
            rows.append((s, item.key[:60], category, str(item.count), ""))
    return by_category, sorted(rows, reverse=True)


def print_tables(title: str, by_category, rows, steps: int, top: int = 15):
    """Markdown: category shares (ms per guided step) and the top ops."""
    total = sum(by_category.values()) or 1e-12
    print(f"\n{title}: {total / steps * 1e3:.1f} ms per guided step in profiled ops\n")
    print("| category | ms / guided step | share |\n|---|---|---|")
    for category in CATEGORIES:
        print(f"| {category} | {by_category[category] / steps * 1e3:.1f} | {by_category[category] / total:.1%} |")
    print("\n| top op | category | ms / guided step | share | shape or calls | scope |\n|---|---|---|---|---|---|")
    for s, name, category, shape, scope in rows[:top]:
        print(f"| {name} | {category} | {s / steps * 1e3:.2f} | {s / total:.1%} | {shape} | {scope} |")
