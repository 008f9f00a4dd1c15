"""SAE sources on the Hugging Face hub: ``hf://owner/repo[/subfolder]``, or a plain ``owner/repo``
id that is not a local path (the subfolder then given separately). Fetched with huggingface_hub
(its cache, revisions, HF_HUB_OFFLINE and tokens as usual); only the subfolder's files and the
repository's top-level config.json (sparsify records the model there) are downloaded."""
from __future__ import annotations

import re
from pathlib import Path

HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def split_hub(source: str, subfolder: str | None = None) -> tuple[str, str | None] | None:
    """(repo id, subfolder) when ``source`` names a hub repository, else None."""
    if source.startswith(HF_PREFIX):
        parts = [p for p in source[len(HF_PREFIX):].split("/") if p]
        if len(parts) < 2:
            raise ValueError(f"{source!r}: a hub source is hf://owner/repo[/subfolder]")
        sub = "/".join(parts[2:] + ([subfolder.strip("/")] if subfolder else [])) or None
        return "/".join(parts[:2]), sub
    if _REPO_ID.match(source) and not Path(source).expanduser().exists():
        return source, subfolder.strip("/") if subfolder else None
    return None


def fetch(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local path of the repository's subfolder (or file), downloaded into the hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = None if subfolder is None else [subfolder, f"{subfolder}/*", "config.json"]
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = f"hf://{repo_id}" + (f"/{subfolder}" if subfolder else "") + (f" @ {revision}" if revision else "")
        raise FileNotFoundError(f"{where}: cannot fetch it from the hub or find it in the local hub cache "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    path = root / subfolder if subfolder else root
    if not path.exists():
        raise FileNotFoundError(f"hf://{repo_id}: no {subfolder!r} in the repository (it has "
                                f"{sorted(p.name for p in root.iterdir())})")
    return path
