"""The `hatun` command: argument parsing, output for people and for machines (--json), exit codes.

This is the only module that prints. Exit codes: 0 success, 1 the thing checked is wrong (invalid
config, unhealthy tunnels), 2 usage error or unreadable input, 3 hatun is not running / cannot be
reached, 70 internal error (a bug: reported without a traceback unless HATUN_DEBUG is set).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    from hatun.config import ConfigError, ConfigUnreadable, config_warnings, load_config
    from hatun.logs import safe_text
    from hatun.render import check_summary

    # Whatever came from the config (or its path) is shown redacted and on one line.
    shown = safe_text(args.config)
    if _is_gateway_file(args.config):
        return _check_gateway(args, shown)
    try:
        config, secrets = load_config(args.config, skip_secrets=args.skip_secrets)
    except ConfigUnreadable as e:
        if args.json:
            _print_json({"file": shown, "valid": False, "error": str(e)})
        raise CliError(str(e), EXIT_USAGE) from None
    except ConfigError as e:
        return _print_problems(args, shown, e)
    warnings = [safe_text(w) for w in config_warnings(config)]
    if args.json:
        _print_json({
            "file": shown,
            "valid": True,
            "secrets_checked": not args.skip_secrets,
            "warnings": warnings,
            "prefixes": [str(p) for p in config.routing.prefixes],
            "source": [str(s) for s in config.routing.source],
            "tunnels": [
                {
                    "name": t.name,
                    "interface": t.ifname,
                    "endpoint": safe_text(str(t.endpoint)) if not t.enrolled else None,
                    "enroll": safe_text(t.enroll) if t.enrolled else None,
                    "weight": t.weight,
                    "priority": t.priority,
                    "probe": str(t.probe_target) if not t.enrolled or t.probe else None,
                    "public_key": None if args.skip_secrets or t.enrolled else secrets.keys[t.name].private.public_key.base64,
                    "preshared_key": t.preshared_key_file is not None or t.preshared_key_env is not None,
                }
                for t in config.tunnels
            ],
        })
    else:
        print(check_summary(config, secrets, shown, args.skip_secrets))
        for w in warnings:
            print(f"warning: {w}")
    return EXIT_OK


def _print_problems(args: argparse.Namespace, shown: str, e) -> int:
    """`hatun check`'s report of an invalid file (ConfigError E): exit 1."""
    if args.json:
        _print_json({"file": shown, "valid": False, "problems": [p.to_dict() for p in e.problems]})
    else:
        for p in e.problems:
            print(str(p))
        n = len(e.problems)
        print(f"{shown}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
    return EXIT_INVALID


def _is_gateway_file(path: str) -> bool:
    import tomllib

    from hatun.config import is_gateway_file

    try:
        with open(path, "rb") as f:
            return is_gateway_file(tomllib.loads(f.read(4 * 1024 * 1024).decode("utf-8", errors="replace")))
    except (OSError, ValueError, RecursionError):
        return False  # the host check reports what is wrong with it


def _load_gateway(path: str):
    from hatun.config import load_gateway_config

    return _load_for_run(path, load_gateway_config)


def _check_gateway(args: argparse.Namespace, shown: str) -> int:
    """`hatun check` of a gateway's file ([enroll])."""
    from hatun.config import ConfigError, ConfigUnreadable, load_gateway_config
    from hatun.logs import safe_text

    try:
        g = load_gateway_config(args.config).enroll
    except ConfigUnreadable as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except ConfigError as e:
        return _print_problems(args, shown, e)
    summary = {"file": shown, "valid": True, "kind": "gateway", "listen": g.listen, "https": g.tls_cert is not None,
               "issuer": g.issuer, "audience": g.audience, "interface": g.interface, "endpoint": str(g.endpoint),
               "pool": str(g.pool), "addresses": len(g.pool_hosts()), "max_ttl_seconds": g.max_ttl,
               "allow": g.allow}
    if args.json:
        _print_json(summary)
    else:
        print(f"{shown}: valid (a gateway's enrollment service)")
        print(safe_text(f"  {'https' if g.tls_cert else 'http (loopback)'} on {g.listen}; tokens of {g.issuer} for"
                        f" audience {g.audience!r}; device {g.interface}, runners dial {g.endpoint}"))
        from hatun.durations import format_duration

        print(f"  pool {g.pool} ({len(g.pool_hosts())} addresses), peers expire after at most"
              f" {format_duration(g.max_ttl)}")
        for rule in g.allow:
            print("  allow: " + ", ".join(f"{k} = {safe_text(v)}" for k, v in rule.items()))
    return EXIT_OK


def cmd_enroll_serve(args: argparse.Namespace) -> int:
    import trio

    from hatun import logs
    from hatun.enroll.server import serve
    from hatun.wireguard.model import WireGuardError

    config = _load_gateway(args.config).enroll
    logs.setup(args.log_format, args.log_level)
    try:
        trio.run(serve, config)
    except (OSError, WireGuardError) as e:
        raise CliError(f"enrollment service: {e}", EXIT_USAGE) from None
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


IMPORT_MAX_CHARS = 1024 * 1024


def cmd_import(args: argparse.Namespace) -> int:
    from hatun.logs import safe_text
    from hatun.wgquick import ImportProblem, import_config, parse_wgquick, tunnel_name_from_path, write_key_files

    tunnels = []
    names: set[str] = set()
    for path in args.files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(IMPORT_MAX_CHARS + 1)
            if len(text) > IMPORT_MAX_CHARS:
                raise CliError(f"{safe_text(path)}: larger than 1 MiB, not a wg-quick file", EXIT_INVALID)
        except OSError as e:
            raise CliError(f"{safe_text(path)}: {e.strerror}", EXIT_USAGE) from None
        except ValueError:  # a NUL in the path
            raise CliError(f"{safe_text(path)}: not a valid path", EXIT_USAGE) from None
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
        text, key_files, psk_files = import_config(tunnels, key_dir)
    except ImportProblem as e:
        raise CliError(f"{e}\nnothing written", EXIT_INVALID) from None
    try:
        write_key_files(tunnels, key_files, psk_files)
    except ImportProblem as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise CliError(safe_text(f"{e.filename or key_dir}: {e.strerror}"), EXIT_USAGE) from None
    sys.stdout.write(text)
    written = [*key_files.values(), *psk_files.values()]
    print(f"keys in {safe_text(', '.join(written))} (mode 0600, written or reused); check the result with"
          " `hatun check`", file=sys.stderr)
    return EXIT_OK


def cmd_gateway(args: argparse.Namespace) -> int:
    from hatun.gateway import GatewayError, plan_gateway, render_nft, render_wg, render_wg_quick
    from hatun.logs import safe_text

    config, secrets = _load_for_run(args.config)
    if any(t.name == args.tunnel and t.enrolled for t in config.tunnels):
        raise CliError(f"tunnel {args.tunnel} enrolls: its gateway adds it itself (hatun enroll serve)", EXIT_USAGE)
    try:
        plan = plan_gateway(config, args.tunnel, secrets.keys[args.tunnel].private.public_key
                            if args.tunnel in secrets.keys else None)
        command = safe_text(f"hatun gateway {args.tunnel} {args.config}"
                            + (f" --format {args.format}" if args.format != "wg-quick" else ""))
        if args.format == "wg":
            text = render_wg(plan, command)
        elif args.format == "nft":
            text = render_nft(plan, command, args.interface)
        else:
            text = render_wg_quick(plan, command, args.key_file, args.psk_file)
    except GatewayError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    sys.stdout.write(text)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from hatun.config import json_schema

    _print_json(json_schema())
    return EXIT_OK


# ---------------------------------------------------------------- run


def _load_for_run(path: str, load=None):
    """LOAD(PATH) (default: a host's config and its secrets), its failures as CLI errors."""
    from hatun.config import ConfigError, ConfigUnreadable, load_config

    try:
        return (load or load_config)(path)
    except ConfigUnreadable as e:
        raise CliError(str(e), EXIT_USAGE) from None
    except ConfigError as e:
        lines = "\n".join(f"  {p}" for p in e.problems)
        raise CliError(f"{path} is not valid ({len(e.problems)} problems; `hatun check {path}` explains):\n{lines}",
                       EXIT_INVALID) from None


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from hatun import daemon, logs
    from hatun.control import ControlError
    from hatun.pinning import PinningError
    from hatun.supervisor import SupervisorError
    from hatun.wireguard.model import BackendUnavailable, WireGuardError

    config, secrets = _load_for_run(args.config)
    logs.setup(args.log_format, args.log_level)
    if os.geteuid() != 0:
        raise CliError("hatun run needs root (CAP_NET_ADMIN and CAP_NET_RAW): it creates tunnels and routes")
    _raise_open_files_limit()
    try:
        trio.run(daemon.run, config, secrets, os.path.abspath(args.config))
    except BaseException as e:  # noqa: BLE001 - errors come wrapped in Trio's exception groups
        known = _leaf(e, (BackendUnavailable, SupervisorError, ControlError, WireGuardError, PinningError))
        if known is not None:
            prefix = "WireGuard: " if isinstance(known, WireGuardError) and not isinstance(known, BackendUnavailable) else ""
            raise CliError(prefix + str(known), EXIT_INVALID) from None
        if _leaf(e, (KeyboardInterrupt,)) is not None:
            return 130
        raise
    return EXIT_OK


def _raise_open_files_limit() -> None:
    # Several descriptors per tunnel (process handles, UAPI connections, probes): the usual soft
    # limit of 1024 is low for a hundred tunnels; the hard limit is ours to use.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 16), hard))
        except (ValueError, OSError):
            pass


def _leaf(error: BaseException, types: tuple) -> BaseException | None:
    """The first exception of TYPES in ERROR or in the exception groups it is wrapped in."""
    if isinstance(error, types):
        return error
    if isinstance(error, BaseExceptionGroup):
        for sub in error.exceptions:
            found = _leaf(sub, types)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------- talking to a running hatun


def _socket_path(args: argparse.Namespace) -> str:
    if getattr(args, "socket", None):
        return args.socket
    if getattr(args, "config", None):
        from hatun.config import ConfigError, ConfigUnreadable, load_config

        try:
            config, _ = load_config(args.config, skip_secrets=True)
        except (ConfigError, ConfigUnreadable) as e:
            raise CliError(f"cannot read the control socket path from {args.config}: {e}") from None
        return config.control.socket
    from hatun.config.models import Control

    return Control().socket  # the default of `[control] socket`


def _control(args: argparse.Namespace, req: dict, timeout: float | None = None) -> dict:
    from hatun.control import CLIENT_TIMEOUT, ControlError, NotRunning, request

    try:
        reply = request(_socket_path(args), req, timeout=timeout or CLIENT_TIMEOUT)
    except NotRunning as e:
        raise CliError(str(e), EXIT_NOT_RUNNING) from None
    except ControlError as e:
        raise CliError(str(e), EXIT_NOT_RUNNING) from None
    if not reply.get("ok"):
        raise CliError(reply.get("error", "failed"), EXIT_INVALID)
    return reply


def _status(args: argparse.Namespace):
    from hatun.status import Status, StatusError

    try:
        return Status.from_json(_control(args, {"command": "status"}).get("status"))
    except StatusError as e:
        raise CliError(str(e), EXIT_INVALID) from None


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from hatun.render import status_text

    if not args.watch:
        status = _status(args)
        if args.json:
            _print_json(status.to_json())
        else:
            print(status_text(status))
        return EXIT_OK
    # --watch: redraw once a second until Ctrl-C (or --count frames, for scripts and tests).
    frames = 0
    while args.count is None or frames < args.count:
        text = status_text(_status(args), watch=True)
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n" if sys.stdout.isatty() else text + "\n\n")
        sys.stdout.flush()
        frames += 1
        if args.count is None or frames < args.count:
            time.sleep(1.0)
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    reply = _control(args, {"command": args.command, "tunnel": args.tunnel})
    print(f"{reply['tunnel']}: {reply['state']}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from hatun.control import RELOAD_CLIENT_TIMEOUT

    reply = _control(args, {"command": "reload"}, timeout=RELOAD_CLIENT_TIMEOUT)
    print(reply["message"])
    return EXIT_OK


# ---------------------------------------------------------------- runner mode


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    from hatun import runner

    config, _ = _load_for_run(args.config)
    if os.geteuid() != 0:
        raise CliError("hatun up needs root (CAP_NET_ADMIN and CAP_NET_RAW): it creates tunnels and routes")
    min_healthy = args.min_healthy if args.min_healthy is not None else 1
    if not 1 <= min_healthy <= len(config.tunnels):
        raise CliError(f"--min-healthy must be 1..{len(config.tunnels)} (the config has {len(config.tunnels)} tunnels)")
    # SIGTERM (a cancelled CI job) while waiting is handled as Ctrl-C: `up` stops what it started.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        res = runner.up(config, args.config, wait=args.wait, min_healthy=min_healthy,
                        keep_on_failure=args.keep_on_failure)
    except KeyboardInterrupt:
        print("hatun up: interrupted; what it started is stopped and cleaned up" if not args.keep_on_failure
              else "hatun up: interrupted; hatun left running (--keep-on-failure)", file=sys.stderr)
        raise
    if args.json:
        _print_json({"ok": res.ok, "message": res.message, "pid": res.pid, "tunnels": res.diagnoses})
    else:
        print(f"hatun {'up' if res.ok else 'NOT up'}: {res.message}" + (f" (pid {res.pid})" if res.pid else ""))
        for name, text in res.diagnoses.items():
            print(f"  {name}: {text}")
        if not res.ok:
            print("stopped and cleaned up" if not args.keep_on_failure else
                  f"left running (--keep-on-failure); log: {runner.log_path(config)}", file=sys.stderr)
    return EXIT_OK if res.ok else EXIT_INVALID


def cmd_down(args: argparse.Namespace) -> int:
    from hatun import runner
    from hatun.config import ConfigError, ConfigUnreadable, load_config

    path = args.config
    if path is None:
        from hatun.config import Config
        from hatun.rundir import RunDir

        path = RunDir(Config.model_fields["run_dir"].default).load_state().config
    if path is None:
        print("hatun down: no config given and no running hatun found; nothing to do")
        return EXIT_OK
    try:
        config, _ = load_config(path, skip_secrets=True)
    except (ConfigError, ConfigUnreadable) as e:
        raise CliError(f"cannot read {path}: {e}") from None
    was_running, removed = runner.down(config)
    if was_running:
        print("hatun stopped; its tunnels, routes and rules are removed")
    for what in removed:
        print(f"  removed leftover: {what}")
    if not was_running and not removed:
        print("hatun was not running; nothing to remove")
    return EXIT_OK


# ---------------------------------------------------------------- lab


def cmd_lab(args: argparse.Namespace) -> int:
    import trio

    from hatun.lab import topology
    from hatun.lab.topology import LabError

    try:
        if args.lab_command == "up":
            lab = trio.run(topology.lab_up, args.name, args.gateways, args.backend, args.ipv6, args.enroll)
            print(f"lab {lab.name!r} is up: {lab.gateways} gateways ({lab.backend} WireGuard), runner namespace"
                  f" {lab.runner}, service host {topology.SERVICE} in {lab.lan}")
            print(f"hatun config for the runner: {lab.config_path}")
            print("next:")
            if lab.enroll:
                from hatun.lab.enroll import enroll_dir

                print(f"  export ACTIONS_ID_TOKEN_REQUEST_URL=http://127.0.0.1:18090/token?api-version=2.0"
                      f" ACTIONS_ID_TOKEN_REQUEST_TOKEN=$(cat {enroll_dir(lab)}/request-token)"
                      "   (what a job with `id-token: write` has)")
            print(f"  ip netns exec {lab.runner} hatun run {lab.config_path}")
            print(f"  hatun status --socket {lab.control_socket}")
            print(f"  ip netns exec {lab.runner} curl -s http://{topology.SERVICE}/     (which gateway carried it)")
            print(f"  hatun lab fail gw2 --name {lab.name}   /   hatun lab heal gw2 --name {lab.name}")
            print(f"  hatun lab down --name {lab.name}")
        elif args.lab_command == "down":
            removed = trio.run(topology.lab_down, args.name)
            print(f"lab {args.name!r} removed" if removed else f"lab {args.name!r}: nothing to remove")
        elif args.lab_command == "fail":
            print(trio.run(topology.lab_fail, args.name, args.gateway, args.mode))
        elif args.lab_command == "heal":
            print(trio.run(topology.lab_heal, args.name, args.gateway))
        elif args.lab_command == "bench":
            from hatun.lab.bench import run_bench

            report = trio.run(lambda: run_bench(args.scenarios, runs=args.runs, quick=args.quick, backend=args.backend,
                                                slow=args.slow, baseline=args.baseline,
                                                progress=lambda s: print(s, file=sys.stderr, flush=True)))
            if args.json:
                _print_json(report.to_json())
            else:
                print(report.table())
        elif args.lab_command == "demo":
            from hatun.lab.demo import run_demo

            tty = sys.stdout.isatty()

            def show(frame: str) -> None:
                sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + frame + "\n" + ("" if tty else "\n"))
                sys.stdout.flush()

            summary = trio.run(lambda: run_demo(show, name=args.name, duration=args.duration, backend=args.backend,
                                                enroll=args.enroll))
            if summary:
                print(f"demo finished: {summary['sent']} packets sent, {summary['lost']} lost during the failovers;"
                      " the lab is removed")
    except LabError as e:
        raise CliError(str(e), EXIT_INVALID) from None
    return EXIT_OK


# ---------------------------------------------------------------- parser


def _fault_mode(text: str) -> str:
    """`lab fail --mode`: checked here, so a typo is a usage error like any other (exit 2)."""
    from hatun.lab.faults import parse_fault

    try:
        return str(parse_fault(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


CONFIG_HELP = "the hatun config file (TOML; `hatun check CONFIG` explains it)"
LAB_NAME_HELP = "lab name: 1-8 lowercase letters or digits (default lab)"
BACKEND_HELP = "WireGuard: kernel where the kernel has it (auto), or wireguard-go (userspace)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hatun",
        description="Keep several WireGuard tunnels up and steer private prefixes over the healthy ones.",
        epilog="Start with `hatun check CONFIG`; try everything on the built-in lab with `hatun lab demo`."
               " `hatun COMMAND --help` tells more.",
    )
    p.add_argument("--version", action="version", version=f"hatun {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("check", cmd_check, "check a config file and explain every mistake in it")
    sp.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--skip-secrets", action="store_true",
                    help="do not read private keys (files or environment), e.g. to validate in CI without secrets")

    sp = add("keygen", cmd_keygen, "generate a private key: with --out, write it (mode 0600) and print the public key")
    sp.add_argument("--out", metavar="FILE", help="write the private key to FILE (never overwrites)")

    add("pubkey", cmd_pubkey, "read a private key on standard input and print its public key")

    sp = add("import", cmd_import, "turn wg-quick configs into a hatun config (on standard output)")
    sp.add_argument("files", nargs="+", metavar="WG_CONF", help="a wg-quick file (one per gateway, one [Peer] each)")
    sp.add_argument("--key-dir", metavar="DIR", help="where to write the private keys (default: beside the first file)")

    sp = add("gateway", cmd_gateway, "print what a gateway needs for one tunnel of this host: a wg-quick file"
             " (this host as its peer, the return route, forwarding, masquerading), or its parts")
    sp.add_argument("tunnel", metavar="NAME", help="the tunnel (its name in CONFIG) whose gateway this is for")
    sp.add_argument("config", metavar="CONFIG", help="this host's hatun config (TOML)")
    sp.add_argument("--format", choices=("wg-quick", "wg", "nft"), default="wg-quick",
                    help="wg-quick (default): a whole file for a dedicated interface; wg: this host as a [Peer]"
                         " for `wg addconf` on an existing interface; nft: the masquerading for `nft -f`")
    sp.add_argument("--key-file", default="/etc/wireguard/%i.key", metavar="PATH",
                    help="where the gateway keeps its private key (wg-quick; %%i: the interface; default %(default)s)")
    sp.add_argument("--psk-file", default="/etc/wireguard/%i.psk", metavar="PATH",
                    help="where the gateway keeps the preshared key, if the tunnel has one (default %(default)s)")
    sp.add_argument("--interface", default="wg0", metavar="IFNAME",
                    help="the gateway's WireGuard interface (nft; default %(default)s)")

    help_text = "keyless CI runners: a gateway's enrollment service for GitHub OIDC tokens"
    enroll = sub.add_parser("enroll", help=help_text, description=help_text)
    esub = enroll.add_subparsers(dest="enroll_command", metavar="ENROLL_COMMAND")
    esub.required = True
    sp = esub.add_parser("serve", help="serve enrollments for this gateway's WireGuard device until SIGTERM",
                         description="serve enrollments for this gateway's WireGuard device until SIGTERM")
    sp.set_defaults(func=cmd_enroll_serve)
    sp.add_argument("config", metavar="CONFIG", help="the gateway's file with [enroll] (`hatun check` explains it)")
    sp.add_argument("--log-format", choices=("human", "json"), default="human",
                    help="log lines for people (default) or one JSON object per line")
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                    help="least important level logged (default info)")

    sp = add("run", cmd_run, "run the supervisor in the foreground (for systemd) until SIGTERM/SIGINT")
    sp.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    sp.add_argument("--log-format", choices=("human", "json"), default="human",
                    help="log lines for people (default) or one JSON object per line")
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                    help="least important level logged (default info)")

    def control_args(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--socket", metavar="PATH", help="control socket of the hatun to talk to")
        g.add_argument("--config", metavar="CONFIG", help="take the control socket path from this config")

    sp = add("status", cmd_status, "show every tunnel: state, RTT, loss, weight, throughput, handshake, route")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--watch", action="store_true", help="redraw once a second")
    sp.add_argument("--count", type=int, help=argparse.SUPPRESS)
    control_args(sp)
    for name, text in (("drain", "take a tunnel out of the route for new flows (its flows stay), for maintenance"),
                       ("undrain", "put a drained tunnel back into the route")):
        sp = add(name, cmd_drain, text)
        sp.add_argument("tunnel", metavar="NAME", help="the tunnel's name in the config")
        control_args(sp)
    sp = add("reload", cmd_reload, "re-read the config file of a running hatun (like SIGHUP) and report the result")
    control_args(sp)

    sp = add("up", cmd_up, "runner mode: start hatun in the background, return once enough tunnels are healthy")
    sp.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    sp.add_argument("--wait", type=float, default=60.0, metavar="SECONDS", help="how long to wait (default 60)")
    sp.add_argument("--min-healthy", type=int, metavar="N", help="tunnels that must be healthy (default 1)")
    sp.add_argument("--keep-on-failure", action="store_true", help="leave hatun running when the wait fails")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("down", cmd_down, "stop a background hatun and remove its tunnels and routes (idempotent)")
    sp.add_argument("config", metavar="CONFIG", nargs="?", help="default: the config of the hatun in /run/hatun")

    lab = add("lab", cmd_lab, "the built-in lab: a runner, gateways and a private LAN in network namespaces")
    lsub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")
    lsub.required = True
    sp = lsub.add_parser("up", help="build the lab and write a hatun config for its runner")
    sp.add_argument("--gateways", type=int, default=3, help="how many gateways (default 3)")
    sp.add_argument("--name", default="lab", help=LAB_NAME_HELP)
    sp.add_argument("--backend", choices=("auto", "kernel", "userspace"), default="auto", help=BACKEND_HELP)
    sp.add_argument("--ipv6", action="store_true", help="IPv6 inside the tunnels and in the LAN too")
    sp.add_argument("--enroll", action="store_true",
                    help="keyless: an OIDC issuer of the lab's own and `hatun enroll serve` on each gateway; the"
                         " runner's tunnels enroll (no keys in its config)")
    sp = lsub.add_parser("down", help="remove the lab (also after a crash)")
    sp.add_argument("--name", default="lab", help=LAB_NAME_HELP)
    sp = lsub.add_parser("fail", help="break one gateway's path")
    sp.add_argument("gateway", metavar="GW", help="gw1, gw2, ...")
    sp.add_argument("--name", default="lab", help=LAB_NAME_HELP)
    sp.add_argument("--mode", type=_fault_mode, default="blackhole", metavar="MODE",
                    help="blackhole (default): drop all packets on its underlay link; kill: kill its WireGuard"
                         " peer; oneway: drop only the runner's packets to it; loss:N: drop N %% (0 < N <= 100)"
                         " at random on each direction of its link, so a round trip is lost with probability"
                         " 1-(1-N/100)^2 (loss:30 loses 51 %%); delay:D (delay:80ms, delay:0.08s; 1ms..10s):"
                         " the round trip through its link grows by D (half each way)")
    sp = lsub.add_parser("demo", help="the lab, hatun on it, traffic, and gateways failing and healing, shown live")
    sp.add_argument("--duration", type=float, default=60.0, metavar="SECONDS", help="how long (default 60)")
    sp.add_argument("--name", default="demo", help="lab name (default demo)")
    sp.add_argument("--backend", choices=("auto", "kernel", "userspace"), default="auto", help=BACKEND_HELP)
    sp.add_argument("--enroll", action="store_true",
                    help="keyless runner: hatun enrolls at each gateway with the lab's OIDC tokens")
    sp = lsub.add_parser("bench", help="measure failover, gray failures, saturation, drain, restart, weights,"
                                       " throughput and scale on the lab")
    sp.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                    help="failover, gray, saturation, drain, restart, weights, throughput, scale, enroll (default: all)")
    sp.add_argument("--baseline", choices=("bfd",), default=None,
                    help="bfd: the failover scenario also measures BIRD2 + BFD (50 ms x 3) over the same tunnels")
    sp.add_argument("--runs", type=int, default=5, help="repetitions per scenario (default 5)")
    sp.add_argument("--quick", action="store_true", help="small sizes: a smoke run that keeps the harness working")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--backend", choices=("auto", "kernel", "userspace"), default="auto", help=BACKEND_HELP)
    sp.add_argument("--slow", type=float, default=1.0, metavar="FACTOR",
                    help="stretch health timings and lower packet rates (e.g. 5 on an emulated CPU)")
    sp = lsub.add_parser("heal", help="repair a failed gateway")
    sp.add_argument("gateway", metavar="GW", help="gw1, gw2, ...")
    sp.add_argument("--name", default="lab", help=LAB_NAME_HELP)

    # Hidden (no help=, so not listed): the JSON schema of the config, for editors and CI.
    sp = sub.add_parser("schema", description="print the JSON schema of the config file")
    sp.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        from hatun.keys import redact

        print(f"hatun: {redact(str(e))}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug: say so plainly, keep the traceback for HATUN_DEBUG
        if os.environ.get("HATUN_DEBUG"):
            raise
        leaf = e
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        from hatun.keys import redact

        print(f"hatun: internal error: {type(leaf).__name__}: {redact(str(leaf))} (set HATUN_DEBUG=1 for details)",
              file=sys.stderr)
        return EXIT_INTERNAL
