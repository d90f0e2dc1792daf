"""`cldist`: the command line (see CLI.md for the contract).

    cldist run [HYDRA OVERRIDES...]          train + evaluate a stream, print the summary table
    cldist resume RUN_DIR                    continue an interrupted run
    cldist eval RUN_DIR                      re-score a finished run from its run directory
    cldist report RUN_DIR [RUN_DIR...]       report.md with plots; several = comparison
    cldist data build --source NAME --out DIR [--root PATH] [--tasks N] [--seed S] [--image-size PX]
    cldist data verify DIR                   check every shard against the manifest

A bad option or override fails with one message naming it and the valid choices, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

RESUME_OVERRIDABLE = ("cluster.", "trainer.max_concurrent_tasks", "trainer.max_failures",
                      "runner", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: exit 2 with one message
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _config_help() -> str:
    try:
        from .config.compose import group_choices
        from .config.schema import RunConfig
        from dataclasses import fields
        lines = ["config groups:"]
        for g in ("method", "scenario", "backbone"):
            lines.append(f"  {g}=  {', '.join(group_choices(g))}")
        lines.append("keys (override as KEY=VALUE):")
        cfg = RunConfig()
        for section in ("trainer", "cluster", "method", "scenario", "backbone"):
            obj = getattr(cfg, section)
            lines.append("  " + "  ".join(f"{section}.{f.name}" for f in fields(obj)))
        lines.append("  runner=ray|inline  seed=  run_dir=  report=")
        return "\n".join(lines)
    except Exception as e:  # noqa: BLE001 - help must print even with a broken config dir
        return f"(config keys unavailable: {e})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cldist", description="Distributed LoRA-based class-incremental learning.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train + evaluate a stream",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="examples:\n  cldist run\n  cldist run method=pearl "
                                "scenario=digits_5t backbone=test_vit runner=inline\n\n"
                                + _config_help())
    run.add_argument("overrides", nargs="*", help="Hydra overrides KEY=VALUE")
    res = sub.add_parser("resume", help="continue an interrupted run from its last finished task")
    res.add_argument("run_dir")
    res.add_argument("overrides", nargs="*",
                     help=f"only {', '.join(RESUME_OVERRIDABLE)} may change on resume")
    ev = sub.add_parser("eval", help="re-score a finished run from its run directory (Class-IL)")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", choices=["test"])
    rep = sub.add_parser("report", help="write report.md with plots; several runs = comparison")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", default=None, help="comparison output (default: first run's "
                                                 "parent/comparison.md)")
    data = sub.add_parser("data", help="build or verify webdataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    b = dsub.add_parser("build", help="convert a dataset into per-task shards + manifest.json")
    b.add_argument("--source", required=True, choices=_sources())
    b.add_argument("--out", required=True)
    b.add_argument("--root", default=None, help="where the raw dataset lies")
    b.add_argument("--tasks", type=int, default=5)
    b.add_argument("--seed", type=int, default=1993, help="class-order seed (1993: the LoRA papers')")
    b.add_argument("--order", default="seeded", choices=["seeded", "natural"])
    b.add_argument("--image-size", type=int, default=None, help="store images resized to PX")
    b.add_argument("--max-train-per-class", type=int, default=None)
    b.add_argument("--max-test-per-class", type=int, default=None)
    v = dsub.add_parser("verify", help="check every shard against the manifest")
    v.add_argument("dir")
    return p


def _sources() -> list[str]:
    from .data.sources import SOURCES
    return sorted(SOURCES)


def cmd_run(overrides: list[str]) -> int:
    from .config.compose import compose
    from .stream import run_stream
    cfg = compose(overrides)
    run_stream(cfg)
    return 0


def cmd_resume(run_dir: str, overrides: list[str]) -> int:
    from .config.schema import RunConfig, validate
    from .stream import run_stream
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a cldist run directory (no config.json)")
    data = json.loads(path.read_text())
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(RESUME_OVERRIDABLE)]
    if bad:
        raise UserError(f"resume keeps the run's own config; {bad} would change it. Only "
                        f"{', '.join(RESUME_OVERRIDABLE)} may be overridden on resume - start a "
                        f"new run for other changes")
    for o in overrides:
        key, _, value = o.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        if leaf not in node:
            raise UserError(f"override {key!r} does not exist")
        node[leaf] = _parse_value(value)
    cfg = validate(RunConfig.from_dict(data))
    run_stream(cfg, resume_dir=run_dir)
    return 0


def _parse_value(text: str):
    import yaml
    return yaml.safe_load(text) if text != "" else ""


def cmd_eval(run_dir: str) -> int:
    from .config.schema import RunConfig
    from .coordinator.store import RunState, load_run_manifest
    from .eval.metrics import summarize
    from .runners.inline import InlineRunner
    from .stream import StreamEvaluator
    from .train.task import make_method
    cfg = RunConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    manifest = load_run_manifest(run_dir)
    state = RunState(run_dir)
    n = manifest.n_tasks
    missing = [t for t in range(n) if t not in state.completed]
    if missing:
        raise UserError(f"{run_dir} is unfinished (tasks {missing} missing); `cldist resume "
                        f"{run_dir}` first")
    n_test = [t.n_test for t in manifest.tasks]
    evaluator = StreamEvaluator(make_method(cfg).prediction, InlineRunner(cfg, run_dir), n, n_test)
    for t in range(n):
        evaluator.task_finished(t)
    s = summarize(evaluator.rows, n_test)
    out = {"acc": s["acc"], "aaa": s["aaa"], "forgetting": s["forgetting"], "bwt": s["bwt"],
           "accuracy_matrix": evaluator.rows}
    print(json.dumps(out, indent=2))
    return 0


def cmd_report(run_dirs: list[str], out: str | None) -> int:
    from .report.report import write_comparison, write_report
    if len(run_dirs) == 1:
        print(write_report(run_dirs[0]))
    else:
        target = Path(out) if out else Path(run_dirs[0]).parent / "comparison.md"
        print(write_comparison(run_dirs, target))
    return 0


def cmd_data(args) -> int:
    if args.data_command == "build":
        from .data.build import build_dataset
        m = build_dataset(args.source, args.out, root=args.root, n_tasks=args.tasks, seed=args.seed,
                          order=args.order, image_size=args.image_size,
                          max_train_per_class=args.max_train_per_class,
                          max_test_per_class=args.max_test_per_class)
        print(f"wrote {m.n_tasks} tasks, {sum(t.n_train for t in m.tasks)} train / "
              f"{sum(t.n_test for t in m.tasks)} test samples to {args.out}")
        return 0
    from .data.verify import verify_dataset
    problems = verify_dataset(args.dir)
    for p in problems:
        print(p, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args.overrides)
        if args.command == "resume":
            return cmd_resume(args.run_dir, args.overrides)
        if args.command == "eval":
            return cmd_eval(args.run_dir)
        if args.command == "report":
            return cmd_report(args.run_dirs, args.out)
        if args.command == "data":
            return cmd_data(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
