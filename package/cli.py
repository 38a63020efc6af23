"""What every command line (sparsevlm-export, -run, -calibrate, -build, -triton) shares: how
a failure reaches the user, and the checks of output locations made before any work.

    @command("sparsevlm-export")
    def main(argv=None) -> int: ...

A wrapped `main` returns an exit status instead of raising:
  0 / what `main` returns   success (or the command's own status)
  2  a user-caused failure: one line on stderr, `<prog>: error: <message>`, where the message
     names the input and what was expected. User-caused means an error the toolkit raised
     on purpose (a ValueError or RuntimeError raised from sparsevlm code: ConfigError,
     ArtifactError, InputError, "no CUDA device", ...) or an operating-system error (missing
     file, permission denied, disk full, read-only location): the inputs or the machine, not
     a bug.
  1  anything else (a bug, or a library failing in a way we did not anticipate): one line
     `<prog>: internal error: ...`.
  130 Ctrl-C: one line `<prog>: interrupted` (143 and `<prog>: terminated` for SIGTERM,
     which is raised like Ctrl-C while a command runs). Output directories are written
     through `sparsevlm.methods.files.atomic_directory`, which removes its partial directory
     when the interrupt unwinds through it, so nothing half-written is left.
With `--verbose` (every command has it), the traceback is printed before the line.

Spelled the same in every command: `--verbose`, `--quiet` (no progress bars, where a command
has them), `--artifact DIR` (an exported artifact to read), `--out` (what the command
writes), and the method group (`add_method_arguments`: --method, --budget, --variant and
the method's parameters), declared once here for sparsevlm-export and sparsevlm-calibrate.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Sequence

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
VERBOSE_FLAG = "--verbose"


def add_verbose_flag(parser) -> None:
    """The `--verbose` option every command takes (tracebacks, and the command's own logging)."""
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="print the traceback of a failure (and more logging)")


def add_quiet_flag(parser) -> None:
    """The `--quiet` option of the commands that show progress bars (export, calibrate)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


ARTIFACT_FLAG = "--artifact"


def add_artifact_argument(parser, *, required: bool = True, help: str = "") -> None:
    """`--artifact DIR`, the one spelling of an exported artifact for every command that reads one."""
    parser.add_argument(ARTIFACT_FLAG, metavar="DIR", required=required,
                        help=help or "artifact directory written by sparsevlm-export (has manifest.json)")


def _raised_by_toolkit(error: BaseException) -> bool:
    """Whether the innermost frame that raised `error` is sparsevlm code (a deliberate check)."""
    tb = error.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals
    spec = module.get("__spec__")  # `python -m sparsevlm...` runs the module as __main__
    name = spec.name if spec is not None else module.get("__name__", "")
    return str(name).startswith("sparsevlm")


def is_user_error(error: BaseException, extra: tuple[type, ...] = ()) -> bool:
    """OSErrors (missing files, permissions, full or read-only disks), and the ValueErrors and
    RuntimeErrors the toolkit raises on purpose (ConfigError, ArtifactError, "no CUDA
    device", ...). The same types raised inside a library are not: they are reported as
    internal errors, as the toolkit should have caught the cause first."""
    if isinstance(error, (OSError, *extra)):
        return True
    deliberate = isinstance(error, (ValueError, RuntimeError)) and not isinstance(error, NotImplementedError)
    return deliberate and _raised_by_toolkit(error)


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that partial outputs are cleaned up."""


def _raise_terminated(signum, frame):
    raise Terminated()


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_cli(prog: str, main_fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
            user_errors: tuple[type, ...] = ()) -> int:
    """Run `main_fn(argv)` and turn every way it can end into an exit status (module docstring).

    user_errors: further exception types that are the user's doing (e.g. a command's
    RuntimeError subclass for a missing build tool)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = main_fn(argv)
    except (KeyboardInterrupt, Terminated) as interrupt:
        notes = "; ".join(getattr(interrupt, "__notes__", []))
        what = "interrupted" if isinstance(interrupt, KeyboardInterrupt) else "terminated"
        print(f"\n{prog}: {what}" + (f"; {one_line(notes)}" if notes else ""), file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(interrupt, KeyboardInterrupt) else EXIT_TERMINATED
    except SystemExit as done:  # argparse: usage errors exit 2, --help exits 0
        return done.code if isinstance(done.code, int) else (0 if done.code is None else EXIT_USER)
    except Exception as error:  # noqa: BLE001 - a command reports, it does not trace back
        if verbose:
            traceback.print_exc()
        message = one_line(str(error)) or type(error).__name__
        if is_user_error(error, user_errors):
            if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
                message = f"{error.filename}: {message}"
            print(f"{prog}: error: {message}", file=sys.stderr)
            return EXIT_USER
        hint = "" if verbose else f" (run again with {VERBOSE_FLAG} for the traceback)"
        print(f"{prog}: internal error: {type(error).__name__}: {message}{hint}", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return EXIT_OK if status is None else status


def command(prog: str, user_errors: tuple[type, ...] = ()):
    """Decorator form of `run_cli` for a command's `main(argv)`."""
    def wrap(main_fn):
        @functools.wraps(main_fn)
        def main(argv: Sequence[str] | None = None) -> int:
            return run_cli(prog, main_fn, argv, user_errors)
        return main
    return wrap


# --------------------------------------------------------------------------------------
# Output locations, checked before the work starts
# --------------------------------------------------------------------------------------

class OutputLocationError(ValueError):
    """An output path cannot be written (the message names it and why)."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_writable_directory(directory: Path, what: str) -> None:
    """Create and remove a file in `directory` (or its nearest existing ancestor): the only
    check that also catches read-only mounts, immutable directories and full disks, which
    permission bits do not show (and which root ignores)."""
    directory = Path(directory).expanduser()
    existing = _nearest_existing(directory.resolve())
    where = f"{directory}" + ("" if existing == directory.resolve() else f" (in {existing})")
    if not existing.is_dir():
        raise OutputLocationError(f"{what}: cannot create {where}: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".sparsevlm-probe-") as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise OutputLocationError(f"{what}: cannot write {where} ({error.strerror or error})") from None


def check_output_file(path: str | Path, what: str) -> Path:
    """A file the command will write at the end (e.g. --trace-json): fail now, not after the work."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputLocationError(f"{what}: {path} is a directory; expected a file path")
    probe_writable_directory(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputLocationError(f"{what}: {path} exists and is not writable")
    return path


# --------------------------------------------------------------------------------------
# Method options: an option the chosen method does not use is an error, not silently ignored
# --------------------------------------------------------------------------------------

# CLI flag -> the (method, SparseVLM variant) settings that use it; variant None = any.
METHOD_OPTION_USERS = {
    "--variant": [("sparsevlm", None)],
    "--budget": [("sparsevlm", None), ("fastervlm", None), ("fastv", None)],
    "--scale": [("sparsevlm", "v1.0")],
    "--bias": [("sparsevlm", "v1.0")],
    "--lam": [("sparsevlm", "paper")],
    "--reduction": [("fastervlm", None)],
    "--fastv-k": [("fastv", None)],
    "--fastv-r": [("fastv", None)],
}
DEFAULT_SPARSEVLM_VARIANT = "v1.5"
DEFAULT_SPARSEVLM_BUDGET = 192  # the paper's main setting; the other methods have no default


class OptionError(ValueError):
    """A command-line option that does not apply, or a bad combination of options."""


def check_method_options(method: str, variant: str | None, given: dict[str, object]) -> None:
    """Raise OptionError naming the first option in `given` ({flag: value}, None = not given)
    that `method` (and `variant`) does not use."""
    from sparsevlm.methods.config import METHODS, SPARSEVLM_VARIANTS
    if method not in METHODS:
        raise OptionError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "sparsevlm" and variant is not None and variant not in SPARSEVLM_VARIANTS:
        raise OptionError(f"--variant: expected one of {', '.join(SPARSEVLM_VARIANTS)}, got {variant!r}")
    effective_variant = (variant or DEFAULT_SPARSEVLM_VARIANT) if method == "sparsevlm" else None
    for flag, value in given.items():
        if value is None:
            continue
        users = METHOD_OPTION_USERS[flag]
        if not any(m == method and (v is None or v == effective_variant) for m, v in users):
            setting = f"--method {method}" + (f" --variant {effective_variant}" if effective_variant else "")
            wanted = " or ".join(f"--method {m}" + (f" --variant {v}" if v else "") for m, v in users)
            raise OptionError(f"{flag}: does not apply to {setting} (it is used by {wanted})")


# --------------------------------------------------------------------------------------
# The method flags, one declaration for every command that takes a method (export, calibrate)
# --------------------------------------------------------------------------------------

# CLI flag -> the SparseVLMConfig field it sets (beyond method and budget).
METHOD_FLAG_FIELDS = {"--variant": "variant", "--scale": "scale", "--bias": "bias", "--lam": "lam",
                      "--reduction": "reduction", "--fastv-k": "K", "--fastv-r": "R"}


def add_method_arguments(parser, *, several_budgets: bool = False) -> None:
    """Add the "method" argument group: --method, --budget and every flag of METHOD_OPTION_USERS.

    several_budgets: --budget takes one or more values (sparsevlm-export writes one artifact
    per budget); otherwise exactly one. `method_options_from_args` and `method_budgets_from_args`
    read the group back."""
    from sparsevlm.methods.config import METHODS, SPARSEVLM_VARIANTS
    group = parser.add_argument_group("method", "the pruning method and its parameters; an option the chosen "
                                                "method does not use is an error")
    group.add_argument("--method", default="sparsevlm", choices=METHODS, help="pruning method (default: sparsevlm)")
    group.add_argument("--variant", default=None, choices=SPARSEVLM_VARIANTS,
                       help="SparseVLM variant: v1.5 fixed schedule (default), v1.0 code rank rule, paper rank rule")
    budget_help = ("token budget{}: SparseVLM v1.5: 192/128/96/64; v1.0: picks the scripts' scale/bias "
                   f"(SparseVLM default: {DEFAULT_SPARSEVLM_BUDGET}); FasterVLM/FastV: visual tokens kept")
    if several_budgets:
        group.add_argument("--budget", type=int, nargs="+", default=None,
                           help=budget_help.format("(s), one artifact each"))
    else:
        group.add_argument("--budget", type=int, default=None, help=budget_help.format(""))
    group.add_argument("--scale", type=float, help="v1.0 rank rule: keep = int(rank*scale + bias)")
    group.add_argument("--bias", type=float, help="v1.0 rank rule bias")
    group.add_argument("--lam", type=float, help="paper rank rule: deleted = int(lam*(v - rank))")
    group.add_argument("--reduction", type=float, help="FasterVLM: share of visual tokens removed (0.75/0.90/0.95)")
    group.add_argument("--fastv-k", dest="K", type=int, default=None, help="FastV: prune after layer K-1 (default 2)")
    group.add_argument("--fastv-r", dest="R", type=float, help="FastV: share R of visual tokens removed")


def method_options_from_args(args) -> dict:
    """The method group of parsed `args` as SparseVLMConfig keyword arguments, without the
    budget (one config per budget: `SparseVLMConfig(budget=b, **options)`). Raises
    OptionError for an option the method does not use."""
    given = {flag: getattr(args, field) for flag, field in METHOD_FLAG_FIELDS.items()}
    check_method_options(args.method, args.variant, {**given, "--budget": args.budget})
    options = {"method": args.method}
    options.update({METHOD_FLAG_FIELDS[flag]: value for flag, value in given.items() if value is not None})
    return options


def method_budgets_from_args(args) -> list[int | None]:
    """The budgets of the method group of parsed `args` (a list even for one --budget): those
    given, else DEFAULT_SPARSEVLM_BUDGET for SparseVLM, else [None] (the method's other flags
    say how many tokens to keep)."""
    given = args.budget if isinstance(args.budget, list) else [args.budget]
    if given != [None]:
        return given
    return [DEFAULT_SPARSEVLM_BUDGET] if args.method == "sparsevlm" else [None]
