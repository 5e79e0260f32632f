"""``moe-interp``: the command line.

Every subcommand takes its options from flags or from a JSON/TOML file (``--config FILE``; flags win). Errors
print one line and exit with status 2; ``--traceback`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from moe_interp.errors import MoEInterpError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: ``arguments`` adds its options, the decorated function runs it."""

    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = (help, arguments, fn)
        return fn

    return register


def load_model_arg(spec: str, *, trust_remote_code: bool = False, dtype: str | None = None):
    """``demo`` -> the embedded demo model; anything else is a local model folder (safetensors only)."""
    if dtype is not None:
        import torch

        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise MoEInterpError(f"--dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16, float16)")
    if spec == "demo":
        from moe_interp.demo import load_demo

        model, tok = load_demo()
        return (model.to(getattr(torch, dtype)) if dtype else model), tok
    from moe_interp.loading import load_model

    return load_model(spec, trust_remote_code=trust_remote_code, dtype=dtype, require_moe=True)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (default) or a local model folder")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model folder's own Python code"
    )
    p.add_argument("--dtype", default=None, help="load dtype, e.g. float32 or bfloat16")


# ---------------------------------------------------------------------------------------------- commands
@command("architectures", "list the supported MoE architectures", lambda p: None)
def _architectures(args: argparse.Namespace) -> int:
    from moe_interp.architectures import get_architecture, supported_architectures

    for name in supported_architectures():
        arch = get_architecture(type("Config", (), {"model_type": name})())
        shared = f", shared expert at {arch.block}.{arch.shared_expert}" if arch.shared_expert else ""
        print(
            f"{name:14s} router {arch.layers}[i].{arch.block}.{arch.router}, score {arch.rule.score}{shared}"
        )
    return 0


def _trace_options(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument(
        "--prompts-file",
        help='a text file with one prompt per line, or a .jsonl file with one {"prompt", "context", '
        '"answer"} record per line (context and answer optional, per prompt)',
    )
    p.add_argument("--context", help="substring of the prompt marked as the context span")
    p.add_argument("--answer", help="substring marked as the answer span (inside the context)")
    p.add_argument("--out", default="runs/trace", help="output folder (default runs/trace)")
    p.add_argument("--expert-outputs", action="store_true", help="also record per-expert outputs")
    p.add_argument("--no-figures", action="store_true", help="do not write HTML/PNG figures")


@command(
    "trace",
    "trace prompts: routing, attention to spans; saves the trace, a frame and figures",
    _trace_options,
)
def _trace(args: argparse.Namespace) -> int:
    from moe_interp.plotting import save_figure
    from moe_interp.trace import trace

    prompts = list(args.prompt or [])
    contexts: list[str | None] | str | None = args.context
    answers: list[str | None] | str | None = args.answer
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise MoEInterpError(f"prompts file {path} does not exist")
        if path.suffix == ".jsonl":
            if prompts or args.context or args.answer:
                raise MoEInterpError(
                    f"{path} gives prompts, contexts and answers per record: drop --prompt/--context/--answer"
                )
            prompts, contexts, answers = _read_prompt_records(path)
        else:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise MoEInterpError("give at least one --prompt or a --prompts-file")
    model, tok = load_model_arg(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    t = trace(
        model,
        prompts,
        context=contexts,
        answer=answers,
        tokenizer=tok,
        expert_outputs=args.expert_outputs,
    )
    out = Path(args.out)
    t.save(out / "trace")
    t.routing_frame().to_csv(out / "routing.csv", index=False)
    if not args.no_figures:
        save_figure(t.plot_routing(0), out / "token_routing")
        save_figure(t.plot_selection(), out / "selection_heatmap")
    print(f"traced {len(prompts)} prompt(s), {len(t.tokens)} tokens, MoE layers {t.layers}; wrote {out}")
    return 0


RECORD_FIELDS = {"prompt", "context", "answer", "id", "meta"}


def _read_prompt_records(path: Path) -> tuple[list[str], list[str | None], list[str | None]]:
    """prompts, contexts and answers from a JSONL file of {"prompt", "context"?, "answer"?} records."""
    prompts: list[str] = []
    contexts: list[str | None] = []
    answers: list[str | None] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoEInterpError(f"{path} line {n} is not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise MoEInterpError(f'{path} line {n}: a record needs a string field "prompt"')
        unknown = sorted(set(record) - RECORD_FIELDS)
        if unknown:  # a misspelt "contxt" would otherwise trace without its span
            raise MoEInterpError(
                f'{path} line {n}: unknown field(s) {unknown}; a record has "prompt" and optionally '
                '"context", "answer" (and "id", "meta", which are ignored)'
            )
        for key in ("context", "answer"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise MoEInterpError(f'{path} line {n}: field "{key}" must be a string')
        prompts.append(record["prompt"])
        contexts.append(record.get("context"))
        answers.append(record.get("answer"))
    return prompts, contexts, answers


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="figures")


@command("demo", "the main job on the embedded demo model (as `make demo`)", _demo_options)
def _demo(args: argparse.Namespace) -> int:
    from moe_interp.demo_job import run

    print(run(args.examples, args.batch_size, args.out))
    return 0


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    _model_options(p)
    p.add_argument(
        "--dataset",
        required=True,
        help="a data set name (see moe_interp.data.list_datasets) or a JSON/JSONL file of records with "
        "question / context / answers fields (see moe_interp.data.load_examples)",
    )
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--mode", choices=["generate", "score"], default="generate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/eval/results.jsonl", help="per-example JSONL (resumes if present)")


@command("evaluate", "EM/F1 and Pc/Po of a model on a context-QA data set (resumable)", _evaluate_options)
def _evaluate(args: argparse.Namespace) -> int:
    from moe_interp.data import list_datasets, load_dataset, load_examples
    from moe_interp.evaluation import evaluate

    if args.dataset not in list_datasets() and Path(args.dataset).is_file():
        examples = load_examples(args.dataset, limit=args.limit)
    else:
        examples = load_dataset(args.dataset, args.split, limit=args.limit)
    model, tok = load_model_arg(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    frame = evaluate(model, tok, examples, out=args.out, mode=args.mode, batch_size=args.batch_size)
    summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in frame.summary().items()}
    print(json.dumps(summary, indent=1, default=float))
    return 0


# ------------------------------------------------------------------------------------- pipeline commands
#: subcommands that hand their arguments to a pipeline module's ``main(argv)`` (its own --help applies)
PIPELINES = {
    "routerlens": (
        "moe_interp.routerlens.run",
        "Router Lens: tune routers, count selections, find CE/OE, compare",
    ),
    "attention": (
        "moe_interp.analysis.run",
        "attention amplification (CAG/AAG), logit lens (APG), attribution",
    ),
    "ceft": ("moe_interp.ceft.run", "CEFT and its baselines (FFT, RT, random experts, LoRA) on accelerate"),
    "figures": ("moe_interp.figures", "regenerate every paper figure from the demo model into figures/"),
}


def _run_pipeline(name: str, argv: list[str]) -> int:
    from importlib import import_module

    module = PIPELINES[name][0]
    try:
        entry = import_module(module).main
    except ModuleNotFoundError as exc:
        raise MoEInterpError(f"{module} is not available in this installation ({exc})") from exc
    program = sys.argv[0]
    sys.argv[0] = f"moe-interp {name}"  # the pipeline's --help and errors name the subcommand
    try:
        result = entry(argv)
    finally:
        sys.argv[0] = program
    return result if isinstance(result, int) else 0


def _config_to_argv(values: dict) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv


# ---------------------------------------------------------------------------------------------- plumbing
def _read_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise MoEInterpError(f"config file {file} does not exist")
    try:
        data = tomllib.loads(file.read_text()) if file.suffix == ".toml" else json.loads(file.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MoEInterpError(
            f"config file {file} is not valid {file.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise MoEInterpError(f"config file {file} must hold a table/object of option names")
    return {k.replace("-", "_"): v for k, v in data.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe-interp", description="Interpretability of Mixture-of-Experts language models.")
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    subs = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, arguments, _) in _COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help="JSON or TOML file of option values (flags take precedence)")
        arguments(sub)
    for name, (_, help_text) in PIPELINES.items():
        sub = subs.add_parser(name, help=help_text, add_help=False)
        sub.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    traceback = "--traceback" in argv  # accepted before or after the subcommand
    argv = [a for a in argv if a != "--traceback"]
    first = next((a for a in argv if not a.startswith("-")), None)
    command_name = first or "?"
    try:
        if first in PIPELINES:  # the pipeline's own parser reads everything after its name
            rest = argv[argv.index(first) + 1 :]
            if "--config" in rest:
                at = rest.index("--config")
                if at + 1 >= len(rest):
                    raise MoEInterpError("--config needs a file name")
                rest = _config_to_argv(_read_config(rest[at + 1])) + rest[:at] + rest[at + 2 :]
            return _run_pipeline(first, rest)
        parser = build_parser()
        args = parser.parse_args(argv)
        command_name = args.command
        if getattr(args, "config", None):
            args = _apply_config(parser, args)
        return _COMMANDS[args.command][2](args)
    except (MoEInterpError, FileNotFoundError, ValueError, OSError, KeyError) as exc:
        if traceback:
            raise
        print(f"moe-interp {command_name}: error: {exc}", file=sys.stderr)
        return 2


def _apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Options from ``--config`` where the command line left them at their defaults (flags win)."""
    sub = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
    actions = {a.dest: a for a in sub._actions}  # noqa: SLF001
    values = _read_config(args.config)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise MoEInterpError(f"config file {args.config}: unknown option(s) {unknown}")
    for key, value in values.items():
        action = actions[key]
        if getattr(args, key) != action.default:
            continue  # given on the command line
        if isinstance(action, argparse._AppendAction) and isinstance(value, str):  # noqa: SLF001
            value = [value]
        if action.type is not None and value is not None and not isinstance(value, list):
            value = action.type(value)
        setattr(args, key, value)
    return args


if __name__ == "__main__":
    sys.exit(main())
