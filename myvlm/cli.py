"""The ``myvlm`` command: personalize, caption and manage concepts from the shell.

    myvlm demo                                             # the pretrained toy world, < 1 min on a CPU
    myvlm train --concept my_dog --data data/ --backbone blip2_opt_2.7b train.steps=50
    myvlm caption photos/*.jpg --concepts concepts --explain
    myvlm concepts list

Flags cover the common choices; everything else is a Hydra ``key=value`` override of the
configs in ``configs/`` (``--print-config`` shows them). Errors are one line on stderr,
``myvlm: error: ...``, exit code 2 for a wrong flag or config and 1 when the work failed;
``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

logger = logging.getLogger("myvlm.cli")

PROG = "myvlm"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the flag and point to ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("myvlm")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return "unknown (not installed)"


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-v: debug for myvlm and tracebacks on errors, -vv: every library)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and errors, no progress bars")
    return common


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", metavar="DIR", help="folder of the YAML configs (default: $MYVLM_CONFIG_DIR, "
                        "then configs/ of the source checkout)")
    parser.add_argument("--print-config", action="store_true", help="print the composed config and exit")


def _groups_epilog() -> str:
    from myvlm.cli_config import GROUPS, ConfigError, find_config_dir, group_options

    try:
        directory = find_config_dir()
    except ConfigError as error:
        return f"config groups: unavailable ({error})"
    lines = [f"config groups ({directory}), chosen with GROUP=NAME:"]
    lines += [f"  {group}: {', '.join(group_options(group, directory))}" for group in GROUPS]
    return "\n".join(lines)


def _add_train(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="personalize one concept and write its concept folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_groups_epilog() + (
                           "\n\nexample:\n  myvlm train --concept my_dog --data data --backbone blip2_opt_2.7b "
                           "train.steps=50 head.threshold=0.6"),
                       description="Fit the concept head, train the concept embedding, write <output>/<concept>/.")
    p.add_argument("--concept", metavar="NAME", help="concept name (letters, digits, _ . -)")
    p.add_argument("--data", metavar="ROOT", help="data root: photos (+ captions.json) in ROOT/<concept>/")
    p.add_argument("--images", metavar="PATH", nargs="+", help="image files, folders or globs instead of --data")
    p.add_argument("--identifier", help="the word the VLM says for the concept (default: sks)")
    p.add_argument("--class-word", metavar="WORD", help="what the VLM calls it (e.g. dog): targets from its captions")
    p.add_argument("--kind", choices=["object", "person"], help="object (default) or person")
    p.add_argument("--backbone", metavar="NAME|ID|DIR", help="a backbone config name, hub id or checkpoint folder")
    p.add_argument("--head", metavar="NAME", help="a head config name (default: auto, by --kind)")
    p.add_argument("--head-from", metavar="DIR", help="reuse the fitted head of this concept folder")
    p.add_argument("--negatives", metavar="DIR", help="folder of photos that are not the concept, for the head")
    p.add_argument("--output", metavar="DIR", help="concept library to write into (default: concepts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing concept of the same name")
    p.add_argument("--steps", type=int, help="embedding training steps (train.steps)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (backbone.device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="backbone dtype")
    _config_flags(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides, e.g. train.lr=0.5 head=face")
    p.set_defaults(handler=_lazy("myvlm.cli_train", "run_train"), positional="overrides")


def _add_caption(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("caption", parents=[common], help="caption images with every concept of a library",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Caption images (files, folders, globs); one line per image: path<TAB>caption.",
                       epilog="examples:\n  myvlm caption photos/ --explain\n  myvlm caption a.jpg b.jpg --json "
                              "--concepts=concepts/my_dog\n  myvlm caption 'trip/*.jpg' --question 'Where is sks?'")
    p.add_argument("inputs", nargs="*", metavar="IMAGE|key=value", help="images, folders, globs; and overrides")
    p.add_argument("--concepts", nargs="+", metavar="DIR|NAME", help="concept folders, library folders or names in "
                   "--library (default: the whole library); put it after the images, or use --concepts=DIR")
    p.add_argument("--library", metavar="DIR", help="concept library (default: concepts)")
    p.add_argument("--json", action="store_true", help="print a JSON list: image, text, active, detections")
    p.add_argument("--explain", action="store_true", help="show which heads fired and their scores")
    p.add_argument("--prompt", help="captioning prompt, for backbones that take one")
    p.add_argument("--question", help="ask this question about every image instead (task=vqa)")
    p.add_argument("--force", nargs="+", metavar="NAME", help="inject these concepts whatever their heads say")
    p.add_argument("--backbone", metavar="ID|DIR", help="backbone checkpoint (default: the concepts' own)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 8)")
    _config_flags(p)
    p.set_defaults(handler=_lazy("myvlm.cli_caption", "run_caption"), positional="inputs")


def _add_concepts(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("concepts", parents=[common], help="list, show or remove the concepts of a library",
                       description="Inspect a concept library (default ./concepts).")
    actions = p.add_subparsers(dest="action", metavar="{list,show,remove}", required=True, parser_class=_Parser)
    listing = actions.add_parser("list", parents=[common], help="one line per concept")
    listing.add_argument("--json", action="store_true", help="print the concept.json of every concept as a list")
    show = actions.add_parser("show", parents=[common], help="everything concept.json records about one concept")
    show.add_argument("concept", metavar="NAME|DIR")
    show.add_argument("--json", action="store_true", help="print concept.json as it is")
    remove = actions.add_parser("remove", parents=[common], help="delete concept folders (needs --yes)")
    remove.add_argument("names", nargs="+", metavar="NAME|DIR")
    remove.add_argument("--yes", action="store_true", help="really delete (without it, only say what would go)")
    for action in (listing, show, remove):
        action.add_argument("--library", metavar="DIR", default="concepts", help="concept library (default: concepts)")
    p.set_defaults(handler=_lazy("myvlm.cli_concepts", "run_concepts"))


def _add_demo(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="personalize a tiny pretrained VLM to a toy-world object (offline)",
                       description="Personalize the shipped tiny toy-world BLIP-2 (pretrained on scenes of shapes) "
                                   "to one object from 4 photos: fit the head, train the embedding, caption unseen "
                                   "photos of it, of a look-alike and of another scene before and after, and print "
                                   "recall / false positives / context. --world random runs the same mechanics on "
                                   "tiny random models (gibberish captions). < 1 min on 2 CPU cores.")
    p.add_argument("--workdir", metavar="DIR", help="where the tiny model, drawings and concept go "
                   "(default: $XDG_CACHE_HOME/myvlm/demo or ~/.cache/myvlm/demo)")
    p.add_argument("--steps", type=int, default=100, help="embedding training steps (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawings and the training (default 0)")
    p.add_argument("--world", choices=["toy", "random"], default="toy",
                   help="toy: the pretrained tiny toy-world BLIP-2 and CLIP shipped in myvlm/toyworld (default); "
                        "random: tiny random models, mechanics only")
    p.set_defaults(handler=_lazy("myvlm.demo", "run_demo_command"))


def _add_eval(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``myvlm eval`` lives in ``myvlm.eval.cli`` (its own flags); absent from a checkout, it is left out."""
    try:
        from myvlm.eval.cli import HELP, add_eval_arguments
    except ImportError:
        return
    add_eval_arguments(sub.add_parser("eval", parents=[common], help=HELP))


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """Import the command's module only when it runs: ``myvlm --help`` stays fast."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog=PROG, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Personalize frozen vision-language models (MyVLM): train concepts, caption "
                                 "with them, manage concept libraries.",
                     epilog="Run `myvlm COMMAND --help` for a command's flags. train and caption also take Hydra "
                            "key=value\noverrides of configs/ (--print-config shows them). Docs: README.md")
    parser.add_argument("--version", action="version", version=f"myvlm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for add in (_add_train, _add_caption, _add_concepts, _add_demo, _add_eval):
        add(sub, common)
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse flags; stray words go to the command's positional list (images after flags, overrides)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags = [item for item in extra if item.startswith("-")]
    if flags or (extra and not getattr(args, "positional", None)):
        prog = f"{PROG} {args.command}" + (f" {args.action}" if getattr(args, "action", None) else "")
        _Parser(prog=prog).error(f"unrecognized argument {(flags or extra)[0]!r}")
    if extra:
        setattr(args, args.positional, (getattr(args, args.positional) or []) + extra)
    return args


# ---- logging ---------------------------------------------------------------------------------


@contextmanager
def cli_logging(verbose: int = 0, quiet: bool = False) -> Iterator[None]:
    """Log to stderr while a command runs: INFO for myvlm (DEBUG with -v, WARNING and up with -q),
    WARNING for other libraries (everything with -vv). The previous setup is restored afterwards."""
    root, package = logging.getLogger(), logging.getLogger("myvlm")
    saved = root.level, package.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose
                                           else "%(levelname)s: %(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
    package.setLevel(logging.DEBUG if verbose else logging.INFO)  # the run's log file gets INFO even with -q
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        package.setLevel(saved[1])


@contextmanager
def log_file(path: Path) -> Iterator[None]:
    """Also write myvlm's log (INFO and up, DEBUG with -v) to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("myvlm")
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        handler.close()


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """``-q`` turns off Hugging Face's bars (myvlm's own follow ``progress=``) for this command."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---- entry point -----------------------------------------------------------------------------


def _fail(error: BaseException, code: int, verbose: int) -> int:
    if verbose:
        logger.error("traceback:", exc_info=error)
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error) or type(error).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``myvlm`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a one-line usage error already printed
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    verbose, quiet = getattr(args, "verbose", 0) or 0, bool(getattr(args, "quiet", False))
    args.verbose, args.quiet = verbose, quiet
    with cli_logging(verbose, quiet):
        return _run(args, verbose, quiet)


def _run(args: argparse.Namespace, verbose: int, quiet: bool) -> int:
    from myvlm.cli_config import ConfigError

    try:
        with _progress_bars(not quiet):
            return int(args.handler(args) or 0)
    except ConfigError as error:
        return _fail(error, 2, verbose)
    except BrokenPipeError:  # `myvlm ... | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stops the interpreter's flush error at exit
        return 141
    except (ValueError, OSError, KeyError, ImportError, RuntimeError, ArithmeticError) as error:
        return _fail(error, 1, verbose)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
