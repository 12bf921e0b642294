"""Is the Hugging Face hub there? Asked once per run, before anything asks the hub for a file.

Without network access huggingface_hub retries every request five times with growing waits, and a
run touches the hub several times (the dataset card, its files, the model), so an offline run used
to print two dozen retry warnings over half a minute before its real error. One quick request
answers the question first: if the hub cannot be reached, the run goes offline as HF_HUB_OFFLINE=1
would (files already in the local cache still load), and says so once.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .backends import OPEN_CLIP_HUB, OPEN_CLIP_PREFIX
from .config import RunConfig
from .dataset import is_hub_id

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 4.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_names(cfg: RunConfig) -> list[str]:
    """What this run would fetch from the hub: the dataset and the model, where they are hub ids."""
    names = []
    reads_dataset = cfg.evaluate.enabled or cfg.export.enabled or not (cfg.from_cache or cfg.searches_only)
    if reads_dataset and not Path(cfg.dataset.name).exists() and is_hub_id(cfg.dataset.name):
        names.append(f"--dataset {cfg.dataset.name}")
    model, loads_model = cfg.embedder.model, cfg.export.enabled or cfg.embedder.resolve_backend() == "torch"
    if not cfg.export.enabled and (cfg.searches_only or cfg.from_cache or cfg.update):
        from .galleries import store_identity_if_default  # galleries.py builds on this module's neighbours

        made = store_identity_if_default(cfg)  # no model flags: the run embeds with the store's own
        if made is not None:
            model, loads_model = made.model or model, made.backend == "torch"
    # a path that is gone: no hub helps; open_clip's hub models are named hf-hub:ORG/NAME
    hub_model = model.removeprefix(OPEN_CLIP_HUB)
    if loads_model and not Path(model).exists() and is_hub_id(hub_model) and not model.startswith(OPEN_CLIP_PREFIX):
        names.append(f"--model {model}")
    return names


_RUN_NAMES: list[str] = []  # hub_names of the run under way (go_offline_unless_reachable sets them)


def run_hub_names() -> list[str]:
    """What the run under way fetches from the hub ("--dataset X", "--model Y"), for its messages."""
    return list(_RUN_NAMES)


def offline_already() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def go_offline_unless_reachable(cfg: RunConfig) -> str | None:
    """Ask the hub once when this run needs it; if it does not answer, work offline from here on.

    Returns:
        The warning that was logged, or None (the hub answered, was not needed, or the user had
        already set HF_HUB_OFFLINE).
    """
    names = hub_names(cfg)
    _RUN_NAMES[:] = names
    if not names or offline_already():
        return None
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    reason = probe(endpoint)
    if reason is None:
        return None
    for variable in OFFLINE_VARIABLES:
        os.environ[variable] = "1"
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # read once at import: a module already loaded is told directly
            setattr(sys.modules[module], attribute, True)
    message = (
        f"the Hugging Face hub ({endpoint}) cannot be reached ({reason}), so this run works offline, as "
        f"HF_HUB_OFFLINE=1 would: {' and '.join(names)} must be in this machine's hub cache. Set HF_HUB_OFFLINE=1 "
        "to skip this check; without a cached copy pass local ones with --dataset DIR / --model DIR"
    )
    log.warning(message)
    return message


def probe(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when something answers at `endpoint` (any HTTP status will do), else why not."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        return str(reason).strip().splitlines()[0] if str(reason).strip() else type(e).__name__
    return None
