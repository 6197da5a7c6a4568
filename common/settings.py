"""Declare each setting once: flag, environment variable, parser, default, help and check.

Why: every service used to repeat `--x`, `SUTRA_X`, the default, and a help text that typed
`(env SUTRA_X)` again, and deploy re-declared all of it to launch them. Here one dataclass
field says everything, the way clap's `#[arg(long, env)]` does in Rust:

    l1_entries: int = setting(10_000, "in-process LRU size in entries", check=not_negative)

- flag: `--` + the group prefix + the field name with dashes (`flag=` where the public name
  differs);
- environment variable: the env prefix (the class's ENV_PREFIX or the group's) + the flag
  upper-cased with underscores; `env=` names it in full only where a public name breaks that
  rule (the Matryoshka width's variable), so every name is still written exactly once;
- parser: from the default's type (booleans and comma-lists through common.flags), or `parse=`;
- validation: each setting's `check=` and the class's `problems()` run in `__post_init__`
  (`Settings`), so an object that exists is valid however it was built; `load` turns a
  problem into one argparse error line;
- nested dataclasses (`group(...)`) bring their own settings, with a flag/env prefix and
  per-use defaults (clap's `#[command(flatten)]`).

Precedence is flag > environment > default. `to_argv(obj)` renders an object back into flags,
so a launcher builds a child's command line from that child's own settings object
(`launch_argv`). A library was considered: pydantic-settings has no argparse help with env
names and would add a dependency to every image; ConfigArgParse still types each env name by
hand. This module is about 250 lines and only uses argparse.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.flags import parse_bool, split_csv

_KEY = "sutra.setting"


@dataclass(frozen=True)
class Spec:
    """Everything one setting declares besides its field name and default."""

    help: str
    flag: str = ""  # "" = derived from the field name
    env: str | None = ""  # "" = derived from the flag; None = no variable
    parse: Callable[[str], Any] | None = None  # text -> value; None = from the default's type
    show: Callable[[Any], str] | None = None  # value -> text, for to_argv and --help
    check: Callable[[Any], str | None] | None = None  # value -> what is wrong, or None
    choices: tuple = ()
    metavar: str | None = None
    shown: str | None = None  # --help's text for the default, when the value is not meant to show
    repeat: bool = False  # the flag may repeat; values (and the variable, one value) collect in a tuple


@dataclass(frozen=True)
class Group:
    """A nested dataclass whose settings become flags of the enclosing one."""

    cls: type
    prefix: str = ""  # flag prefix of every member, e.g. "mlbase-tls-"
    env_prefix: str | None = None  # None = the group class's ENV_PREFIX (unless forced from outside)
    omit: tuple[str, ...] = ()  # members this use does not expose (they keep the dataclass default)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # member -> Spec changes, "default"
    optional: bool = False  # None unless a member differs from its default (or the switch is on)
    switch: str = ""  # help of an on/off flag named by the prefix (`--mlbase-tls`); implies optional
    words: Mapping[str, str] = field(default_factory=dict)  # substituted into members' help ({what})


@dataclass(frozen=True)
class Item:
    """One flag as it appears on a command line (a setting inside its groups)."""

    key: str  # dotted path from the top object, e.g. "server.port"
    spec: Spec
    default: Any
    flag: str  # without the leading dashes
    env: str | None

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def parse(self) -> Callable[[str], Any]:
        if self.spec.parse is not None:
            return self.spec.parse
        if isinstance(self.default, bool):
            return parse_bool
        if self.spec.repeat:
            return str
        if isinstance(self.default, tuple):
            return split_csv
        for kind in (int, float, Path):
            if isinstance(self.default, kind):
                return kind
        return str

    def show(self, value: Any) -> str:
        if self.spec.show is not None:
            return self.spec.show(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple) and not self.spec.repeat:
            return ",".join(str(v) for v in value)
        return str(value)


# -- declaring ----------------------------------------------------------------------------------

def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            **spec: Any) -> Any:
    """A dataclass field that is also a flag and an environment variable (see the module doc)."""
    kw: dict[str, Any] = {"default_factory": factory} if factory is not None else {"default": default}
    return field(**kw, metadata={_KEY: Spec(help=help, **spec)})


def group(cls: type, **options: Any) -> Any:
    """A dataclass field holding a nested settings dataclass (see Group)."""
    g = Group(cls, **options)
    if g.optional or g.switch:
        return field(default=None, metadata={_KEY: g})
    values = {k: o["default"] for k, o in g.overrides.items() if "default" in o}
    return field(default_factory=lambda: cls(**values), metadata={_KEY: g})


def at_least(n: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be at least {n}"


def not_negative(v: Any) -> str | None:
    return None if v >= 0 else "must not be negative"


def fraction(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def one_of(choices: Iterable[str]) -> Callable[[Any], str | None]:
    allowed = tuple(choices)
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}"


class Settings:
    """Base of every declared settings dataclass: validation in one place, at construction."""

    ENV_PREFIX = "SUTRA_"

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            spec = f.metadata.get(_KEY)
            if isinstance(spec, Spec) and spec.check is not None:
                problem = spec.check(getattr(self, f.name))
                if problem:
                    problems.append(f"--{spec.flag or f.name.replace('_', '-')} {problem}")
        problems += self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong across settings (one line each); the per-setting checks ran already."""
        return []

    def to_argv(self, only: Iterable[str] | None = None) -> list[str]:
        return to_argv(self, only)


# -- walking the declarations -------------------------------------------------------------------

@dataclass(frozen=True)
class _Ctx:
    prefix: str = ""
    env_prefix: str | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    omit: tuple[str, ...] = ()
    words: Mapping[str, str] = field(default_factory=dict)
    path: str = ""


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _members(cls: type, ctx: _Ctx) -> Iterator[tuple[Field, Item | None, Group | None, _Ctx | None]]:
    """(field, item, None, None) for a setting; (field, switch item or None, group, its ctx) for a group."""
    # A prefix given from outside (a group's or add_flags') wins over the class's own ENV_PREFIX.
    env_prefix = ctx.env_prefix if ctx.env_prefix is not None else getattr(cls, "ENV_PREFIX", "SUTRA_")

    def env_of(spec: Spec, flag: str) -> str | None:
        return None if spec.env is None else (spec.env or env_prefix + flag.upper().replace("-", "_"))

    for f in fields(cls):
        meta = f.metadata.get(_KEY)
        if meta is None or f.name in ctx.omit:
            continue
        key = f"{ctx.path}{f.name}"
        if isinstance(meta, Group):
            sub = _Ctx(ctx.prefix + meta.prefix, meta.env_prefix if meta.env_prefix is not None else ctx.env_prefix,
                       meta.overrides, meta.omit, {**ctx.words, **meta.words, "prefix": ctx.prefix + meta.prefix},
                       key + ".")
            switch = None
            if meta.switch:
                flag = sub.prefix.rstrip("-")
                spec = Spec(help=meta.switch.format(**sub.words))
                own = sub.env_prefix if sub.env_prefix is not None else getattr(meta.cls, "ENV_PREFIX", "SUTRA_")
                switch = Item(key, spec, False, flag, own + flag.upper().replace("-", "_"))
            yield f, switch, meta, sub
            continue
        over = dict(ctx.overrides.get(f.name, {}))
        default = over.pop("default", _default(f))
        spec = replace(meta, **over) if over else meta
        if ctx.words:
            spec = replace(spec, help=spec.help.format(**ctx.words))
        flag = spec.flag or ctx.prefix + f.name.replace("_", "-")
        yield f, Item(key, spec, default, flag, env_of(spec, flag)), None, None


def items(cls: type, ctx: _Ctx | None = None) -> Iterator[Item]:
    """Every flag of `cls`, nested groups included, in declaration order."""
    for _f, item, grp, sub in _members(cls, ctx or _Ctx()):
        if item is not None:
            yield item
        if grp is not None:
            yield from items(grp.cls, sub)


def item(cls: type, key: str) -> Item:
    """The declaration behind a dotted name, e.g. item(FrontendSettings, "server.port").env."""
    for found in items(cls):
        if found.key == key:
            return found
    raise KeyError(f"{cls.__name__} declares no setting {key!r}")


# -- parsing ------------------------------------------------------------------------------------

class _BoolAction(argparse.Action):
    """--x, --x VALUE (true/false/1/0...) and --no-x: the forms every old boolean flag accepted."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if values is None else values)


def _help(it: Item, extra: str = "") -> str:
    shown = it.spec.shown if it.spec.shown is not None else it.show(it.default)
    where = f"env {it.env}; " if it.env else ""
    return f"{it.spec.help}{extra} ({where}default {shown or 'empty'})".replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, cls: type, env: Mapping[str, str] | None = None,
              keys: Iterable[str] | None = None, **ctx: Any) -> None:
    """Add every setting of `cls` (or the dotted `keys`) to `parser`; the environment (default
    os.environ) gives defaults."""
    env = os.environ if env is None else env
    wanted = None if keys is None else set(keys)
    for it in items(cls, _Ctx(**ctx)):
        if wanted is not None and it.key not in wanted:
            continue
        raw = env.get(it.env) if it.env else None
        kw: dict[str, Any] = {"dest": it.dest, "help": _help(it), "metavar": it.spec.metavar}
        if it.spec.repeat:
            parser.add_argument(f"--{it.flag}", action="append", type=it.parse,
                                default=[it.parse(raw)] if raw else [], **kw)
        elif isinstance(it.default, bool):
            parser.add_argument(f"--{it.flag}", action=_BoolAction, nargs="?", type=parse_bool,
                                default=it.default if raw is None else raw,
                                **{**kw, "metavar": "BOOL", "help": _help(it, f"; --no-{it.flag} = false")})
            parser.add_argument(f"--no-{it.flag}", dest=it.dest, action="store_false", help=argparse.SUPPRESS)
        else:
            # argparse runs `type` over a string default, so a bad variable is a one-line error too.
            parser.add_argument(f"--{it.flag}", type=it.parse, choices=it.spec.choices or None,
                                default=it.default if raw is None else raw, **kw)


def from_args(cls: type, args: argparse.Namespace, **ctx: Any) -> Any:
    """The `cls` object for flags added by add_flags; ValueError says what is wrong."""
    return _construct(cls, args, _Ctx(**ctx))


def _value(it: Item, args: argparse.Namespace) -> Any:
    value = getattr(args, it.dest)
    return tuple(value) if it.spec.repeat else value


def _construct(cls: type, args: argparse.Namespace, ctx: _Ctx) -> Any:
    kwargs = {}
    for f, it, grp, sub in _members(cls, ctx):
        if grp is None:
            kwargs[f.name] = _value(it, args)
            continue
        if grp.optional or grp.switch:
            on = it is not None and _value(it, args)
            if not on and all(_value(m, args) == m.default for m in items(grp.cls, sub)):
                kwargs[f.name] = None
                continue
        kwargs[f.name] = _construct(grp.cls, args, sub)
    return cls(**kwargs)


def parser_for(cls: type, env: Mapping[str, str] | None = None, **parser_kw: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(**parser_kw)
    add_flags(parser, cls, env)
    return parser


def load(cls: type, argv: list[str] | None, parser: argparse.ArgumentParser) -> Any:
    """Parse `argv` with `parser` (built by parser_for) into a validated `cls`; exit 2 with one line if wrong."""
    args = parser.parse_args(argv)
    try:
        return from_args(cls, args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


# -- rendering ----------------------------------------------------------------------------------

def _pairs(obj: Any, ctx: _Ctx) -> Iterator[tuple[Item, Any]]:
    for f, it, grp, sub in _members(type(obj), ctx):
        value = getattr(obj, f.name)
        if grp is None:
            yield it, value
            continue
        if it is not None:
            yield it, value is not None
        if value is None:
            yield from ((m, m.default) for m in items(grp.cls, sub))
        else:
            yield from _pairs(value, sub)


def _flag(flag: str, text: str) -> list[str]:
    """`--flag VALUE` as two words (what people write), or `--flag=VALUE` when VALUE looks like a flag."""
    return [f"--{flag}={text}"] if text.startswith("-") else [f"--{flag}", text]


def _within(key: str, name: str) -> bool:
    """`key` is the setting `name` or inside the group `name` (`server.tls` holds `server.tls.cert`)."""
    return key == name or key.startswith(name + ".")


def to_argv(obj: Any, only: Iterable[str] | None = None, **ctx: Any) -> list[str]:
    """Flags that reproduce `obj` (every setting, or the dotted names in `only`, a group's name
    standing for all its settings), independent of
    the environment for the settings they name, with one exception: a repeatable setting
    (`repeat=True`, e.g. the frontend's `--auth-token`) adds to its environment variable's value,
    as before, so an empty one cannot be rendered; leave such settings out of `only` and out of
    the child's environment alike."""
    wanted = None if only is None else set(only)
    argv: list[str] = []
    for it, value in _pairs(obj, _Ctx(**ctx)):
        if (wanted is not None and not any(_within(it.key, w) for w in wanted)) or value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{it.flag}" if value else f"--no-{it.flag}")
        else:
            argv += [arg for v in (value if it.spec.repeat else (value,)) for arg in _flag(it.flag, it.show(v))]
    if wanted is not None:
        keys = [it.key for it in items(type(obj), _Ctx(**ctx))]
        unknown = {w for w in wanted if not any(_within(k, w) for k in keys)}
        if unknown:
            raise KeyError(f"{type(obj).__name__} declares no setting {', '.join(sorted(unknown))}")
    return argv


def evolve(obj: Any, values: Mapping[str, Any]) -> Any:
    """A copy of `obj` with the dotted `values` replaced ("server.port": 1), validated again."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        top[head] = evolve(getattr(obj, head), sub)
    return replace(obj, **top)


def launch_argv(module: str, obj: Any, python: str = sys.executable, only: Iterable[str] | None = None) -> list[str]:
    """`python -m module` with the flags that reproduce `obj`: one launch recipe for every service."""
    return [python, "-m", module, *to_argv(obj, only)]


S = TypeVar("S")


@dataclass(frozen=True)
class ServiceCli(Generic[S]):
    """One service's command line, written once for all: `python -m <module>` parses flags and
    environment into `cls`, and deploy, the harness and tests start it with the same flags.
    Each service's settings module exposes the three methods as its own `build_parser`,
    `load_settings` and `command`."""

    cls: type[S]
    module: str
    description: str
    epilog: str | None = None

    def build_parser(self, env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
        return parser_for(self.cls, env, prog=f"python -m {self.module}", description=self.description,
                          epilog=self.epilog)

    def load_settings(self, argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> S:
        return load(self.cls, argv, self.build_parser(env))

    def command(self, settings: S, python: str = sys.executable, only: Iterable[str] | None = None) -> list[str]:
        """The launch recipe: the argv that starts the service with `settings` (or only the named ones)."""
        return launch_argv(self.module, settings, python, only)
