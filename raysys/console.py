"""What a raysys command prints besides its own output: Ray at WARNING, known-harmless notices off.

Ray, Ray Data and Ray Train log their internals at INFO in every process (execution plans,
"Reporting training result", worker-group start-up); raysys shows its own progress instead, so
their console output is raised to WARNING unless `--verbose` (RAYSYS_VERBOSE=1). Their log files
in the Ray session directory keep everything. Notices that are known to be harmless here are
stopped where they start, each with its reason below; warnings and errors stay visible.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "RAYSYS_VERBOSE"
WORKER_SETUP_HOOK = "raysys.console.setup_worker"  # Ray imports and calls it in every worker process
# Logged by Ray Data when progress bars are off; raysys turns them off on purpose (per-worker bars
# would interleave) and draws its own.
PROGRESS_BARS_NOTICE = "Progress bars disabled"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose() -> None:
    os.environ[VERBOSE_ENV] = "1"  # the environment, so ensure_ray and every Ray worker see it


def quiet_driver() -> None:
    """The driver's own model loads (interpolation, export, the default model) without
    transformers' per-load "Loading weights" bars; call before transformers is imported, which
    reads the setting once."""
    if not is_verbose():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def ray_init_args(address: str | None, env_vars: dict[str, str]) -> dict:
    """Extra `ray.init` arguments (and driver environment) for the console settings above.

    address: RAY_ADDRESS (None: a local Ray is started). env_vars: the job's worker environment.
    """
    env = dict(env_vars)
    env[VERBOSE_ENV] = "1" if is_verbose() else "0"
    if is_verbose():
        return {"runtime_env": {"env_vars": env}, "logging_level": logging.INFO}
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-worker "Loading weights" bars
    if not address or address == "local":
        _enable_token_auth_quietly()
        # One machine has no node preemption to watch for, and Ray Train's watcher is a
        # restartable actor with object-store constructor arguments, which core logs at error level.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    quiet_ray_data()
    return {"runtime_env": {"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK},
            "logging_level": logging.WARNING}


def _enable_token_auth_quietly() -> None:
    """A new local Ray 2.60 turns token authentication on when RAY_AUTH_MODE is unset and logs a
    banner saying so. Turn it on the same way first (the environment alone is not enough: Ray has
    read its config at import), so the security stays and the banner goes."""
    if "RAY_AUTH_MODE" in os.environ:
        return  # the user chose; Ray respects that silently
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # another Ray version: keep its default, banner included
        return
    _enable_token_auth()


# Ray Train modules whose logger is named by file path, not under "ray.train", so the level in
# RunConfig(logging_config=...) misses them: "Reporting training result N: ..." per report and rank.
RAY_FILE_LOGGERS = (("train", "v2", "_internal", "execution", "context.py"), ("train", "collective", "collectives.py"))


def setup_worker() -> None:
    """worker_process_setup_hook: the driver's console settings in each worker (never raises)."""
    if is_verbose():
        return
    try:
        import ray

        for parts in RAY_FILE_LOGGERS:
            logging.getLogger(os.path.join(os.path.dirname(ray.__file__), *parts)).setLevel(logging.WARNING)
        quiet_ray_data()
    except Exception as exc:  # a quieter console is not worth a worker that cannot start
        logging.getLogger(__name__).debug("raysys console setup skipped: %s", exc)


def quiet_ray_data() -> None:
    """Ray Data's console handler to WARNING (its file log keeps INFO), its progress-bar notice off."""
    import ray.data  # noqa: F401  (importing it configures its loggers; adjust them after that)

    try:
        from ray._private.log import PlainRayHandler as console_handler  # what Ray Data logs to the console with
    except ImportError:  # another Ray version: any stream that is not a file
        console_handler = logging.StreamHandler
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, console_handler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    progress_logger = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _DropNotice) for f in progress_logger.filters):
        progress_logger.addFilter(_DropNotice(PROGRESS_BARS_NOTICE))


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def train_logging_config():
    """RunConfig(logging_config=...): Ray Train's own console output (controller and workers)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")
