"""The original LLaVA's `llava.utils` helpers (loggers, UI messages, moderation), for code that imports them.

Forks, notebooks and eval harnesses written against haotian-liu/LLaVA import these names; our own servers do not
use them (they log through `llava.serve.server_utils.setup_logging`). Differences from the original, on purpose:

- `build_logger` writes the named logger to `<LOGDIR>/<logger_filename>` (rotated daily, UTC) as the original did,
  but it does not replace `sys.stdout` / `sys.stderr` with logging streams and does not attach its file handler to
  every logger that exists at call time. The original's redirection breaks `print` to a terminal, tqdm progress
  bars and pytest's capture, and the handler sprinkling duplicated lines; a caller that wants other loggers in the
  file can add `logger.handlers[0]` to them. `LOGDIR` is `llava.constants.LOGDIR`, overridden by `LLAVA_LOG_DIR`.
- `violates_moderation` sends proper JSON (the original built it by string concatenation, so a quote in the text
  made the request invalid) and honours `OPENAI_BASE_URL`. Like the original it answers False (not flagged) when
  the moderation service cannot be reached, and it logs a warning saying so.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading

from llava.constants import LOGDIR

# Shown in a chat window; clients of the original web UI compare streamed text with these, so the text is kept.
server_error_msg = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
moderation_msg = "YOUR INPUT VIOLATES OUR CONTENT MODERATION GUIDELINES. PLEASE TRY AGAIN."

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
MODERATION_TIMEOUT_S = 5.0

logger = logging.getLogger(__name__)

_file_handlers: dict[str, logging.Handler] = {}  # one handler per log file, shared by the loggers that write it
_handlers_lock = threading.Lock()


def log_dir() -> str:
    """Where `build_logger` writes: `$LLAVA_LOG_DIR`, else `llava.constants.LOGDIR`."""
    return os.environ.get("LLAVA_LOG_DIR", LOGDIR)


def build_logger(logger_name: str, logger_filename: str) -> logging.Logger:
    """The logger `logger_name` at INFO level, also writing to `<log dir>/<logger_filename>` (rotated daily, UTC).

    Calling it again (for the same or another logger and the same file) reuses the file's handler, so no line is
    written twice. See the module docstring for how this differs from the original.
    """
    formatter = logging.Formatter(fmt=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    named = logging.getLogger(logger_name)
    named.setLevel(logging.INFO)
    path = os.path.abspath(os.path.join(log_dir(), logger_filename))
    with _handlers_lock:
        handler = _file_handlers.get(path)
        if handler is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handler = logging.handlers.TimedRotatingFileHandler(path, when="D", utc=True, encoding="UTF-8")
            handler.setFormatter(formatter)
            _file_handlers[path] = handler
    if handler not in named.handlers:
        named.addHandler(handler)
    return named


def disable_torch_init() -> None:
    """Skip PyTorch's random initialisation of `nn.Linear` and `nn.LayerNorm` (process-wide), as the original did.

    It makes building a model whose weights are loaded right after faster. It changes the two classes for the
    whole process: layers built afterwards start from uninitialised memory until weights are loaded into them.
    Our loader does not need it (transformers already skips initialising weights it loads).
    """
    import torch

    torch.nn.Linear.reset_parameters = lambda self: None
    torch.nn.LayerNorm.reset_parameters = lambda self: None


def violates_moderation(text: str) -> bool:
    """Whether OpenAI's moderation endpoint flags `text` (needs OPENAI_API_KEY; OPENAI_BASE_URL picks the server).

    Answers False when the service cannot be reached or answers without a result, as the original did, and logs
    a warning naming the cause.
    """
    import requests

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise RuntimeError("violates_moderation needs OPENAI_API_KEY (and OPENAI_BASE_URL for a non-OpenAI server).")
    base = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
    url = f"{base}/moderations"
    try:
        response = requests.post(
            url,
            headers={"Authorization": f"Bearer {key}"},
            json={"input": text.replace("\n", "")},
            timeout=MODERATION_TIMEOUT_S,
        )
        return bool(response.json()["results"][0]["flagged"])
    except requests.exceptions.RequestException as err:
        logger.warning("Moderation service %s unreachable (%s); treating the text as not flagged.", url, err)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        logger.warning("Moderation service %s gave no result (%r); treating the text as not flagged.", url, err)
    return False


def pretty_print_semaphore(semaphore) -> str:
    """`Semaphore(value=N, locked=B)` for an asyncio/threading semaphore, or `None`."""
    if semaphore is None:
        return "None"
    return f"Semaphore(value={semaphore._value}, locked={semaphore.locked()})"


__all__ = [
    "build_logger",
    "disable_torch_init",
    "log_dir",
    "moderation_msg",
    "pretty_print_semaphore",
    "server_error_msg",
    "violates_moderation",
]
