"""`hatun run`: the supervisor with its servers (control socket, metrics) and signal handling."""

from __future__ import annotations

import logging
import signal

import trio

from hatun import __version__
from hatun.config import Config, Secrets, config_warnings
from hatun.supervisor import Supervisor

log = logging.getLogger("hatun")


async def _serve_signals(sup: Supervisor, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                # Started, not awaited: a slow reload must not delay a SIGTERM that follows. Its
                # outcome is logged and shown by `hatun status`.
                sup.start_reload()
            else:
                log.info("received %s", signal.Signals(signum).name)
                sup.stop()


async def run(config: Config, secrets: Secrets, config_path: str | None) -> None:
    """Run hatun until SIGTERM/SIGINT (or a `stop` through the control socket)."""
    from hatun.control import prepare_path
    from hatun.enrollment import EnrollError, Enrollments
    from hatun.metrics import open_metrics_listeners
    from hatun.supervisor import SupervisorError

    # What can fail for reasons outside hatun is checked before anything in the kernel is touched.
    prepare_path(config.control.socket)
    listeners = None
    if config.metrics.address is not None:
        try:
            listeners = await open_metrics_listeners(config)
        except OSError as e:
            raise SupervisorError(f"metrics: cannot listen on {config.metrics.listen}: {e.strerror or e}") from None
    for warning in config_warnings(config):
        log.warning("%s", warning)
    enrollments = Enrollments()
    try:
        config, secrets = await enrollments.resolve(config, secrets)
    except EnrollError as e:
        raise SupervisorError(f"enrollment: {e}") from None
    sup = Supervisor(config, secrets, config_path)
    sup.resolve = enrollments.resolve
    sup.after_teardown = enrollments.release
    try:
        await _serve(sup, listeners)
    finally:
        if enrollments.done and sup.cleanup_on_stop:
            with trio.CancelScope(shield=True):
                await enrollments.release()


async def _serve(sup, listeners) -> None:
    from hatun.control import serve_control
    from hatun.metrics import serve_metrics

    async with trio.open_nursery() as servers:
        await servers.start(_serve_signals, sup)
        async with trio.open_nursery() as core:
            await core.start(sup.run)
            await servers.start(serve_control, sup)
            if listeners is not None:
                await servers.start(serve_metrics, sup, listeners)
            log.info("hatun %s running: %d tunnels, backend %s, steering %s", __version__, len(sup.tunnels),
                     sup.backend_name, sup.mode)
        # sup.run has returned: stopped and cleaned up. The servers go with it.
        servers.cancel_scope.cancel()
