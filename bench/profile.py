"""Profile a server's hot path under one benchmark scenario.

    python -m bench.profile [--server ufo_trio|limit] [--scenario heartbeat-100] [--seconds 8]

Starts the server and the load generator exactly as `python -m bench` does (same pinning, same
flags), lets the load warm up, then samples the server with py-spy (`pip install py-spy`; it
attaches by pid, so the server runs unmodified) and prints where its CPU goes: by package, by
function excluding callees ("self") and including them ("total"). The raw folded stacks are
kept for a flame graph. With `--cprofile` (or when py-spy is missing) the server runs under
cProfile instead; that slows it down several times, so trust the ranking, not the numbers.
"""

from __future__ import annotations

import argparse
import collections
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from . import _proc
from .run import (
    LIMIT,
    UFO,
    Options,
    choose_cpus,
    detect_json_lib,
    finish_loadgen,
    llm_args,
    plan,
    start_fake_model,
    start_loadgen,
    start_server,
)

_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _function(frame: str) -> tuple[str, str]:
    """'handler (bench/refserver.py:96)' -> ('handler', 'bench/refserver.py')."""
    m = _FRAME_RE.match(frame)
    return (m.group("func"), m.group("file")) if m else (frame, "?")


def _package(file: str) -> str:
    """The top-level package of a py-spy file path ('trio/_core/_run.py' -> 'trio')."""
    if file.startswith("<"):
        return "python (frozen)"
    head = file.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in file else f"stdlib:{head.removesuffix('.py')}"


def summarise_folded(path: Path, top: int) -> str:
    """Tables of self time per package and per function, and total time per function."""
    self_fn: collections.Counter[str] = collections.Counter()
    total_fn: collections.Counter[str] = collections.Counter()
    self_pkg: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")]
        samples += count
        func, file = frames[-1]
        self_fn[f"{func} ({file})"] += count
        self_pkg[_package(file)] += count
        for name in {f"{fn} ({fl})" for fn, fl in frames}:
            total_fn[name] += count
    if not samples:
        return "no samples"

    def rows(counter: collections.Counter[str], n: int) -> list[str]:
        return [f"  {c / samples:6.1%}  {name}" for name, c in counter.most_common(n)]

    out = [f"{samples} samples"]
    out += ["", "self time by package:", *rows(self_pkg, 15)]
    out += ["", "self time by function:", *rows(self_fn, top)]
    out += ["", "total time by function (with callees):", *rows(total_fn, top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--server", choices=(UFO, LIMIT), default=UFO)
    parser.add_argument("--scenario", default="heartbeat-100")
    parser.add_argument("--seconds", type=float, default=8.0, help="sampling time")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json", choices=("auto", "stdlib", "orjson"), default="auto")
    parser.add_argument("--ufo-arg", action="append", default=[])
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy executable")
    parser.add_argument("--cprofile", action="store_true", help="use cProfile, not py-spy")
    parser.add_argument(
        "--threads", action="store_true", help="py-spy: split the stacks by thread (writer vs loop)"
    )
    parser.add_argument("--priority", type=int, default=None, help="as for python -m bench")
    parser.add_argument("--out", type=Path, default=None, help="directory for the raw profile")
    args = parser.parse_args(argv)

    scenarios = {s.name: s for s in plan(smoke=False, duration=args.seconds)}
    if args.scenario not in scenarios:
        parser.error(f"unknown scenario; choose from {', '.join(scenarios)}")
    base = scenarios[args.scenario]
    use_cprofile = args.cprofile or not args.py_spy
    if use_cprofile and not args.cprofile:
        print("py-spy not found (pip install py-spy); falling back to cProfile", file=sys.stderr)

    outdir = args.out or Path(tempfile.mkdtemp(prefix="ufo-profile-"))
    outdir.mkdir(parents=True, exist_ok=True)
    _proc.raise_nofile_limit()
    server_cpu, gen_cpu = choose_cpus(no_pin=False)
    cprofile_path = outdir / f"{args.server}.pstats"
    opts = Options(
        json_lib=detect_json_lib() if args.json == "auto" else args.json,
        server_cpu=server_cpu,
        gen_cpu=gen_cpu,
        ufo_args=tuple(args.ufo_arg),
        logdir=outdir,
        python_args=("-m", "cProfile", "-o", str(cprofile_path)) if use_cprofile else (),
        priority=args.priority,
    )
    # Keep the load running a little longer than the sampling window on both sides.
    params = dict(base.params)
    warmup = float(params.get("warmup", 1.0))
    if "duration" in params:
        params["duration"] = args.seconds + 2.0
    scenario = attrs.evolve(base, params=params)

    model = None
    if base.model_delay is not None:  # the llm scenarios: the fake model, as `python -m bench`
        model, base_url = start_fake_model(base.model_delay, opts, f"profile-{args.server}")
        opts = attrs.evolve(opts, ufo_args=(*opts.ufo_args, *llm_args(base_url)))
    try:
        server = start_server(args.server, opts, f"profile-{args.server}")
    except BaseException:
        if model is not None:
            model.kill()
            model.wait()
        raise
    folded = outdir / f"{args.server}-{scenario.name}.folded"
    try:
        gen = start_loadgen(server, scenario, opts)
        if not use_cprofile:
            # Steady-state scenarios are sampled after their warm-up; one-shot ones (storm,
            # tasks) from the start, so --seconds should cover their whole run.
            time.sleep(warmup + 1.0 if "duration" in params else 0.2)
            subprocess.run(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(folded),
                    *(["--threads"] if args.threads else []),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        result = finish_loadgen(gen, scenario.timeout + 60)
    finally:
        status = server.stop()
        if model is not None:
            model.kill()
            model.wait()
    print(f"# {args.server} under {scenario.name}: server exit {status}")
    if "error" in result:
        print(f"load generator: {result['error']}")
    else:
        cpu = {k: v for k, v in result.items() if k.startswith("server_cpu_us_per")}
        print(f"load generator: {cpu}")
    if use_cprofile:
        stats = pstats.Stats(str(cprofile_path))
        stats.sort_stats("tottime").print_stats(args.top)
        print(f"raw profile: {cprofile_path}")
    else:
        print(summarise_folded(folded, args.top))
        print(f"\nraw folded stacks (flamegraph input): {folded}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
