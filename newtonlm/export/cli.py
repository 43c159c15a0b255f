"""The export command.

    python -m newtonlm.export --checkpoint RUN_DIR --out DIR [--step N] [--dtype fp32|bf16]
        [--overwrite] [--push-to-hub REPO_ID [--private] [--revision BRANCH] [--commit-message MSG]]

(also installed as ``newtonlm-export``). Writes the Hugging Face folder of a training checkpoint
(``folder.export_checkpoint``) and optionally uploads it (``hub.push_to_hub``). See docs/export.md.
"""

from __future__ import annotations

import argparse
import sys

from .folder import DTYPES, export_checkpoint
from .hub import check_hub_access, push_to_hub
from .source import ExportError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m newtonlm.export",
                                description="Export a newtonlm training checkpoint as a Hugging Face model "
                                            "folder (and optionally upload it).")
    p.add_argument("--checkpoint", required=True,
                   help="run directory (or one of its checkpoints/step_* folders)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--step", type=int, default=None,
                   help="export this step (default: the newest complete checkpoint)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="upload the folder to this model repo")
    p.add_argument("--private", action="store_true", help="create the repo private (with --push-to-hub)")
    p.add_argument("--revision", default=None,
                   help="branch to upload to (with --push-to-hub; created if missing)")
    p.add_argument("--commit-message", default=None, help="commit message (with --push-to-hub)")
    return p


def main(argv: list[str] | None = None, hub_api=None) -> int:
    """The command line; returns the exit status (2 for an :class:`ExportError`, printed as one line
    on stderr; notes on what could not be verified go to stderr too). ``hub_api`` replaces ``HfApi()``
    (tests)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.push_to_hub is None and (args.private or args.revision or args.commit_message):
        parser.error("--private, --revision and --commit-message need --push-to-hub REPO_ID")
    try:
        if args.push_to_hub:
            check_hub_access(args.push_to_hub)
        result = export_checkpoint(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                                   overwrite=args.overwrite, repo_id=args.push_to_hub)
        for note in result.notes:
            print(f"newtonlm export: note: {note}", file=sys.stderr)
        print(f"exported {result.arch} step {result.step} ({result.tokens_seen:,} tokens, "
              f"{result.parameters['total']:,} parameters, {args.dtype}) to {result.out}: "
              f"{', '.join(result.files)}")
        if args.push_to_hub:
            message = args.commit_message or (f"newtonlm export: {result.arch} step {result.step} "
                                              f"({result.tokens_seen:,} tokens)")
            url = push_to_hub(result.out, args.push_to_hub, private=args.private, revision=args.revision,
                              commit_message=message, api=hub_api)
            print(f"uploaded to {args.push_to_hub}: {url}")
    except ExportError as err:  # one line: a library's message inside ours may hold line breaks
        print(f"newtonlm export: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    return 0
