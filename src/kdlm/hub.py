"""Push a trained student to the Hugging Face Hub, failing with a clear message and nothing lost."""

from __future__ import annotations

from pathlib import Path

from kdlm.errors import KdlmError


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload `folder` (a saved student with its model card) to the model repo `repo_id`; returns its URL.

    Raises:
        KdlmError: offline, no token, no permission or no network; the message says the folder is saved and
            how to push it later.
    """
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, repo_type="model", exist_ok=True)
        upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="kdlm: distilled student")
    except Exception as error:  # noqa: BLE001 - offline mode, auth and network errors come in many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KdlmError(
            f"could not push {folder} to the Hub repo {repo_id}: {reason}. The student and its model card are saved "
            f"in {folder}; push them later with `huggingface-cli upload {repo_id} {folder}` (log in first with "
            "`huggingface-cli login`; HF_HUB_OFFLINE=1 forbids any upload)"
        ) from None
    return f"https://huggingface.co/{repo_id}"
