"""The `hatun` command: argument parsing, output for people and for machines (--json), exit codes.

This is the only module that prints. Exit codes: 0 success, 1 the thing checked is wrong (invalid
config, unhealthy tunnels), 2 usage error or unreadable input, 3 hatun is not running / cannot be
reached, 70 internal error (a bug: reported without a traceback unless HATUN_DEBUG is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from hatun import __version__

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERNAL = 0, 1, 2, 3, 70


class CliError(Exception):
    """An error for the user: printed as 'hatun: MESSAGE', exit with CODE."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    from hatun.config import ConfigError, ConfigUnreadable, load_config
    from hatun.render import check_summary

    try:
        config, secrets = load_config(args.config, skip_secrets=args.skip_secrets)
    except ConfigUnreadable as e:
        if args.json:
            _print_json({"file": args.config, "valid": False, "error": str(e)})
        raise CliError(str(e), EXIT_USAGE) from None
    except ConfigError as e:
        if args.json:
            _print_json({"file": args.config, "valid": False, "problems": [p.to_dict() for p in e.problems]})
        else:
            for p in e.problems:
                print(str(p))
            n = len(e.problems)
            print(f"{args.config}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        _print_json({
            "file": args.config,
            "valid": True,
            "secrets_checked": not args.skip_secrets,
            "prefixes": [str(p) for p in config.routing.prefixes],
            "source": [str(s) for s in config.routing.source],
            "tunnels": [
                {
                    "name": t.name,
                    "interface": t.ifname,
                    "endpoint": str(t.endpoint),
                    "weight": t.weight,
                    "priority": t.priority,
                    "probe": str(t.probe_target),
                    "public_key": None if args.skip_secrets else secrets.keys[t.name].public_key.base64,
                }
                for t in config.tunnels
            ],
        })
    else:
        print(check_summary(config, secrets, args.config, args.skip_secrets))
    return EXIT_OK


# ---------------------------------------------------------------- keys


def cmd_keygen(args: argparse.Namespace) -> int:
    from hatun.keys import PrivateKey, write_private_key_file

    key = PrivateKey.generate()
    if args.out:
        try:
            write_private_key_file(args.out, key)
        except FileExistsError:
            raise CliError(f"{args.out} exists: not overwritten", EXIT_USAGE) from None
        except OSError as e:
            raise CliError(f"{args.out}: {e.strerror}", EXIT_USAGE) from None
        print(key.public_key.base64)
    else:
        # Like `wg genkey`: the private key on stdout, for `hatun keygen | hatun pubkey`.
        print(key.base64)
    return EXIT_OK


def cmd_pubkey(args: argparse.Namespace) -> int:
    from hatun.keys import InvalidKey, PrivateKey

    text = sys.stdin.read(4096)
    try:
        key = PrivateKey.from_base64(text)
    except InvalidKey as e:
        raise CliError(f"standard input does not hold a private key: {e}", EXIT_INVALID) from None
    print(key.public_key.base64)
    return EXIT_OK


# ---------------------------------------------------------------- import


def cmd_import(args: argparse.Namespace) -> int:
    from hatun.wgquick import ImportProblem, parse_wgquick, render_config, tunnel_name_from_path, write_key_files

    tunnels = []
    names: set[str] = set()
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(1024 * 1024)
        except OSError as e:
            raise CliError(f"{path}: {e.strerror}", EXIT_USAGE) from None
        name = tunnel_name_from_path(path)
        base, n = name, 2
        while name in names:
            name, n = f"{base[:9]}-{n}", n + 1
        names.add(name)
        try:
            tunnels.append(parse_wgquick(text, name, path))
        except ImportProblem as e:
            raise CliError(str(e), EXIT_INVALID) from None
    key_dir = args.key_dir or os.path.dirname(os.path.abspath(args.files[0]))
    try:
        key_files = write_key_files(tunnels, key_dir)
    except (ImportProblem, OSError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    sys.stdout.write(render_config(tunnels, key_files))
    print(f"private keys written to {', '.join(key_files.values())} (mode 0600)", file=sys.stderr)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from hatun.config import json_schema

    _print_json(json_schema())
    return EXIT_OK


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hatun",
        description="Keep several WireGuard tunnels up and steer private prefixes over the healthy ones.",
    )
    p.add_argument("--version", action="version", version=f"hatun {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("check", cmd_check, "check a config file and explain every mistake in it")
    sp.add_argument("config", metavar="CONFIG")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--skip-secrets", action="store_true",
                    help="do not read private keys (files or environment), e.g. to validate in CI without secrets")

    sp = add("keygen", cmd_keygen, "generate a private key: with --out, write it (mode 0600) and print the public key")
    sp.add_argument("--out", metavar="FILE", help="write the private key to FILE (never overwrites)")

    add("pubkey", cmd_pubkey, "read a private key on standard input and print its public key")

    sp = add("import", cmd_import, "turn wg-quick configs into a hatun config (on standard output)")
    sp.add_argument("files", nargs="+", metavar="WG_CONF")
    sp.add_argument("--key-dir", metavar="DIR", help="where to write the private keys (default: beside the first file)")

    sp = sub.add_parser("schema", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"hatun: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug: say so plainly, keep the traceback for HATUN_DEBUG
        if os.environ.get("HATUN_DEBUG"):
            raise
        print(f"hatun: internal error: {type(e).__name__}: {e} (set HATUN_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_INTERNAL
