"""What the plugin's canary check costs at DeepSeek-R1's expert shape, on the real vllm-ascend 0.23.0.

Run by ``make bench-canary`` in the engine venv (``make test-engine``'s). For each source layout it
writes a one-layer DeepSeek-shaped checkpoint (hidden 7168, moe_intermediate 2048, group size 256),
converts it for vllm-ascend 0.23, and in a fresh process per round times the canary check alone
(the engine's processing of the canary expert, the plugin's of its converted tensors, the comparison)
and measures the peak RSS it adds (``/proc/self/clear_refs`` then ``VmHWM``). Prints medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ("mindie", "v1.0.0-per-group", "v1.0.0-per-channel", "compressed-tensors")
LAYER = "model.layers.0.mlp.experts"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_once(out: Path, layout: str, hidden: int, intermediate: int, group_size: int, engine_only: bool) -> dict:
    """In this process: one MoE layer of one local expert served by the plugin, the canary timed alone."""
    sys.path.insert(0, str(ROOT))
    import torch
    from vllm_ascend.quantization.methods import registry

    from tests.engine.harness import Serving, build, load, serving, stock_description
    from w4a8conv.names import DESCRIPTION_FILE, PREPACKED_TYPE
    from w4a8conv.serving import vllm_plugin
    from w4a8conv.serving.vllm_plugin import canary_check as canary

    answered = serving()  # a server's answers for the life of this process (kept referenced)
    answered.__enter__()
    vllm_plugin.register()
    Serving.expert_parallel = True  # one whole expert on this rank: the layer itself stays small
    description = json.loads((out / DESCRIPTION_FILE).read_text())
    method = registry.get_scheme_class(PREPACKED_TYPE, "moe")
    layer = build(out, description, method, (2, hidden, intermediate), [0], 1, 0)
    scheme = layer.quant_method.quant_method
    torch.set_num_threads(torch.get_num_threads())
    if engine_only:  # stock's own processing of the same expert, as every stock server start does per expert
        src = out.parent / out.name.replace("-out", "-src")
        stock = registry.get_scheme_class("W4A8_DYNAMIC", "moe")
        layer = build(src, stock_description(src, group_size), stock, (2, hidden, intermediate), [0], 1, 0)
        load(layer, src, LAYER)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = _status("VmRSS")
    started = time.perf_counter()
    if engine_only:
        layer.quant_method.process_weights_after_loading(layer)
        what = "stock processing"
    else:
        what = canary.check_moe(scheme.canary, scheme.engine_method, layer, scheme.canary_shape, scheme.process)
    seconds = time.perf_counter() - started
    return {"layout": layout, "checked": what, "seconds": seconds, "peak_added_bytes": _status("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data" / "canary")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--one", nargs=2, metavar=("OUT", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one = (Path(args.one[0]), args.one[1], args.hidden, args.intermediate, args.group_size, args.engine_only)
        result = measure_once(*one)
        print(json.dumps(result))
        return
    sys.path.insert(0, str(ROOT))
    from w4a8conv.converting.convert import convert_checkpoint
    from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec(
        hidden=args.hidden,
        intermediate=args.intermediate,
        group_size=args.group_size,
        experts=2,
        dense_layers=0,
        moe_layers=1,
        w4a8_linear=False,
        mtp_layers=0,
        quarot=False,
        shards=1,
    )
    print(f"hidden {args.hidden}, moe_intermediate {args.intermediate}, median of {args.rounds} fresh processes:")
    print(f"  {'layout':20s} {'canary check (time, peak RSS added)':29s} | stock's processing of one expert")
    for layout in args.layouts:
        src, out = args.data / f"{layout}-src", args.data / f"{layout}-out"
        if not (out / "quant_model_description.json").exists():
            write_checkpoint(src, layout, spec)
            convert_checkpoint(src, out, target="vllm-ascend-0.23", overwrite=True)
        line = f"  {layout:20s}"
        for engine_only in (False, True):
            rounds = []
            for _ in range(args.rounds):
                command = [sys.executable, __file__, "--one", str(out), layout, "--hidden", str(args.hidden)]
                command += ["--intermediate", str(args.intermediate), "--group-size", str(args.group_size)]
                command += ["--engine-only"] if engine_only else []
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                rounds.append(json.loads(done.stdout.strip().splitlines()[-1]))
            seconds = statistics.median(r["seconds"] for r in rounds)
            peak = statistics.median(r["peak_added_bytes"] for r in rounds)
            line += f" {seconds:6.3f} s {peak / 1e6:7.1f} MB" + (" |" if not engine_only else "")
        print(line)


if __name__ == "__main__":
    main()
