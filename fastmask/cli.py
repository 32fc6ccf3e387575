"""fastmask-linearize: baseline -> SNL to B_ref -> BCD through the targets -> report, in one command.

Each stage runs only when its inputs do not already give its output: a --checkpoint skips the baseline, a model at
or below --ref-budget skips SNL, and --resume picks up every stage already finished in the out dir (BCD from its
last step). With no arguments it runs a small offline demo on the embedded digits dataset.

Everything that can be wrong with the input is checked before the out dir is touched; such errors print one line,
`fastmask-linearize: error: ...`, and exit non-zero. The settings and their checks live in fastmask.config, the
stages in fastmask.pipeline: this module only parses and calls.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from typing import Callable, Iterator, Optional, Sequence

from . import config as settings
from .errors import ArgumentParser, FastmaskError

PROG = "fastmask-linearize"
# Warnings from the ONNX exporter (deprecations, constant folding) say nothing a user of these commands can act on.
ONNX_MODULES = (r"torch\.onnx(\.|$)", r"onnx(\.|$)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                epilog="With no arguments: the offline digits demo (a few minutes on 2 CPU cores). The defaults shown "
                       "are the full-scale ones; on digits the demo preset replaces them (see config.yaml in its out "
                       "dir).")
    p.add_argument("--config", help="YAML file of settings (config.yaml's layout, or flag names with _); flags "
                                    "override it")
    p.add_argument("--preset", choices=sorted(settings.PRESETS),
                   help="paper: the paper's Algorithm 2 exactly; demo: the small offline run (the default on digits)")
    for group_name in settings.FLAG_PREFIX:
        group = p.add_argument_group(group_name)
        for s in settings.SETTINGS.values():
            if s.path.startswith(group_name + "."):
                _add(group, s)
    run_group = p.add_argument_group("run")
    for s in settings.SETTINGS.values():
        if "." not in s.path:
            _add(run_group, s)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _add(group, s: settings.Setting) -> None:
    # Flags default to SUPPRESS: a flag not typed must not override the preset or the --config file.
    meta = s.field.metadata
    default = s.field.default if s.field.default is not None and not callable(s.field.default) else None
    help_text = s.help + (f" (default: {default})" if default is not None and "default" not in s.help else "")
    group.add_argument("--" + s.flag, dest=s.dest, default=argparse.SUPPRESS, help=help_text,
                       choices=meta["choices"] or None, metavar=None if meta["choices"] else s.dest.upper())


def parse(argv: Sequence[str]):
    """(RunConfig, resume, progress) from the command line; checks every value, writes nothing."""
    args = vars(build_parser().parse_args(list(argv)))
    yaml_values = settings.read_yaml(args["config"]) if args.get("config") else {}
    flags = {settings.BY_DEST[k].path: v for k, v in args.items() if k in settings.BY_DEST}
    config = settings.resolve(flags, yaml_values, args.get("preset"))
    return settings.validate(config), bool(args.get("resume")), not args.get("quiet")


@contextlib.contextmanager
def one_line_warnings(prog: str = PROG) -> Iterator[None]:
    """Warnings are advice to the user (e.g. ADT below the scoring noise): one line, no source excerpt; the
    previous warning printer is back when the block ends."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"[{prog}] warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def log(message: str) -> None:
    print(f"[{PROG}] {message}", flush=True)


def run(argv: Sequence[str]) -> dict:
    """The pipeline, in this process alone or, under torchrun, as one of the group."""
    import torch.distributed as dist

    from . import distributed
    from .pipeline import Pipeline

    config, resume, progress = parse(argv)
    if distributed.launched():
        if os.environ.get("RANK") != "0":
            warnings.simplefilter("ignore")  # rank 0 says it once
        # torchrun stops the other processes with SIGTERM when one dies: say where the run stands, as for Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Pipeline.prepare(config, resume=resume, progress=progress, log=log).run()
    except dist.DistError as err:  # a peer died or stopped answering: torchrun names it and ends the others
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FastmaskError(f"lost contact with another process ({first}); the state on disk is the last completed "
                            "step: rerun the same command with --resume") from err
    finally:
        distributed.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_command(prog: str, body: Callable[[list[str]], object], argv: Optional[Sequence[str]],
                quiet_modules: tuple[str, ...] = ()) -> int:
    """Runs a console script's body: user errors as one line and exit 2, Ctrl-C as 130, --help as 0."""
    try:
        with warnings.catch_warnings(), one_line_warnings(prog):
            for module in quiet_modules:  # third-party chatter the user can do nothing about
                warnings.filterwarnings("ignore", module=module)
            body(list(sys.argv[1:] if argv is None else argv))
    except FastmaskError as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        rank = f" (rank {os.environ.get('RANK')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{prog}: error{rank}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun with --resume to continue" if prog == PROG else f"{prog}: interrupted",
              file=sys.stderr)
        return 130
    except SystemExit as done:  # --help
        return int(done.code or 0)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """fastmask-linearize."""
    from . import distributed

    code = run_command(PROG, run, argv)
    distributed.leave_if_launched(code)  # under torchrun: exit here, past an interpreter shutdown that gloo can abort
    return code


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """fastmask-export: ONNX in which Relu sees only the kept positions, a manifest and the masks."""
    from .pi.commands import export

    return run_command("fastmask-export", export, argv, quiet_modules=ONNX_MODULES)


def pi_main(argv: Optional[Sequence[str]] = None) -> int:
    """fastmask-pi: a measured two-party run of a model next to its all-ReLU version."""
    from .pi.commands import pi

    return run_command("fastmask-pi", pi, argv, quiet_modules=ONNX_MODULES + (r"crypten(\.|$)",))


if __name__ == "__main__":
    sys.exit(main())
