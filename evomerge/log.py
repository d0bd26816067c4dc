"""Logging setup shared by the CLI and library entry points."""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _BarFriendlyHandler(logging.StreamHandler):
    """Console lines written through tqdm, so they print above a progress bar instead of tearing it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False, log_file: str | os.PathLike | None = None) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if log_file else level)
    if not any(getattr(h, "_evomerge", False) for h in root.handlers):
        console = _BarFriendlyHandler()
        console.setLevel(level)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        console._evomerge = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if log_file is not None:
        path = os.fspath(log_file)
        if not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setLevel(logging.DEBUG)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            root.addHandler(handler)
    # Third-party chatter that drowns what happened.
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "fsspec", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # lm-eval warns on every call about things evomerge does on purpose (model objects, metadata).
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # evomerge drives trials with ask/tell and keeps its own heartbeat (search/storage.py).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def to_log_files(level: int, message: str, exc_info=None) -> None:
    """A record for the log files only (search.log), e.g. the fatal error the CLI prints itself: an
    overnight user reads the log, not the terminal that is gone."""
    record = logging.getLogger("evomerge").makeRecord("evomerge", level, "", 0, message, (), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
