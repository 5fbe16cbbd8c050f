"""``cmrcnn-tune`` / ``python -m cmrcnn_ext.tune``: hyperparameter studies on your own data.

Commands::

    # train one run per trial (Optuna TPE, seeded); resume: the same command again
    cmrcnn-tune run --config-file my.yaml --space reference_space.yaml --study-dir studies/a \\
        --trials 30 [--timeout 36000] [--seed 0] [--multi-objective] [--one-at-a-time] \\
        [--train-json ... --train-images ... --val-json ... --val-images ...] [KEY VALUE ...]
    # evaluate one checkpoint per setting of the inference-only keys (nothing retrained)
    cmrcnn-tune sweep --config-file my.yaml --weights out/model_final.pth \\
        --space test_time_space.yaml --study-dir studies/t --one-at-a-time
    # rewrite report.md from the storage (e.g. of a study run by many workers)
    cmrcnn-tune report --study-dir studies/a

Many workers, one study: start the same ``run`` command on each machine with the same
``--storage`` (a database URL, or ``journal:/shared/fs/study.log``) and ``--study-name``;
docs/tuning.md has the recipe.
"""

import argparse
import os
import signal
import sys

from cmrcnn_ext.engine.cli import add_debug_argument, run
from cmrcnn_ext.engine.setup import DATA_FLAGS, command_line_opts

__all__ = ["cli", "get_parser", "main"]

SPACE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tune", "spaces")


def resolve_space(path: str) -> str:
    """A search-space file: the path itself, else the packaged space of that name
    (``reference_space.yaml``, ``test_time_space.yaml`` in ``cmrcnn_ext/tune/spaces``)."""
    if os.path.isfile(path):
        return path
    packaged = os.path.join(SPACE_DIR, path if path.endswith(".yaml") else path + ".yaml")
    return packaged if os.path.isfile(packaged) else path


def _study_arguments(p, sweep: bool):
    p.add_argument("--config-file", required=True, help="config (path or packaged name)")
    p.add_argument(
        "--space",
        required=True,
        help="search-space YAML (a path, or a packaged one: "
        + ", ".join(sorted(f for f in os.listdir(SPACE_DIR) if f.endswith(".yaml")))
        + ")",
    )
    p.add_argument("--study-dir", required=True, help="folder of the study: trials, report")
    if sweep:
        p.add_argument("--weights", required=True, help="the trained checkpoint to evaluate")
    p.add_argument("--trials", type=int, help="trials of the whole study (all workers)")
    p.add_argument("--timeout", type=float, help="stop starting trials after SECONDS")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument(
        "--storage",
        help="Optuna storage: a SQLAlchemy URL (postgresql://..., sqlite:///...) or "
        "journal:/path/file.log (default: sqlite:///<study-dir>/study.db)",
    )
    p.add_argument("--study-name", help="name in the storage (default: the study folder's name)")
    p.add_argument(
        "--sampler",
        default="tpe",
        choices=("tpe", "random", "cmaes", "grid"),
        help="Optuna sampler (default tpe, seeded)",
    )
    p.add_argument(
        "--metric", default="segm/AP", help="objective: TASK/NAME from results (default segm/AP)"
    )
    p.add_argument(
        "--multi-objective",
        action="store_true",
        help="maximise the metric and minimise inference ms/image: the result is a Pareto front",
    )
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="the base config, then each value of each key alone (what each knob does)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=600.0,
        help="a running trial of another host with no heartbeat for SECONDS is re-run",
    )
    if not sweep:
        p.add_argument(
            "--pruner",
            default="median",
            choices=("median", "hyperband", "threshold", "none"),
            help="stop unpromising trials at their TEST.EVAL_PERIOD evaluations (default median)",
        )
        p.add_argument("--prune-below", type=float, help="--pruner threshold: the metric's floor")
        p.add_argument("--num-gpus", type=int, default=1, help="processes per trial (DDP)")
    group = p.add_argument_group("your own COCO-format data (as for train_net.py)")
    for attr in DATA_FLAGS:
        group.add_argument("--" + attr.replace("_", "-"))
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    add_debug_argument(p)


def get_parser():
    parser = argparse.ArgumentParser(
        prog="cmrcnn-tune",
        description="Hyperparameter studies for cmrcnn_ext (Optuna). Run the same command "
        "again to resume a study; run it on several machines with one --storage to share it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _study_arguments(sub.add_parser("run", help="one training run per trial"), sweep=False)
    _study_arguments(
        sub.add_parser("sweep", help="evaluate one checkpoint per setting (no training)"),
        sweep=True,
    )
    rep = sub.add_parser("report", help="rewrite report.md from the study's storage")
    rep.add_argument("--study-dir", required=True)
    rep.add_argument("--storage")
    rep.add_argument("--study-name")
    add_debug_argument(rep)
    return parser


def _options(args):
    from cmrcnn_ext.tune.study import StudyOptions

    opts = [x for x in command_line_opts(args) if x != "--"]
    return StudyOptions(
        kind="test-time" if args.command == "sweep" else "train",
        config_file=args.config_file,
        opts=opts,
        space_path=resolve_space(args.space),
        study_dir=args.study_dir,
        storage=args.storage,
        study_name=args.study_name,
        trials=args.trials,
        timeout=args.timeout,
        seed=args.seed,
        sampler=args.sampler,
        pruner=getattr(args, "pruner", "none"),
        prune_below=getattr(args, "prune_below", None),
        metric=args.metric,
        multi_objective=args.multi_objective,
        one_at_a_time=args.one_at_a_time,
        num_gpus=getattr(args, "num_gpus", 1),
        weights=getattr(args, "weights", None),
        stale_after=args.stale_after,
    )


def main(args):
    """Run the command; returns ``run_study``'s result (``report`` for ``report``)."""
    from cmrcnn_ext.model_zoo import resolve_config_file
    from cmrcnn_ext.tune.study import open_existing, run_study

    if args.command == "report":
        return open_existing(args.study_dir, args.storage, args.study_name)
    o = _options(args)
    o.config_file = resolve_config_file(o.config_file)
    if args.command == "sweep":
        from cmrcnn_ext.tune.sweep import SweepRunner

        if not os.path.isfile(o.weights):
            from cmrcnn_ext.errors import UserError

            raise UserError(f"--weights {o.weights!r}: no such file")
        runner = SweepRunner(o.config_file, o.weights, list(o.opts))
    else:
        from cmrcnn_ext.tune.trial import TrialRunner

        runner = TrialRunner(o.config_file, list(o.opts), o.metric, o.num_gpus)
    out = run_study(o, runner)
    print(f"study: {len(out['study'].trials)} trials in the storage; report: {out['report']}")
    return out


def _terminate(signum, frame):  # SIGTERM (a scheduler's pre-emption) stops like Ctrl-C
    raise KeyboardInterrupt


def cli(argv=None):
    """Console script ``cmrcnn-tune`` (and ``python -m cmrcnn_ext.tune``)."""
    args = get_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        run(main, args, argv=argv)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the running trial is marked and will be re-run; run the same "
            "command again to resume the study",
            file=sys.stderr,
        )
        sys.exit(130)
