"""Hand a model on: `python -m minisft.push FOLDER REPO_ID` uploads it to the Hugging Face Hub.

    python -m minisft.push runs/06_sft_loop your-name/smollm-sft      # a run folder: its final/
    python -m minisft.push runs/06_sft_loop/final your-name/smollm-sft --private

It creates the repository if it does not exist (huggingface_hub's create_repo) and uploads the folder
in one commit (upload_folder). The folder's README.md is the model card the Hub shows (model_card.py
writes it into final/ when a run ends). Pushing needs a login (`hf auth login`, or HF_TOKEN) and the
network; without them, or with HF_HUB_OFFLINE set, it stops with one line saying what to do.
"""
import argparse
import os
import sys


def model_folder(path):
    """FOLDER, or FOLDER/final for a run folder -> a folder that holds a model or an adapter."""
    final = os.path.join(path, "final")
    folder = final if os.path.isdir(final) else path
    names = os.listdir(folder) if os.path.isdir(folder) else None
    if names is None:
        raise FileNotFoundError(f"{path}: no such folder")
    if "config.json" not in names and "adapter_config.json" not in names:
        raise ValueError(f"{folder}: not a model folder (no config.json) nor a LoRA adapter folder "
                         f"(no adapter_config.json)")
    return folder


def push(folder, repo_id, private=False, message="Upload with minisft"):
    """create_repo + upload_folder -> the URL of the commit. Errors are raised as RuntimeError with what to do."""
    from minisft.weights import hub_offline

    if hub_offline():
        raise RuntimeError("HF_HUB_OFFLINE is set: pushing needs the network (unset it, or set it to 0, and retry)")
    from huggingface_hub import constants, create_repo, get_token, upload_folder
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if get_token() is None:  # checked first: without a token the Hub would refuse after a round trip
        raise RuntimeError("not logged in to the Hub: run `hf auth login` (or set HF_TOKEN) and retry")
    try:
        create_repo(repo_id, private=private, exist_ok=True)
        info = upload_folder(folder_path=folder, repo_id=repo_id, commit_message=message)
    except LocalTokenNotFoundError:
        raise RuntimeError("not logged in to the Hub: run `hf auth login` (or set HF_TOKEN) and retry") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ("check the token (`hf auth login`) and that it may write to this namespace" if status in (401, 403)
                else "check the repo id")
        raise RuntimeError(f"the Hub refused ({status}): {' '.join(str(e).split())[:200]}; {hint}") from None
    except Exception as e:  # no network, a bad endpoint (httpx's errors), a bad repo id: said in one line
        raise RuntimeError(f"cannot push to {constants.ENDPOINT} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                           f"check the network connection (or HF_ENDPOINT) and retry") from None
    return getattr(info, "commit_url", str(info))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.push", description="Upload a model folder to the Hub.")
    p.add_argument("folder", help="model folder, LoRA adapter folder, or run folder (its final/)")
    p.add_argument("repo_id", help="owner/name of the Hub model repository")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default="Upload with minisft", help="commit message")
    args = p.parse_args(argv)
    try:
        folder = model_folder(args.folder)
        if not os.path.isfile(os.path.join(folder, "README.md")):
            print(f"note: {folder} has no README.md (model card); `python -m minisft.model_card RUN` writes one",
                  file=sys.stderr)
        url = push(folder, args.repo_id, args.private, args.message)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"pushed {folder} to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
