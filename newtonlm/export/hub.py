"""Publishing an exported folder on the Hugging Face Hub.

huggingface_hub authenticates itself from ``HF_TOKEN`` or the login saved by ``hf auth login``; this
module only asks whether a token exists and never reads it into output, files or the model card.
"""

from __future__ import annotations

from pathlib import Path

from .source import ExportError


def check_hub_access(repo_id: str) -> None:
    """Fail before any work when the repo id is malformed or no Hugging Face login is available."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a valid repo id ({err}); expected "
                          "'namespace/name'") from err
    if get_token() is None:  # only tested for presence: the token itself is left to huggingface_hub
        raise ExportError("no Hugging Face login: run `hf auth login` or set HF_TOKEN, then rerun")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, api=None) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing; ``revision``: a branch,
    created if missing); returns the commit URL. ``api``: an ``HfApi``-like object (default ``HfApi()``,
    which authenticates from HF_TOKEN or the saved login)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    folder = Path(folder)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=commit_message, repo_type="model")
    except Exception as err:  # network, permissions, quota ...: the folder is intact, say how to retry
        raise ExportError(f"upload to {repo_id} failed: {type(err).__name__}: {err}; the exported folder "
                          f"{folder} is complete: retry with `hf upload {repo_id} {folder}`") from err
    return str(getattr(commit, "commit_url", commit))
