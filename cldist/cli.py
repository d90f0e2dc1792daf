"""`cldist`: the command line (see CLI.md for the contract).

    cldist run [HYDRA OVERRIDES...]          train + evaluate a stream, print the summary table
    cldist run --multirun A=x,y B=0,1        a grid of runs side by side (a sweep), compared
    cldist resume RUN_DIR|SWEEP_DIR          continue an interrupted run, or finish a sweep
    cldist eval RUN_DIR                      re-score a finished run from its run directory
    cldist report RUN_DIR [RUN_DIR...]       report.md + report.html with plots; several = comparison
    cldist data build --source NAME --out DIR [--root PATH] [--tasks N] [--seed S] [--image-size PX]
                      [--class-order LIST|FILE] [--classes-per-task N,N,...] [--split-file PATH]
                      [--scenario class|domain] [--domains D,...] [--workers N]
    cldist data verify DIR                   check every shard against the manifest
    cldist bench [NAME...]                   the benchmark suite (docs/BENCHMARKS.md)

A bad option or override fails with one message naming it and the valid choices, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import Interrupted, UserError

from .config.overrides import (LR_FLAG, RESUME_LR_KEYS, RESUME_OVERRIDABLE, apply_overrides,
                               refuse_resume_overrides)


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
    run.add_argument("-m", "--multirun", action="store_true",
                     help="run the grid that comma lists (A=x,y), range(START,STOP) or "
                          "choice(...) span, side by side on one Ray cluster, into sweep_dir= "
                          "(default runs/sweep-TIMESTAMP); sweep.baseline='KEY=VALUE' adds the "
                          "paired per-seed comparison against that configuration")
    res = sub.add_parser("resume", help="continue an interrupted run from its last finished task")
    res.add_argument("run_dir")
    res.add_argument("overrides", nargs="*",
                     help=f"only {', '.join(RESUME_OVERRIDABLE)} may change on resume "
                          f"(and {', '.join(RESUME_LR_KEYS)} with {LR_FLAG})")
    res.add_argument(LR_FLAG, action="store_true",
                     help="accept new learning rates for the tasks not finished yet (the way "
                          "past a NaN loss); recorded in config.json and state.json")
    ev = sub.add_parser("eval", help="re-score a finished run from its run directory (Class-IL)")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", choices=["test"])
    ev.add_argument("--class-il", default=None, choices=["routed", "ensemble"],
                    help="sub-network methods: the Class-IL rule acc/accuracy_matrix report "
                         "(default: the run's eval.class_il); both are printed")
    ev.add_argument("--top-k", type=int, default=None, metavar="K",
                    help="routed: sub-networks run per image (default: the run's eval.top_k)")
    ev.add_argument("--combine", default=None, choices=["posterior_head", "lda_head", "top1"],
                    help="routed: the decision rule (default: the run's eval.combine)")
    rep = sub.add_parser("report", help="write report.md + report.html with plots; several "
                                         "runs = comparison (mean ± std over seeds)")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", default=None, help="comparison output .md, an .html is written "
                                                 "beside it (default: first run's "
                                                 "parent/comparison.md)")
    rep.add_argument("--no-tensorboard", action="store_true",
                     help="single run: do not write the figures to RUN_DIR/tb/report/")
    bench = sub.add_parser("bench", help="the benchmark suite (docs/BENCHMARKS.md)")
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help="scheduling, eval, routing, svd, loader, stream100 (default: all)")
    bench.add_argument("--out", default="runs/bench", help="where NAME.json files go")
    data = sub.add_parser("data", help="build or verify webdataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    b = dsub.add_parser("build", help="convert a dataset into per-task shards + manifest.json",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="sources (layouts and download links: docs/DATA.md):\n"
                               + _source_help())
    b.add_argument("--source", required=True, choices=_sources())
    b.add_argument("--out", required=True)
    b.add_argument("--root", default=None, help="where the raw dataset lies")
    b.add_argument("--tasks", type=int, default=None,
                   help="split the classes into N equal tasks (default 5)")
    b.add_argument("--classes-per-task", type=_int_list, default=None, metavar="N,N,...",
                   help="explicit task sizes instead of --tasks, e.g. 10,5,5")
    b.add_argument("--seed", type=int, default=1993,
                   help="class-order and subsampling seed (1993: the LoRA papers')")
    b.add_argument("--order", default="seeded", choices=["seeded", "natural"])
    b.add_argument("--class-order", default=None, metavar="LIST|FILE",
                   help="explicit class order: comma-separated class ids or names, or a file "
                        "of them (one per line or comma-separated)")
    b.add_argument("--image-size", type=_image_size, default=None, metavar="PX|original",
                   help="store images resized to PX x PX PNGs, or 'original' to keep the "
                        "image files as they are (default: native size; original files for "
                        "photo sources)")
    b.add_argument("--max-train-per-class", type=int, default=None)
    b.add_argument("--max-test-per-class", type=int, default=None)
    b.add_argument("--split-file", default=None, metavar="PATH",
                   help="train/test split: a file of 'RELPATH train|test' lines, or a directory "
                        "holding train.txt and test.txt (folder, imagenet_r, imagenet_a)")
    b.add_argument("--scenario", default="class", choices=["class", "domain"],
                   help="class-incremental tasks, or one task per domain with every class "
                        "(domainnet)")
    b.add_argument("--domains", type=_str_list, default=None, metavar="D,D,...",
                   help="domainnet: which domains, in task order (default: all found)")
    b.add_argument("--shard-size", type=int, default=1000, metavar="N",
                   help="at most N samples per shard")
    b.add_argument("--workers", type=int, default=1, help="parallel conversion processes")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    v = dsub.add_parser("verify", help="check every shard against the manifest")
    v.add_argument("dir")
    v.add_argument("--no-decode", action="store_true",
                   help="skip decoding every image (checksums, structure and labels only)")
    v.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="a host DIR (a URL) may be read from (as scenario.allowed_hosts); "
                        "repeatable")
    v.add_argument("--max-member-bytes", type=int, default=None, metavar="N",
                   help="the largest tar member accepted (as scenario.max_member_bytes; "
                        "default 64 MiB)")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         f"integers") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _image_size(text: str) -> int | str:
    if text == "original":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a size in pixels nor "
                                         f"'original'") from None


def _class_order(text: str) -> list[str]:
    """Class ids or names from `text`, or from the file `text` names."""
    path = Path(text)
    if path.is_file():
        lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                 if not line.lstrip().startswith("#")]
        items = [item for line in lines for item in line.split(",")]
    else:
        items = text.split(",")
    return [item.strip() for item in items if item.strip()]


def _source_help() -> str:
    from .data.sources import SOURCES
    return "\n".join(f"  {name:14s} {source.summary}" for name, source in SOURCES.items())


def _sources() -> list[str]:
    from .data.sources import SOURCES
    return sorted(SOURCES)


def cmd_run(overrides: list[str], multirun: bool = False) -> int:
    from .config.compose import compose
    from .stream import run_stream
    from .sweep import is_sweep, run_sweep
    if multirun:
        return run_sweep(overrides)
    swept = is_sweep(overrides)
    if swept:
        raise UserError(f"{swept} belongs to a sweep (several values, or a sweep's own key); "
                        f"add --multirun (-m) to run the grid, or give one value")
    cfg = compose(overrides)
    run_stream(cfg)
    return 0


def cmd_resume(run_dir: str, overrides: list[str], allow_lr: bool = False) -> int:
    from .rundir import RunDir
    from .sweep import SWEEP_FILE, resume_sweep
    refuse_resume_overrides(overrides, allow_lr)  # the arguments first: nothing read yet
    run = RunDir(run_dir)
    if (Path(run_dir) / SWEEP_FILE).is_file() and not run.state_path.exists():
        if allow_lr:
            raise UserError(f"{LR_FLAG} applies to one run: `cldist resume "
                            f"{run_dir}/MEMBER {LR_FLAG} ...` for the member that needs it, "
                            f"then `cldist resume {run_dir}` for the rest")
        return resume_sweep(run_dir, overrides)
    run.require()  # a foreign directory gets no lock file
    with run.lock():  # a second writer is refused until this run ends
        return _resume_locked(run_dir, overrides, allow_lr)


def _resume_locked(run_dir: str, overrides: list[str], allow_lr: bool) -> int:
    from .config.compose import config_from_dict, to_yaml
    from .rundir import RunDir
    from .stream import run_stream
    run = RunDir(run_dir)
    path, data = run.config_path, run.read_config()
    old_lrs = apply_overrides(data, overrides, allow_lr)
    cfg = config_from_dict(data, origin=str(path))
    foreign = [k for k in old_lrs if not hasattr(cfg.method, k.split(".")[1])]
    if foreign:  # config.json keeps every method's keys (format 1); this method has not these
        raise UserError(f"{', '.join(foreign)}: not an option of method {cfg.method.name} "
                        f"(run {run_dir}); its learning rate is method.lr")
    state = run.state()  # both read (and checked) before anything is changed
    run.read_manifest()
    changed = {k: getattr(cfg.method, k.split(".")[1]) for k, old in old_lrs.items()
               if getattr(cfg.method, k.split(".")[1]) != old}
    if changed:
        run.write_config(cfg.to_dict(), to_yaml(cfg))
        run.record_resume_overrides(state, changed, {k: old_lrs[k] for k in changed})
        print(f"[resume] {changed} applies to the tasks not finished yet; recorded in "
              f"{state.path}", flush=True)
    run_stream(cfg, resume_dir=run_dir)
    return 0


def cmd_eval(run_dir: str, class_il: str | None = None, top_k: int | None = None,
             combine: str | None = None) -> int:
    """Re-score a finished run; prints metrics.json's accuracy keys as JSON. Sub-network methods
    get both Class-IL rules from the blocks, and the final routed figure (with the router's
    task-id accuracy and forwards per image) from a true routed execution (score_routed)."""
    from .assemble import make_method, stream_evaluator
    from .config.compose import config_from_dict
    from .config.schema import validate
    from .eval.metrics import summarize
    from .eval.stream_evaluator import task_il_metrics
    from .rundir import RunDir
    from .runners.inline import InlineRunner
    run = RunDir(run_dir)
    path, data = run.config_path, run.read_config()
    cfg = config_from_dict(data, origin=str(path))
    for key, value in (("class_il", class_il), ("top_k", top_k), ("combine", combine)):
        if value is not None:
            setattr(cfg.eval, key, value)
    validate(cfg)  # --top-k 0 is named like eval.top_k=0 would be
    manifest = run.read_manifest()
    state = run.state()
    n = manifest.n_tasks
    missing = [t for t in range(n) if t not in state.completed]
    if missing:
        raise UserError(f"{run_dir} is unfinished (tasks {missing} missing); `cldist resume "
                        f"{run_dir}` first")
    n_test = [t.n_test for t in manifest.tasks]
    runner = InlineRunner(cfg, run_dir)
    evaluator = stream_evaluator(cfg, manifest, make_method(cfg).prediction, runner)
    for t in range(n):
        evaluator.task_finished(t)
    if evaluator.routing:  # the routed figure from running only the routed sub-networks
        routed = runner.scorer.score_routed(n - 1, list(range(n)), cfg.eval.top_k,
                                            cfg.eval.combine, cfg.router.shrinkage)
        evaluator.rows_routed[-1], evaluator.routed_scores[-1] = routed.row, routed
    s = summarize(evaluator.rows, n_test)
    out = {"acc": s["acc"], "aaa": s["aaa"], "forgetting": s["forgetting"], "bwt": s["bwt"],
           "accuracy_matrix": evaluator.rows, **task_il_metrics(evaluator.task_il_rows, n_test),
           **evaluator.class_il_metrics()}
    print(json.dumps(out, indent=2))
    return 0


def cmd_report(run_dirs: list[str], out: str | None, tensorboard: bool = True) -> int:
    from .report.report import html_path, write_comparison, write_report
    from .rundir import RunDir
    if len(run_dirs) == 1:
        run = RunDir(run_dirs[0])
        if run.is_run():  # else a hand-made metrics.json: nothing of cldist's to lock
            with run.lock():  # not while a run or resume writes into it
                markdown = write_report(run_dirs[0], tensorboard=tensorboard)
        else:
            markdown = write_report(run_dirs[0], tensorboard=tensorboard)
    else:
        target = Path(out) if out else Path(run_dirs[0]).parent / "comparison.md"
        if target.suffix.lower() == ".html":  # the .md would be overwritten by its twin
            raise UserError(f"--out {target}: give the .md path; the .html is written beside it")
        markdown = write_comparison(run_dirs, target)
    print(f"report: {markdown}")
    print(f"report: {html_path(markdown)}")
    return 0


def cmd_data(args) -> int:
    if args.data_command == "build":
        from .data.build import LineProgress, build_dataset
        if args.scenario == "domain" and (args.tasks is not None or args.classes_per_task):
            raise UserError("--scenario domain makes one task per domain, each with every "
                            "class: drop --tasks / --classes-per-task (choose and order the "
                            "domains with --domains)")
        if args.tasks is not None and args.classes_per_task:
            raise UserError("give --tasks or --classes-per-task, not both")
        m = build_dataset(
            args.source, args.out, root=args.root,
            n_tasks=args.tasks if args.tasks is not None else 5, seed=args.seed,
            order=args.order, image_size=args.image_size,
            classes_per_task=args.classes_per_task,
            max_train_per_class=args.max_train_per_class,
            max_test_per_class=args.max_test_per_class, shard_max_samples=args.shard_size,
            class_order=_class_order(args.class_order) if args.class_order else None,
            split_file=args.split_file, scenario=args.scenario, domains=args.domains,
            workers=args.workers, progress=None if args.quiet else LineProgress(sys.stderr))
        kind = (f"{m.n_tasks} domain tasks ({', '.join(t.domain for t in m.tasks)}) of "
                f"{m.n_classes} classes" if m.domain_incremental else f"{m.n_tasks} tasks")
        print(f"wrote {kind}, {sum(t.n_train for t in m.tasks)} train / "
              f"{sum(t.n_test for t in m.tasks)} test samples to {args.out}")
        return 0
    from .data.verify import verify_dataset
    problems = verify_dataset(args.dir, decode_images=not args.no_decode,
                              allowed_hosts=args.allow_host,
                              max_member_bytes=args.max_member_bytes)
    for p in problems:
        print(p, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    # refused data is exit 2 here as in `cldist run`: each problem above names its shard
    return 0 if not problems else 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `resume RUN OVERRIDES...` at a flag: take the overrides
    # after `--allow-lr-change` too (subparsers rule out parse_intermixed_args)
    # (and `run OVERRIDES... -m OVERRIDES...`)
    if extra and args.command in ("resume", "run") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            return cmd_run(args.overrides, args.multirun)
        if args.command == "resume":
            return cmd_resume(args.run_dir, args.overrides, args.allow_lr_change)
        if args.command == "eval":
            return cmd_eval(args.run_dir, args.class_il, args.top_k, args.combine)
        if args.command == "report":
            return cmd_report(args.run_dirs, args.out, tensorboard=not args.no_tensorboard)
        if args.command == "bench":
            from .bench import run_benchmarks
            run_benchmarks(args.names, Path(args.out))
            return 0
        if args.command == "data":
            return cmd_data(args)
    except (UserError, Interrupted) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
