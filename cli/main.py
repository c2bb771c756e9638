"""The ``layershap`` console script: one typed function per command (``layershap.cli.<command>``), exposed with
jsonargparse, so every command takes ``--config FILE.yaml`` and ``--print_config`` and flags follow the
function signatures (one name, one meaning across commands).

Users spell flags with dashes and switch booleans off with ``--no-X``; jsonargparse spells them with
underscores and wants a value for booleans. :func:`normalize_argv` bridges the two before parsing:

* ``--n-masks 64`` -> ``--n_masks 64`` (dashes -> underscores in option names; values untouched);
* ``--no-progress`` -> ``--progress=false`` and a bare ``--interactions`` -> ``--interactions=true`` for
  boolean parameters;
* ``--remove 1,2,3`` -> ``--remove=[1,2,3]`` for list parameters;
* positionals (``layershap info STORE``) -> their parameter (``--store STORE``), per :data:`POSITIONALS`;
* ``--lambda`` -> ``--lam`` (``lambda`` is a Python keyword), per :data:`ALIASES`;
* ``--device cpu`` -> ``--loading.device=cpu``: the fields of a dataclass parameter (the loading options,
  :class:`~layershap.core.load_options.LoadOptions`, shared by every command that loads a model) are spelled
  flat, and help and errors spell them so too.

Bad input of any kind ends in one line ``layershap <cmd>: error: ...`` on stderr and exit status 2.

Example:
    $ layershap run --n-masks 96 --no-progress
    $ layershap run --print_config > run.yaml && layershap run --config run.yaml
    $ layershap info runs/gemma-3-270m/dataset.zarr
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import typing
from collections.abc import Callable

from layershap.core.errors import LayershapError

COMMANDS: dict[str, str] = {
    "run": "main job: oracle on stratified masks -> verified plans -> surrogate -> layer scores -> summary",
    "oracle": "measure log-perplexity of layer masks into a zarr store",
    "info": "describe a dataset store: attributes, rows, best and worst masks",
    "train": "train the MLP surrogate on a dataset store",
    "shapley": "layer Shapley values / semivalues from a trained surrogate",
    "plan": "verified depth-pruning plans: the best K layers to remove, measured, chosen on validation windows",
    "prune": "write a depth-pruned Hugging Face model (the verified plan, or --by-score)",
    "heal": "write a depth-pruned model healed: bias, linear (ReplaceMe), lowrank:R patches or LoRA distill",
    "evaluate": "perplexity of a model on held-out text",
    "compare": "layershap vs peer pruning methods on held-out text",
    "export": "per-layer sparsity ratios for Wanda/SparseGPT-style pruners",
    "sparsify": "prune every decoder layer's linear weights (Wanda/magnitude) to per-layer budgets; save the model",
    "registry": "manage the registry of trained surrogates: add, list, show, remove",
    "serve": "answer layer scores, predictions, plans and sparsities of registered surrogates over HTTP",
}
POSITIONALS: dict[str, tuple[str, ...]] = {
    "info": ("store",), "train": ("store",), "shapley": ("surrogate_dir",), "export": ("scores",),
    "registry": ("action", "target"),
}
ALIASES: dict[str, dict[str, str]] = {"export": {"lambda": "lam"}, "sparsify": {"lambda": "lam"}}
# Dataclass parameters whose fields users spell flat (``--device``, not ``--loading.device``).
FLAT = ("loading",)
_INT_LIST = re.compile(r"^\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*$")


def command_function(name: str) -> Callable[..., int]:
    """The typed function of command ``name`` (its module is imported only now: fast start-up)."""
    return getattr(importlib.import_module(f"layershap.cli.{name}"), name)


def _kind(hint) -> str:
    args = {hint, *typing.get_args(hint)}
    if bool in args:
        return "bool"
    if any(typing.get_origin(a) is list for a in args):
        return "list"
    return "value"


def _nested(fn: Callable) -> dict[str, tuple[str, str]]:
    """Fields of dataclass parameters, which users spell flat: field -> (parameter, kind); e.g. ``device`` ->
    ``("loading", "value")`` for the :class:`~layershap.core.load_options.LoadOptions` of a loading command."""
    hints = typing.get_type_hints(fn)
    found = {}
    for pname in inspect.signature(fn).parameters:
        if pname in FLAT and dataclasses.is_dataclass(hints.get(pname)):
            field_hints = typing.get_type_hints(hints[pname])
            found.update({f.name: (pname, _kind(field_hints[f.name])) for f in dataclasses.fields(hints[pname])})
    return found


def _kinds(fn: Callable) -> dict[str, str]:
    """Parameter name (or flat-spelled field of a dataclass parameter) -> ``bool``, ``list`` or ``value``."""
    hints = typing.get_type_hints(fn)
    kinds = {pname: _kind(hints.get(pname)) for pname in inspect.signature(fn).parameters}
    return kinds | {name: kind for name, (_, kind) in _nested(fn).items()}


def call_arguments(fn: Callable, values: dict) -> dict:
    """The parsed values of ``fn``'s parameters as keyword arguments: dataclass parameters (parsed as dicts)
    built into their dataclass.

    Example:
        >>> call_arguments(command_function("evaluate"), {"model": "m", "loading": {"device": "cpu"}})["loading"]
        LoadOptions(device='cpu', dtype=None, device_map=None)
    """
    hints = typing.get_type_hints(fn)
    kwargs = {k: v for k, v in values.items() if k in inspect.signature(fn).parameters}
    for name, value in kwargs.items():
        if dataclasses.is_dataclass(hints.get(name)) and isinstance(value, dict):
            kwargs[name] = hints[name](**value)
    return kwargs


def normalize_argv(command: str, fn: Callable, argv: list[str]) -> list[str]:
    """User argv (dashes, ``--no-X``, ``1,2,3`` lists, positionals) -> jsonargparse argv (see module doc).

    Example:
        >>> normalize_argv("info", command_function("info"), ["s.zarr", "--top", "3"])
        ['--top=3', '--store', 's.zarr']
    """
    kinds = _kinds(fn)
    nested = _nested(fn)
    aliases = ALIASES.get(command, {})
    positional = list(POSITIONALS.get(command, ()))
    out: list[str] = []
    tail: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--" or not token.startswith("--"):
            if token != "--" and positional and not (token.startswith("-") and len(token) > 1):
                tail += [f"--{positional.pop(0)}", token]
            else:
                out.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        name = aliases.get(name, name)
        if not eq and name.startswith("no_") and kinds.get(name[3:]) == "bool":
            out.append(f"--{_full(name[3:], nested)}=false")
            continue
        kind = "value" if name == "config" else kinds.get(name)
        full = _full(name, nested)
        if kind == "bool" and not eq:
            if i < len(argv) and argv[i].lower() in ("true", "false"):
                out.append(f"--{full}={argv[i].lower()}")
                i += 1
            else:
                out.append(f"--{full}=true")
            continue
        if not eq and kind is not None and i < len(argv):
            value, eq = argv[i], "="
            i += 1
        if eq and kind == "list" and _INT_LIST.match(value):
            value = "[" + ",".join(v.strip() for v in value.split(",") if v.strip()) + "]"
        out.append(f"--{full}={value}" if eq else f"--{full}")
    return out + tail


def _full(name: str, nested: dict[str, tuple[str, str]]) -> str:
    """jsonargparse's name of a flag: ``device`` -> ``loading.device`` for a field of a dataclass parameter."""
    return f"{nested[name][0]}.{name}" if name in nested else name


def user_spelling(text: str) -> str:
    """Help text with flags spelled as users type them: dashes, and ``--X/--no-X`` for true/false flags.

    Example:
        >>> user_spelling("[--plan_budget PLAN_BUDGET] [--progress {true,false}]")
        '[--plan-budget PLAN_BUDGET] [--progress/--no-progress]'
    """
    text = re.sub(rf"--(?:{'|'.join(FLAT)})\.(\w+)", r"--\1", text)
    text = re.sub(r"--(\w+) \{true,false\}", lambda m: f"--{m.group(1)}/--no-{m.group(1)}", text)
    return re.sub(r"--([\w-]+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


def build_parser(command: str, fn: Callable):
    """The jsonargparse parser of one command, built from ``fn``'s signature and docstring; its help spells
    flags as users type them (:func:`user_spelling`)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    class Parser(ArgumentParser):
        def format_help(self) -> str:
            return user_spelling(super().format_help())

        def format_usage(self) -> str:
            return user_spelling(super().format_usage())

    parser = Parser(prog=f"layershap {command}", description=COMMANDS[command], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of option values (see --print_config)")
    parser.add_function_arguments(fn, as_positional=False)
    return parser


def one_line(message: str) -> str:
    """A parser error as one line, with flags spelled as users type them.

    Example:
        >>> one_line('Parser key "n_masks":\\n  Expected a <class \\'int\\'>. Got value: x')
        "--n-masks: Expected a <class 'int'>. Got value: x"
    """
    text = str(message).strip()
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.DOTALL)
    if key:
        text = f"--{key.group(1)}: {key.group(2)}"
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    text = re.sub(rf"--(?:{'|'.join(FLAT)})\.(\w+)", r"--\1", text)
    return re.sub(r"--(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: layershap COMMAND [options]   (layershap COMMAND --help for a command's options)", "",
             "Which decoder layers of an LLM can you remove? Layer Shapley values via a learned surrogate.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input prints ``layershap <cmd>: error: ...`` (one line) and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"layershap: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    fn = command_function(command)
    try:
        cfg = build_parser(command, fn).parse_args(normalize_argv(command, fn, rest))
    except ArgumentError as exc:
        print(f"layershap {command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    kwargs = call_arguments(fn, cfg.as_dict())
    try:
        return int(fn(**kwargs) or 0)
    except LayershapError as exc:
        print(f"layershap {command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layershap {command}: interrupted; rows already written are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): nothing left to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
