"""What `baton bench run | sweep | compare` do with their parsed arguments.

Each builds the settings (workload, arrivals, SLO) and the target from the arguments, runs the
benchmark, writes OUT/result.json and the plots, and prints the summary table. A bad request
raises BenchUsageError (the `baton` CLI reports it with exit status 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from bench.arrivals import AllAtOnce, ArrivalProcess, Bursts, Poisson, TraceTimes
from bench.client import ClientOptions
from bench.cluster_config import parse_cluster_config
from bench.command_line import command_line
from bench.compare import compare
from bench.http_client import api_base
from bench.report import print_summary
from bench.result import base_result, write_result
from bench.runs import RunResult
from bench.session import bench_target
from bench.settings import BenchSettings
from bench.slo import Slo
from bench.structured import StructuredOutputSpec
from bench.sweep import SweepResult
from bench.target import Target
from bench.workloads import OPTION_PARAMETERS, build_workload


class BenchUsageError(ValueError):
    """A problem with what the user asked for (bad option, missing file or server)."""


def run_bench(args: argparse.Namespace) -> int:
    """Run the mode in `args.bench_mode`; exit status 0, or BenchUsageError."""
    mode = args.bench_mode
    try:
        if mode == "compare":
            return _compare(args)
        return _run_or_sweep(args)
    except (RuntimeError, OSError) as exc:  # a cluster that would not start, a dead server
        raise BenchUsageError(str(exc)) from exc


def settings_from_args(args: argparse.Namespace, model_dir: Path | None) -> BenchSettings:
    """The workload, arrivals, SLO and limits the arguments ask for."""
    options = {key: getattr(args, key) for mapping in OPTION_PARAMETERS.values()
               for key in mapping}
    try:
        workload = build_workload(args.workload, options)
        slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_attainment)
        arrivals = _arrivals(args)
        structured = _structured(args)
    except ValueError as exc:
        raise BenchUsageError(str(exc)) from exc
    if args.num_requests < 1 or args.seed < 0:
        raise BenchUsageError("--num-requests must be >= 1 and --seed >= 0")
    if args.concurrency is not None and args.concurrency < 1:
        raise BenchUsageError("--concurrency must be >= 1")
    settings = BenchSettings(
        workload=workload, num_requests=args.num_requests, seed=args.seed,
        vocab_size=args.vocab_size or _vocab_size(args.model_dir or model_dir),
        arrivals=arrivals, concurrency=args.concurrency, slo=slo, warmup=args.warmup,
        progress=not args.no_progress, structured=structured,
    )
    try:
        settings.requests()  # fail now, not mid-benchmark, on e.g. a missing vocabulary size
    except ValueError as exc:
        raise BenchUsageError(str(exc)) from exc
    return settings


def _structured(args: argparse.Namespace) -> StructuredOutputSpec | None:
    ratio = args.structured_output_ratio
    if args.structured_output is None:
        if ratio is not None:
            raise ValueError("--structured-output-ratio needs --structured-output")
        return None
    return StructuredOutputSpec.from_args(args.structured_output, 1.0 if ratio is None else ratio)


def _arrivals(args: argparse.Namespace) -> ArrivalProcess:
    if args.burst_size is not None:
        if args.rate is None:
            raise ValueError("--burst-size needs --rate (the mean request rate)")
        return Bursts(args.rate, args.burst_size)
    if args.rate is not None and args.rate != float("inf"):
        return Poisson(args.rate, args.burstiness)
    return TraceTimes() if args.workload == "trace" else AllAtOnce()


def _vocab_size(model_dir: str | Path | None) -> int | None:
    """`vocab_size` from the model directory's config.json (or its text_config), else None."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchUsageError(f"cannot read the vocabulary size from {path}: {exc}") from exc
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _model_dir(name: str | None) -> Path | None:
    """`name` as a model directory (one with config.json), else None."""
    if name and (Path(name) / "config.json").is_file():
        return Path(name)
    return None


def _served_model(url: str) -> str:
    """The first model id the server lists at /v1/models ('' when it lists none)."""
    try:
        response = httpx.get(api_base(url) + "/models", timeout=10)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return ""


def _client_options(args: argparse.Namespace, model: str) -> ClientOptions:
    return ClientOptions(model=model, temperature=args.temperature, ignore_eos=args.ignore_eos,
                         timeout_s=args.timeout)


def _target(args: argparse.Namespace) -> tuple[Target, Path | None]:
    """The target of run/sweep, and the model directory if --model named one."""
    model_dir = _model_dir(args.model)
    kind = args.client or ("grpc" if args.grpc and not args.url else "http")
    model = model_dir.name if model_dir else (args.model or "")
    if not model and kind == "http" and args.url:
        model = _served_model(args.url)
    try:
        target = Target(url=args.url, grpc=args.grpc, client=kind,
                        options=_client_options(args, model), api_key=args.api_key)
    except ValueError as exc:
        raise BenchUsageError(str(exc)) from exc
    return target, model_dir


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("bench/results") / f"{args.bench_mode}-{args.workload}-{stamp}"


def _command(args: argparse.Namespace) -> str:
    return command_line(args.bench_parser, args, f"baton bench {args.bench_mode}")


def _run_or_sweep(args: argparse.Namespace) -> int:
    target, model_dir = _target(args)
    settings = settings_from_args(args, model_dir)
    result = base_result(args.bench_mode, settings, _command(args))
    result["target"] = target.describe()
    label = target.options.model or "run"
    rates = args.rates if args.bench_mode == "sweep" else []
    outcome = asyncio.run(bench_target(target, settings, label, not rates, rates))
    runs = [outcome.run] if outcome.run else []
    sweeps = [outcome.sweep] if outcome.sweep else []
    path = write_result(result, _out_dir(args), runs, sweeps, settings)
    _report(runs, sweeps, path, result["plots"])
    return 0


def _compare(args: argparse.Namespace) -> int:
    try:
        configs = [parse_cluster_config(text) for text in args.configs]
    except ValueError as exc:
        raise BenchUsageError(str(exc)) from exc
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise BenchUsageError(f"configuration labels must differ (use :name=...): {labels}")
    model_dir = _compare_model(args.model)
    settings = settings_from_args(args, model_dir)
    template = Target(url="http://unset", grpc="unset", client=args.client,
                      options=_client_options(args, model_dir.name))
    result = base_result("compare", settings, _command(args))
    result["target"] = {**template.describe(), "url": None, "grpc": None}
    result["model"] = str(model_dir)
    result["configurations"] = [
        {**c.describe(), "warmup_requests": max(settings.warmup, c.workers_per_role())}
        for c in configs
    ]
    comparison = compare(configs, model_dir, template, settings, args.rates or ())
    path = write_result(result, _out_dir(args), comparison.runs, comparison.sweeps, settings)
    _report(comparison.runs, comparison.sweeps, path, result["plots"])
    return 0


def _compare_model(name: str | None) -> Path:
    if name is None:
        from engine.models.demo import DemoModelUnavailableError, ensure_demo_model

        try:
            return ensure_demo_model()
        except DemoModelUnavailableError as exc:
            raise BenchUsageError(str(exc)) from exc
    model_dir = _model_dir(name)
    if model_dir is None:
        raise BenchUsageError(f"not a model directory (no config.json): {name}")
    return model_dir


def _report(
    runs: list[RunResult], sweeps: list[SweepResult], path: Path, plots: list[str]
) -> None:
    if runs:
        print_summary([(r.label, r.summary) for r in runs], title="baton bench")
    for sweep in sweeps:
        columns = [(f"{p.rate:g}/s", p.summary) for p in sweep.points]
        print_summary(columns, title=f"sweep: {sweep.label}")
        if sweep.points and sweep.points[0].summary["slo_attainment"] is None:
            print("no SLO given (--slo-ttft-ms, --slo-tpot-ms): no goodput or highest rate")
            continue
        best: dict[str, Any] = sweep.max_rate()
        print(f"{sweep.label}: highest rate keeping {100 * best['target']:g}% SLO attainment: "
              f"{_rate_text(best)}")
    print(f"result: {path}\nplots:  {', '.join(plots)}")


def _rate_text(best: dict[str, Any]) -> str:
    if best["highest_tested_rate"] is None:
        return "none of the tested rates"
    text = f"{best['highest_tested_rate']:g} req/s tested"
    if best["reached_limit"]:
        return text + f", about {best['interpolated_rate']:.2f} req/s interpolated"
    return text + " (every tested rate kept it: the limit is higher)"
