"""Every execution plan cuDNN offers for the FP8 attention graphs of `attention_backend: cudnn_fp8`, timed at
the A14B training shape: is the plan the heuristics pick first (the one `wan_model.cudnn_fp8_attention` runs)
the fastest?

    PYTHONPATH=/tmp/site:$PWD python3 bench/cudnn_fp8_plans.py --json OUT.json       # one Hopper GPU

Why: in the cudnn_fp8 A14B step (0c96a6d) cuDNN's FP8 backward takes 80.6 ms a block (3.22 s of 7.77 s;
~680 TFLOPS) and the forward 26.3 ms (~840 TFLOPS), against a dense e4m3 peak near 1,980. The graph is
built with heuristic modes A and FALLBACK and runs the first plan that builds; other engines or knobs may be
faster at this shape. This script declares the same graphs (`declare_graph`), asks for the plans of modes
A, B and FALLBACK, builds every one (`build_plan_policy.ALL`), and times each on the same e4m3 inputs.

Reported per pass and plan: its name, workspace, median ms over --iters calls (CUDA events) after --warmup,
TFLOPS (forward 4 L^2 D H, backward 10 L^2 D H), and the largest difference of its outputs from those of the
reference plan (the first that runs, as the op's build walk takes), relative to their range (plans differ in
tiling and accumulation order, not in arithmetic). JSON rewritten after each plan, so a run cut short keeps
what it measured. (The db930d6 run's JSON names the reference "plan0": the first plan ran there.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wan_model.cudnn_fp8_attention as cfa  # noqa: E402
from bench.cudnn_fp8_overhead import add_shape_arguments, inputs, timed  # noqa: E402


def scalar(x: float) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), float(x), dtype=torch.float32, device="cuda")


def packs(batch: int, seq: int, heads: int, head_dim: int, seed: int) -> tuple[dict, dict]:
    """Variant packs (by graph tensor name) of the forward and backward graphs on one set of e4m3 inputs, with
    the scales a calibrated block would use (delayed: 448 / (2 x amax) of the reference plan's calibration runs)."""
    q, k, v, d_out = inputs(batch, seq, heads, head_dim, torch.device("cuda"), seed)
    k = k - k.float().mean(1, keepdim=True).to(k.dtype)
    v = v - v.float().mean(1, keepdim=True).to(v.dtype)
    (q8, dq), (k8, dk), (v8, dv), (do8, ddo) = (cfa.quantize_per_tensor(t) for t in (q, k, v, d_out))
    forward = dict(q=q8, k=k8, v=v8, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=scalar(1 / cfa.E4M3_MAX),
                   scale_s=scalar(cfa.E4M3_MAX), scale_o=scalar(1.0), out=torch.empty_like(q8),
                   stats=torch.empty(batch, heads, seq, 1, dtype=torch.float32, device="cuda"),
                   amax_o=scalar(0.0))
    amax = torch.zeros(4, dtype=torch.float32, device="cuda")
    backward = dict(q=q8, k=k8, v=v8, o=forward["out"], dO=do8, stats=forward["stats"], descale_q=dq,
                    descale_k=dk, descale_v=dv, descale_o=scalar(1.0), descale_dO=ddo,
                    descale_s=scalar(1 / cfa.E4M3_MAX), scale_s=scalar(cfa.E4M3_MAX), scale_dP=scalar(1.0),
                    descale_dP=scalar(1.0), scale_dQ=scalar(1.0), scale_dK=scalar(1.0), scale_dV=scalar(1.0),
                    dQ=torch.empty_like(q8), dK=torch.empty_like(k8), dV=torch.empty_like(v8),
                    amax_dP=amax[0:1].view(1, 1, 1, 1), amax_dQ=amax[1:2].view(1, 1, 1, 1),
                    amax_dK=amax[2:3].view(1, 1, 1, 1), amax_dV=amax[3:4].view(1, 1, 1, 1))
    return forward, backward


def plans(pass_name: str, shape: tuple[int, int, int, int], modes: list) -> tuple[object, dict, int]:
    cudnn = cfa._import_frontend()
    batch, seq, heads, head_dim = shape
    graph, tensors = cfa.declare_graph(pass_name, batch, heads, seq, seq, head_dim, torch.device("cuda"))
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans(modes)
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    return graph, tensors, graph.get_execution_plan_count()


def run_plan(graph, tensors: dict, pack: dict, index: int):
    cudnn = cfa._import_frontend()
    workspace = torch.empty(max(1, graph.get_workspace_size_plan_at_index(index)), dtype=torch.uint8,
                            device="cuda")
    handle = cfa._handle(cudnn, torch.device("cuda"))
    graph.execute_plan_at_index({tensors[n]: t for n, t in pack.items()}, workspace, index=index, handle=handle)


def first_plan_that_runs(graph, tensors: dict, pack: dict, count: int) -> int:
    for index in range(count):
        try:
            run_plan(graph, tensors, pack, index)
            return index
        except Exception:  # noqa: BLE001 - a plan that does not build: try the next, as build_plans does
            continue
    raise RuntimeError(f"none of the {count} plans ran")


def outputs(pass_name: str, pack: dict) -> list[torch.Tensor]:
    names = ("out", "stats") if pass_name == "forward" else ("dQ", "dK", "dV")
    return [pack[n].float().clone() for n in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="where the results go (rewritten after every plan)")
    add_shape_arguments(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cudnn_fp8_plans: needs a CUDA GPU (Hopper) and nvidia-cudnn-frontend", file=sys.stderr)
        return 2
    cudnn = cfa._import_frontend()
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    flop = {"forward": 4.0 * args.batch * args.seq ** 2 * args.head_dim * args.heads}
    flop["backward"] = 2.5 * flop["forward"]
    report = {"shape": list(shape), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "passes": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    forward, backward = packs(*shape, args.seed)
    for pass_name, pack in (("forward", forward), ("backward", backward)):
        modes = [cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK]
        try:
            graph, tensors, count = plans(pass_name, shape, modes)
        except Exception as exc:  # noqa: BLE001 - a mode the backend lacks: say so and keep A + FALLBACK
            print(f"{pass_name}: modes A, B, FALLBACK failed ({exc}); A and FALLBACK only")
            modes = [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]
            graph, tensors, count = plans(pass_name, shape, modes)
        rows = []
        ref = first_plan_that_runs(graph, tensors, pack, count)  # the op's own plan: the first that builds
        report["passes"][pass_name] = {"plans": count, "reference_plan": ref, "rows": rows}
        if pass_name == "forward":  # delayed scale for O, from the reference plan's amax
            run_plan(graph, tensors, pack, ref)
            pack["scale_o"].fill_(cfa.E4M3_MAX / (cfa.AMAX_MARGIN * float(pack["amax_o"])))
            backward["descale_o"].fill_(1 / float(pack["scale_o"]))
        else:  # delayed scales for dP, dQ, dK, dV, from two calibration runs (as the op does)
            for _ in range(2):
                run_plan(graph, tensors, pack, ref)
                amax = [float(pack[n]) for n in ("amax_dP", "amax_dQ", "amax_dK", "amax_dV")]
                for n, a in zip(("scale_dP", "scale_dQ", "scale_dK", "scale_dV"), amax):
                    pack[n].fill_(cfa.E4M3_MAX / (cfa.AMAX_MARGIN * max(a, 1e-30)))
                pack["descale_dP"].fill_(1 / float(pack["scale_dP"]))
        run_plan(graph, tensors, pack, ref)
        reference = outputs(pass_name, pack)
        for index in range(count):
            row = {"index": index}
            try:
                row["name"] = graph.get_plan_name_at_index(index)
                row["workspace_mib"] = round(graph.get_workspace_size_plan_at_index(index) / 2**20, 1)
                row["ms"] = round(timed(lambda: run_plan(graph, tensors, pack, index), args.iters, args.warmup,
                                         torch.device("cuda")), 3)
                row["tflops"] = round(flop[pass_name] / row["ms"] / 1e9, 1)
                got = outputs(pass_name, pack)
                row["max_diff_vs_reference"] = [round(float((a - b).abs().amax() / b.abs().amax().clamp_min(1e-30)), 5)
                                            for a, b in zip(got, reference)]
            except Exception as exc:  # noqa: BLE001 - a plan that does not run is reported, not fatal
                row["error"] = str(exc).splitlines()[0][:300]
            rows.append(row)
            print(pass_name, json.dumps(row), flush=True)
            save()
        run_plan(graph, tensors, pack, ref)  # leave the reference plan's outputs for the backward's inputs
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
