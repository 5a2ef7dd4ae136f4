"""`trustray` command line: quickstart, serve, label, run <pipeline>, eval <what>, submit, jobs."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from trustray import jobs as job_submission
from trustray import pipelines
from trustray.runtime import apply_offline_defaults, setup_logging

logger = logging.getLogger("trustray")

SAMPLE_QUESTIONS = [
    "Who is the Eiffel Tower named after?",
    "What is the highest mountain on Earth?",
    "In which city is the Colosseum?",
]


def preset(pipeline: str, name: str = "cpu") -> Path:
    """A YAML preset shipped with the package (`configs/` of the source tree)."""
    from trustray.config import PACKAGED_CONFIGS

    path = PACKAGED_CONFIGS / pipeline / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"preset {path} not found")
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from trustray.pipelines import EVALUATIONS, JOBS, run_module

    evaluation = {module: what for what, module in EVALUATIONS.items()}.get(args.pipeline)
    if evaluation is not None:
        raise SystemExit(f"{args.pipeline} is an evaluation: run `trustray eval {evaluation}`")
    if args.pipeline not in JOBS:
        raise SystemExit(f"unknown pipeline {args.pipeline!r}; available: {', '.join(JOBS)}")
    run_module(args.pipeline, args.args, prog=f"trustray run {args.pipeline}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trustray.pipelines import EVALUATIONS, load_pipeline, run_module

    name = EVALUATIONS[args.what]
    summary = run_module(name, args.args, prog=f"trustray eval {args.what}", log_table=False)
    print(load_pipeline(name)["table"](summary))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from trustray.config import load_config
    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.openai_app import run_app, shutdown

    config = load_config(ServeConfig, args.config, args.overrides)
    url = run_app(config)
    try:
        serve_until_interrupted(url)
    finally:
        shutdown()
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from trustray.config import load_config
    from trustray.serve_apps.labeling import LabelingConfig, run_app, shutdown

    url = run_app(load_config(LabelingConfig, args.config, args.overrides))
    try:
        wait_until_interrupted(f"labeling page at {url}")
    finally:
        shutdown()
    return 0


def wait_until_interrupted(message: str) -> None:
    print(f"{message} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def serve_until_interrupted(url: str) -> None:
    wait_until_interrupted(f"serving the OpenAI-compatible API at {url}/v1")


# A first quickstart answers from every 4th intro while the full index builds: on a slow 2-core machine (6.5
# passages/s) the full index takes over 20 minutes, a quarter of it about 6. Offset 1 is the quarter that holds the
# pages SAMPLE_QUESTIONS are about (corpus ranks 137, 189 and 3,109), so the first answers can be grounded.
FIRST_SLICE = {"every": 4, "every_offset": 1}


def ask_sample_questions(url: str) -> None:
    """Ask SAMPLE_QUESTIONS of `model="rag"` over HTTP; print each answer with its sources, setting and costs."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        for question in SAMPLE_QUESTIONS:
            asked = time.perf_counter()
            response = client.post(
                "/v1/chat/completions",
                json={"model": "rag", "messages": [{"role": "user", "content": question}], "max_tokens": 48},
            )
            response.raise_for_status()
            body = response.json()
            elapsed = time.perf_counter() - asked
            print(f"\nQ: {question}\nA: {body['choices'][0]['message']['content'].strip()}")
            for source in body.get("sources", []):
                print(f"   source: {source['title']} ({source['id']}, score {source['score']:.3f})")
            if setting := body.get("retrieval"):
                compressor = (f", {setting['compressor']} compressor at {setting['budget']} tokens"
                              if setting["compressor"] else ", uncompressed")
                print(f"   retrieval: {setting['retriever']} top-{setting['top_k']} from {setting['index']}{compressor}")
            usage = body["usage"]
            print(
                f"   {elapsed:.2f}s, prompt {usage['prompt_tokens']} tokens "
                f"(retrieved context {usage.get('context_tokens', 0)}), answer {usage['completion_tokens']} tokens"
            )


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Local Ray → embedded model → index (built or reused; a first run answers from a slice while the full index
    builds, then swaps it in) → Serve on 127.0.0.1 → three questions over HTTP."""
    import ray

    from trustray.actors.cluster import init_ray
    from trustray.config import load_config
    from trustray.models.sources import resolve_model_source
    from trustray.pipelines import build_index
    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.openai_app import run_app, shutdown

    started = time.perf_counter()

    def step(name: str, since: float) -> float:
        now = time.perf_counter()
        print(f"[{now - started:6.1f}s] {name} ({now - since:.1f}s)", flush=True)
        return now

    t = time.perf_counter()
    init_ray()
    t = step("local Ray started on 127.0.0.1", t)
    resolve_model_source("smollm2-135m-instruct")
    t = step("embedded chat model ready (smollm2-135m-instruct)", t)
    index_config = load_config(build_index.BuildIndexConfig, preset("build_index"), args.index_overrides)
    first_slice = None
    if not args.full_index_first and index_config.every == 1 and not build_index.is_built(index_config):
        first_slice = index_config.model_copy(
            update={**FIRST_SLICE, "output_dir": f"{index_config.output_path()}-first-slice"})
        total = len(build_index.corpus_rows(index_config))
        print(f"[{time.perf_counter() - started:6.1f}s] no full index yet: building a first slice "
              f"({len(build_index.corpus_rows(first_slice)):,} of {total:,} documents, every "
              f"{FIRST_SLICE['every']}th) to answer from while the full index builds", flush=True)
    index_dir = build_index.run(first_slice or index_config)
    t = step(f"{'first-slice ' if first_slice else ''}index ready at {index_dir}", t)
    serve_config = load_config(
        ServeConfig, preset("serve"), [f"port={args.port}", f"rag.index_dir={index_dir}", *args.serve_overrides]
    )
    compressor = serve_config.rag.compressor if serve_config.rag else None
    if compressor is not None and compressor.scorer_dir and not Path(compressor.scorer_dir).is_dir():
        # The served preset's scorer is trained apart (over an hour on 2 cores): a first run serves the untrained
        # one at the same budget, and says so.
        print(f"[{time.perf_counter() - started:6.1f}s] no trained compressor at {compressor.scorer_dir}: serving the "
              f"untrained extractive one (train it: trustray run compressor_train --config "
              f"configs/compressor_train/cpu.yaml)", flush=True)
        serve_config.rag.compressor = compressor.model_copy(update={"scorer_dir": None})
    url = run_app(serve_config)
    t = step(f"Serve app up at {url}", t)

    try:
        ask_sample_questions(url)
        t = step(f"answered 3 questions over HTTP{' from the first slice' if first_slice else ''}", t)
        if first_slice is not None:
            print(f"[{time.perf_counter() - started:6.1f}s] building the full index; until it is ready the service "
                  f"answers from the first slice", flush=True)
            # Serve's replicas hold most of the CPUs a small machine's Ray counts (1.25 of 2 in the cpu preset): the
            # build's actors and splitting tasks ask for a quarter CPU each, sharing the cores with replicas that
            # mostly wait.
            beside_serve = index_config.model_copy(update={
                "split_cpus": 0.25, "resources": index_config.resources.model_copy(update={"num_cpus": 0.25})})
            serve_config.rag.index_dir = str(build_index.run(beside_serve))
            t = step(f"full index ready at {serve_config.rag.index_dir}", t)
            # Serve replaces the retriever's replica (its index changed); the other deployments keep running.
            run_app(serve_config)
            t = step("the service now retrieves from the full index", t)
            if not args.serve:
                ask_sample_questions(url)
                t = step("answered 3 questions over HTTP from the full index", t)
        if args.serve:
            serve_until_interrupted(url)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
        ray.shutdown()
    print(f"\nquickstart finished in {time.perf_counter() - started:.1f}s", flush=True)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from trustray.jobs import submit_main

    return submit_main(args.args)


def cmd_jobs(args: argparse.Namespace) -> int:
    from trustray.jobs import job_logs, list_jobs, stop_job

    if args.action == "list":
        return list_jobs(args.address)
    if args.job_id is None:
        raise SystemExit(f"trustray jobs {args.action} needs a submission id (see trustray jobs list)")
    if args.action == "logs":
        return job_logs(args.address, args.job_id, args.follow)
    return stop_job(args.address, args.job_id, args.wait)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustray", description="Trustworthy language models on Ray.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="RAG chat service on the embedded default, end to end")
    quick.add_argument("--serve", action="store_true", help="keep serving after the sample questions")
    quick.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    quick.add_argument("--full-index-first", action="store_true",
                       help="build the full index before serving (default: a first run answers from every 4th "
                       "document while the full index builds)")
    quick.add_argument("--index", dest="index_overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help="overrides for the index build (e.g. limit=500)")
    quick.add_argument("--serve-config", dest="serve_overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help="overrides for the Serve app")
    quick.set_defaults(func=cmd_quickstart)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible Serve app until Ctrl-C")
    serve.add_argument("--config", help="Serve config YAML, e.g. configs/serve/cpu.yaml")
    serve.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. port=8001")
    serve.set_defaults(func=cmd_serve)

    label = commands.add_parser("label", help="run the labeling service (web page and API) until Ctrl-C")
    label.add_argument("--config", help="labeling config YAML, e.g. configs/labeling/local.yaml")
    label.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. port=8001")
    label.set_defaults(func=cmd_label)

    run = commands.add_parser("run", help="run a pipeline")
    run.add_argument("pipeline", help="a job of trustray.pipelines.JOBS, e.g. build_index")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="[--config FILE] [KEY=VALUE ...]",
                     help="e.g. --config configs/build_index/cpu.yaml limit=100")
    run.set_defaults(func=cmd_run)

    evaluate = commands.add_parser("eval", help="run an evaluation")
    evaluate.add_argument("what", choices=sorted(pipelines.EVALUATIONS))
    evaluate.add_argument("args", nargs=argparse.REMAINDER, metavar="[--config FILE] [KEY=VALUE ...]",
                          help="e.g. --config configs/eval_rag/cpu.yaml top_k=5 [--compressor truncate "
                          "--compressor extractive=outputs/compressor_train/cpu/compressor], "
                          "--config configs/eval_influence/cpu.yaml lds.n_subsets=20")
    evaluate.set_defaults(func=cmd_eval)

    # Its own parser (trustray.jobs) reads options and KEY=VALUE overrides in any order.
    submit = commands.add_parser("submit", add_help=False,
                                 help="run a pipeline or an evaluation as a job on a Ray cluster (--help: options)")
    submit.add_argument("args", nargs=argparse.REMAINDER)
    submit.set_defaults(func=cmd_submit)

    jobs = commands.add_parser("jobs", help="list jobs on a Ray cluster, show their logs, stop them")
    jobs.add_argument("action", choices=["list", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="the submission id (logs, stop)")
    jobs.add_argument("--address", help=job_submission.ADDRESS_HELP)
    jobs.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    jobs.add_argument("--wait", action="store_true", help="stop: wait until the job has stopped")
    jobs.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "submit":  # its options before the pipeline name reach its own parser too
        args.args = extra + args.args
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
