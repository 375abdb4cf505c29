"""Real-size models (issue 26): each stage's wall-clock and peak memory against the dense model's bytes.

Usage::

    python bench/scale.py [CASE ...] [--max-rss-gb 10] [--nnc-venv /tmp/nnc-venv] [--out bench/results/scale.json]

Cases (random init, real shapes; nothing is downloaded):

- ``vgg16``, ``vgg16-cabac``: VGG-16's 13 convs and 3 fc layers (138M weights), pruned per layer as Han et
  al. 2015 did (Table 5, 92.5% overall), k-means with 8-bit convs and 5-bit fc layers, coder auto / cabac.
- ``gpt2``, ``gpt2-medium``, ``gpt2-xl``: ``GPT2LMHeadModel(GPT2Config(...))`` of those sizes (124M, 355M,
  1.56B weights), every weight pruned 50% (percentile), 4-bit k-means, coder auto.

Each case runs in two child processes: one builds the model (seeded), prunes, quantizes and writes the file;
a fresh one builds the model on the meta device, allocates it and loads the file into it
(``deepshrink.load(path, model=m)``). Before each stage the child resets its peak RSS (``/proc/self/clear_refs``)
and afterwards reads it (``VmHWM``), so every stage's peak includes what the earlier stages left alive (the
model), which is what "peak / dense" compares. A first child runs a small model through every stage and
both coders, so that numba's compiled kernels are cached before anything is timed. The parent samples
each child's RSS and kills it past ``--max-rss-gb`` (the machine is shared: no child may push it into
OOM). ``--nnc-venv`` adds NNCodec (``bench/nnc_worker.py --stages``) on the pruned and quantized VGG-16
weights: encode and decode time and peak RSS, beside ours from the same run. ``--src SRC`` runs the
children on another copy of the package (an older commit's ``src`` for the "before" numbers, or a
snapshot of this one, so that edits made while it runs do not reach it).

Prints a table and writes bench/results/scale.json (machine, load average, date, git SHA, every stage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from common import ROOT, machine_info, write_json

RESULTS = ROOT / "bench" / "results" / "scale.json"
WORKER = ROOT / "bench" / "nnc_worker.py"
#: Han, Pool, Tran & Dally 2015, Table 5: the weights VGG-16 keeps per layer (%)
VGG16_KEPT = OrderedDict([
    ("conv1_1", 58), ("conv1_2", 22), ("conv2_1", 34), ("conv2_2", 36), ("conv3_1", 53), ("conv3_2", 24),
    ("conv3_3", 42), ("conv4_1", 32), ("conv4_2", 27), ("conv4_3", 34), ("conv5_1", 35), ("conv5_2", 29),
    ("conv5_3", 36), ("fc6", 1), ("fc7", 2), ("fc8", 9),
])
VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
GPT2_SIZES = {"gpt2": {}, "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
              "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25)}
CASES = ("vgg16", "vgg16-cabac", "gpt2", "gpt2-medium", "gpt2-xl")


# ---------------------------------------------------------------- the models


def vgg16():
    from torch import nn

    layers, width = OrderedDict(), 3
    for name, channels in zip(VGG16_KEPT, VGG16_CHANNELS):
        layers[name] = nn.Conv2d(width, channels, 3, padding=1)
        layers[f"{name}_relu"] = nn.ReLU()
        width = channels
    layers["pool"] = nn.AdaptiveAvgPool2d(7)
    layers["flatten"] = nn.Flatten()
    for name, (n_in, n_out) in zip(("fc6", "fc7", "fc8"), ((512 * 49, 4096), (4096, 4096), (4096, 1000))):
        layers[name] = nn.Linear(n_in, n_out)
    return nn.Sequential(layers)


def build(case: str):
    """The case's model, seeded, and its pipeline settings."""
    import torch

    from deepshrink.encode import EncodeConfig
    from deepshrink.prune import PruneConfig
    from deepshrink.quantize import QuantizeConfig

    torch.manual_seed(0)
    if case.startswith("vgg16"):
        prune = PruneConfig(method="percentile", q_by_pattern=tuple((f"{n}.*", 100 - k) for n, k in VGG16_KEPT.items()))
        coder = "cabac" if case.endswith("cabac") else "auto"
        return vgg16(), prune, QuantizeConfig(bits_conv=8, bits_fc=5), EncodeConfig(coder=coder)
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**GPT2_SIZES[case]))
    return model, PruneConfig(method="percentile", q=50), QuantizeConfig(bits=4), EncodeConfig()


def empty_model(case: str):
    """The case's model with uninitialised memory (built on the meta device): what a loader fills."""
    import torch

    with torch.device("meta"):
        model = build(case)[0]
    model = model.to_empty(device="cpu")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def dense_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- a child: stages, each with its own peak


def _status(pid: int | str = "self") -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}


class Stages:
    """Times each stage and reads its peak RSS (reset before it starts); one JSON line per stage on stdout."""

    def run(self, name: str, fn, *args, **kwargs):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        status = _status()
        print(json.dumps({"stage": name, "seconds": round(seconds, 2), "peak_rss": status["VmHWM"],
                          "rss_after": status["VmRSS"]}), flush=True)
        return result


def child_compress(case: str, path: Path, npz: Path | None) -> None:
    import torch

    from deepshrink.compress import compress_model
    from deepshrink.prune import prune_model
    from deepshrink.quantize import quantize_model

    torch.set_grad_enabled(False)
    stages = Stages()
    model, prune, quantize, encode = stages.run("build", build, case)
    print(json.dumps({"dense_bytes": dense_bytes(model), "weights": sum(p.numel() for p in model.parameters())}),
          flush=True)
    stages.run("prune", lambda: prune_model(model, prune) and None)  # the returned masks are the model's own
    stages.run("quantize", lambda: quantize_model(model, quantize) and None)
    report = stages.run("encode", compress_model, model, path, encode)
    codecs: dict[str, int] = {}
    for row in report.rows:
        codecs[row["codec"]] = codecs.get(row["codec"], 0) + 1
    print(json.dumps({"file_bytes": report.file_bytes, "codecs": codecs,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}), flush=True)
    if npz is not None:  # the same weights for NNCodec: effective float32 values
        import numpy as np

        from deepshrink.parametrizations import strip

        np.savez(npz, **{k: v.numpy() for k, v in strip(model).state_dict().items()})


def child_warmup(folder: Path) -> None:
    """A small model through every stage, with both coders: numba compiles (and caches) every kernel."""
    from torch import nn

    import deepshrink
    from deepshrink.compress import compress_model
    from deepshrink.encode import EncodeConfig
    from deepshrink.prune import PruneConfig, prune_model
    from deepshrink.quantize import QuantizeConfig, quantize_model

    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 64))
    prune_model(model, PruneConfig(q=60))
    quantize_model(model, QuantizeConfig(bits=4))
    for coder in ("auto", "cabac", "huffman"):
        compress_model(model, folder / "warmup.dsz", EncodeConfig(coder=coder))
        deepshrink.load(folder / "warmup.dsz", model=nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 64)))


def child_load(case: str, path: Path) -> None:
    import torch

    import deepshrink

    torch.set_grad_enabled(False)
    stages = Stages()
    model = stages.run("allocate", empty_model, case)
    stages.run("load", deepshrink.load, path, model=model)


# ---------------------------------------------------------------- the parent


def watch(command: list[str], limit: int, env: dict | None = None) -> tuple[list[dict], str | None]:
    """Run a child, reading its JSON lines; kill it if its RSS passes ``limit`` bytes."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    aborted: list[str] = []

    def sample() -> None:
        while process.poll() is None:
            try:
                rss = _status(process.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            if rss > limit:
                aborted.append(f"RSS {rss / 2**30:.1f} GiB passed the limit {limit / 2**30:.1f} GiB")
                process.kill()
                return
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    records = [json.loads(line) for line in process.stdout if line.startswith("{")]
    code = process.wait()
    return records, aborted[0] if aborted else (f"exit code {code}" if code else None)


def run_case(case: str, args, folder: Path) -> dict:
    path, npz = folder / f"{case}.dsz", folder / f"{case}.npz"
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    me = [sys.executable, __file__, "--child", case, "--file", str(path)]
    nnc = args.nnc_venv and case == "vgg16-cabac"
    result = {"case": case, "load_average_before": os.getloadavg()}
    records, error = watch(me + (["--npz", str(npz)] if nnc else []), args.limit, env)
    if not error:
        more, error = watch(me + ["--load"], args.limit, env)
        records += more
    for record in records:
        if "stage" in record:
            result.setdefault("stages", {})[record.pop("stage")] = record
        else:
            result.update(record)
    result["load_average_after"] = os.getloadavg()
    if error:
        result["error"] = error
    if nnc and not error:
        result["nncodec"] = run_nncodec(Path(args.nnc_venv), npz, folder, args.limit)
        if "error" not in result["nncodec"]:
            result["decode_rounds"] = decode_rounds(me, env, Path(args.nnc_venv), folder, args)
    path.unlink(missing_ok=True)
    npz.unlink(missing_ok=True)
    return result


def run_nncodec(venv: Path, npz: Path, folder: Path, limit: int) -> dict:
    """NNCodec (its default qp and settings) on the weights our pipeline produced: encode, then decode."""
    python = venv / "bin" / "python"
    if not python.exists():
        return {"error": f"no NNCodec environment at {venv} (python bench/nnc.py --setup)"}
    records, error = watch([str(python), str(WORKER), "--stages", str(npz), str(folder / "nnc"), "-38"], limit)
    return {"error": error} if error else records[-1]


def decode_rounds(me: list[str], env: dict, venv: Path, folder: Path, args) -> dict:
    """Our load and NNCodec's decompression of the same weights, alternately, each in a fresh process: on a
    shared machine one run of each says little, the medians of ``--decode-rounds`` more."""
    ours, theirs = [], []
    for _ in range(args.decode_rounds):
        records, error = watch(me + ["--load"], args.limit, env)
        ours += [r for r in records if r.get("stage") == "load"]
        records, error = watch([str(venv / "bin" / "python"), str(WORKER), "--decode", str(folder / "nnc" / "qp-38.nnc")],
                               args.limit)
        theirs += records
    median = lambda values: sorted(values)[len(values) // 2] if values else None  # noqa: E731
    return {"ours_load_seconds": [r["seconds"] for r in ours], "ours_load_peak_rss": [r["peak_rss"] for r in ours],
            "nncodec_decode_seconds": [r["decode_seconds"] for r in theirs],
            "nncodec_decode_peak_rss": [r["decode_peak_rss"] for r in theirs],
            "ours_median_seconds": median([r["seconds"] for r in ours]),
            "nncodec_median_seconds": median([r["decode_seconds"] for r in theirs])}


def table(results: list[dict]) -> str:
    gib = 2**30
    lines = ["| case | dense | prune | quantize | encode | load | peak/dense (prune, quantize, encode, load) | file | codecs |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        stages, dense = r.get("stages", {}), r.get("dense_bytes") or 1

        def cell(name: str) -> str:
            return f"{stages[name]['seconds']:.0f} s" if name in stages else "-"

        ratios = ", ".join(f"{stages[s]['peak_rss'] / dense:.2f}" if s in stages else "-"
                           for s in ("prune", "quantize", "encode", "load"))
        lines.append(f"| {r['case']} | {dense / gib:.2f} GiB | {cell('prune')} | {cell('quantize')} | {cell('encode')} "
                     f"| {cell('load')} | {ratios} | {r.get('file_bytes', 0) / 2**20:.1f} MiB | "
                     f"{r.get('codecs', r.get('error', ''))} |")
        if "nncodec" in r and "encode_seconds" in r["nncodec"]:
            n = r["nncodec"]
            lines.append(f"| NNCodec (qp {n['qp']}) on {r['case']}'s weights | | | | {n['encode_seconds']:.0f} s | "
                         f"{n['decode_seconds']:.0f} s | -, -, {n['encode_peak_rss'] / dense:.2f}, "
                         f"{n['decode_peak_rss'] / dense:.2f} | {n['bytes'] / 2**20:.1f} MiB | |")
        if r.get("decode_rounds", {}).get("ours_median_seconds") is not None:
            d = r["decode_rounds"]
            lines.append(f"| {r['case']}: load / NNCodec decode, median of {len(d['ours_load_seconds'])} alternate "
                         f"runs | | | | | {d['ours_median_seconds']:.1f} s / {d['nncodec_median_seconds']:.1f} s | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="*", default=list(CASES[:4]), help=f"of {', '.join(CASES)} (default: all but gpt2-xl)")
    parser.add_argument("--max-rss-gb", type=float, default=10.0, help="kill a child whose RSS passes this")
    parser.add_argument("--nnc-venv", help="NNCodec's environment (bench/nnc.py --setup); beside vgg16-cabac")
    parser.add_argument("--decode-rounds", type=int, default=3,
                        help="with --nnc-venv: our load and NNCodec's decode, alternately, this many times each")
    parser.add_argument("--src", help="the package's src folder to run the children on (default: the installed one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # bench/ leaves sys.path: its kernels.py would shadow the package transformers imports
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
        if args.child == "warmup":
            child_warmup(args.file)
        elif args.load:
            child_load(args.child, args.file)
        else:
            child_compress(args.child, args.file, args.npz)
        return 0
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    args.limit = int(args.max_rss_gb * 2**30)
    results = []
    with tempfile.TemporaryDirectory(prefix="deepshrink-scale-") as folder:
        env = {**os.environ, **({"PYTHONPATH": str(Path(args.src).resolve())} if args.src else {})}
        _, error = watch([sys.executable, __file__, "--child", "warmup", "--file", folder], args.limit, env)
        if error:
            raise SystemExit(f"the warm-up child failed ({error})")
        for case in args.cases:
            results.append(run_case(case, args, Path(folder)))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    write_json(args.out, {"machine": machine_info(load_average=os.getloadavg(), src=args.src), "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
