"""Small helpers for the notebooks: show library code instead of copying it, and a folder per run."""

from __future__ import annotations

import inspect
import os
from datetime import UTC, datetime
from pathlib import Path

from vgstudy.errors import ConfigError


def progress_bars_disabled() -> bool:
    """Whether TQDM_DISABLE asks for no progress bars. tqdm reads it itself, but its notebook bar (tqdm.auto under
    Jupyter) and transformers' loading bar do not, so the bars in committed notebooks ask here."""
    return os.environ.get("TQDM_DISABLE", "") in ("1", "true", "True")


def show_source(obj: object) -> object:
    """Display the source of a library class or function, highlighted in Jupyter, as plain text elsewhere."""
    source = inspect.getsource(obj)
    try:
        from IPython.display import Code

        return Code(source, language="python")
    except ImportError:  # pragma: no cover - IPython is a dependency, but keep the helper usable without it
        print(source)
        return None


def run_dir(out_dir: str | Path, notebook: str, run_id: str | None = None) -> Path:
    """Create and return `out_dir/notebook/run_id` (a UTC timestamp by default); errors name the folder."""
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if "/" in run_id or run_id in ("", ".", ".."):
        raise ConfigError(f"run id {run_id!r} must be a plain folder name")
    path = Path(out_dir) / notebook / run_id
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write results into {path}: {e}") from e
    return path
