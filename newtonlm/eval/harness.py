"""lm-evaluation-harness: a local held-out task, and running lm_eval on newtonlm models offline.

    python -m newtonlm.eval.harness write-task --out runs/lm_eval_tasks [data=bible --split all]
    lm_eval --model hf --model_args pretrained=EXPORTED,trust_remote_code=True \\
        --include_path runs/lm_eval_tasks --tasks newtonlm_shakespeare_val --device cpu
    python -m newtonlm.eval.harness run MODEL --tasks-dir runs/lm_eval_tasks [--limit 20] [--json]

``write-task`` writes the documents of a configured split as ``<task>.jsonl`` (one ``{"text": ...}``
record per document) and the task ``<task>.yaml`` next to it (task name
``newtonlm_<sources>_<split>``): lm_eval's ``loglikelihood_rolling`` over each document
(``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``), read with ``datasets``' local json
builder, so it runs without network. The YAML names the jsonl by absolute path (lm_eval resolves
data files from the working directory): rewrite the task if the folder moves.

``run`` evaluates a run directory or a Hugging Face folder with lm_eval's ``HFLM`` on the model
instance (newtonlm's model types are registered in-process, no remote code needed) with the
model's context length as lm_eval's ``max_length``. Exported folders also run under the plain
``lm_eval --model hf`` command above; lm_eval reads the context length from the config's
``max_position_embeddings``, which every newtonlm preset sets.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .corpus import split_documents

METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def task_name(source_names: list[str], split: str) -> str:
    return "newtonlm_" + "_".join(source_names) + f"_{split}"


def task_yaml(name: str, data_file: Path) -> str:
    """The lm_eval task config for documents stored as ``{"text": ...}`` lines in ``data_file``."""
    return "\n".join([
        "# Written by python -m newtonlm.eval.harness write-task: held-out documents of newtonlm's",
        "# data config, scored with loglikelihood_rolling (each document from an empty context).",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "output_type: loglikelihood_rolling",
        "test_split: test",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        *[f"  - metric: {m}" for m in METRICS],
        "metadata:",
        "  version: 1.0",
        "",
    ])


def write_task(out_dir: str | Path, data_overrides: list[str] = (), split: str = "val",
               max_docs: int | None = None) -> str:
    """Write ``<task>.jsonl`` + ``<task>.yaml`` into ``out_dir`` for the split of the data config
    composed from ``data_overrides`` (default ``data=shakespeare``); returns the task name."""
    from newtonlm.data import compose_data_config

    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs={max_docs}; expected a positive number of documents (or None)")
    cfg = compose_data_config(list(data_overrides))
    name = task_name(list(cfg.sources), split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out / f"{name}.jsonl", "w") as f:
        for text in split_documents(cfg, split):
            f.write(json.dumps({"text": text}) + "\n")
            count += 1
            if max_docs is not None and count >= max_docs:
                break
    if count == 0:
        raise ValueError(f"split={split!r} of {list(cfg.sources)} has no document")
    (out / f"{name}.yaml").write_text(task_yaml(name, out / f"{name}.jsonl"))
    return name


def check_hf_model_args(model_args: str | None) -> None:
    """For lm_eval's own loading (``"hf"``): when ``pretrained=`` names a local folder, check it as
    ``load_for_eval`` does before lm_eval loads it: its weight files open, and its tokenizer's ids fit
    the config's ``vocab_size`` (errors name the file and both sizes). Hub ids are left to lm_eval."""
    from newtonlm.export import check_vocabulary, check_weight_files

    args = dict(part.split("=", 1) for part in (model_args or "").split(",") if "=" in part)
    folder = Path(args.get("pretrained", "").strip())
    if not (str(folder) and (folder / "config.json").is_file()):
        return
    check_weight_files(folder)
    rows = json.loads((folder / "config.json").read_text()).get("vocab_size")
    tokenizer_at = Path(args.get("tokenizer", "").strip() or folder)
    if isinstance(rows, int) and tokenizer_at.is_dir():
        from transformers import AutoTokenizer

        import newtonlm.models  # noqa: F401  (registers the ParaRNN model types AutoTokenizer reads)

        check_vocabulary(AutoTokenizer.from_pretrained(str(tokenizer_at)), rows, tokenizer_at, folder)


def run_lm_eval(model, tasks: list[str], tasks_dir: str | Path, limit: int | None = None,
                batch_size: int = 1, model_args: str | None = None, device: str = "cpu",
                builtin_tasks: bool = False) -> dict:
    """Run lm_eval's ``simple_evaluate`` on ``tasks`` found in ``tasks_dir``; returns
    ``{task: {metric: value}}``. ``model``: a ``LoadedModel`` (evaluated through ``HFLM`` on the
    instance), or the string "hf" with ``model_args`` (lm_eval's own loading, as its CLI).
    ``builtin_tasks``: also index lm_eval's own task configs (all of them: slow, see docs/eval.md;
    off: only ``tasks_dir``). The model's tokenizer is checked against its embedding first
    (:func:`check_hf_model_args` for ``"hf"``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from newtonlm.export import check_vocabulary, embedding_rows

    if model == "hf":
        check_hf_model_args(model_args)
    else:  # ids beyond the embedding would fail deep in nn.Embedding ("index out of range in self")
        check_vocabulary(model.tokenizer, embedding_rows(model.model), f"{model.source} (tokenizer)",
                         model.source)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=builtin_tasks)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"tasks {missing} not found in {tasks_dir}; write them with "
                         "`python -m newtonlm.eval.harness write-task --out DIR`")
    if model == "hf":
        lm, args = "hf", model_args
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, max_length=model.context,
                  batch_size=batch_size, device=device)
        args = None
    out = lm_eval.simple_evaluate(model=lm, model_args=args, tasks=tasks, task_manager=manager,
                                  limit=limit, batch_size=batch_size, device=device,
                                  log_samples=False, bootstrap_iters=0)
    results = {}
    for task in tasks:
        metrics = out["results"][task]
        results[task] = {m: float(metrics[f"{m},none"]) for m in METRICS if f"{m},none" in metrics}
    return results


def main(argv: list[str] | None = None) -> None:
    from newtonlm.data.config import split_overrides

    overrides, options = split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-task", help="write a local task from a data config's split")
    w.add_argument("--out", required=True, help="folder for <task>.yaml and <task>.jsonl")
    w.add_argument("--split", default="val", help="val (default), train or all")
    w.add_argument("--max-docs", type=int, help="first N documents only")
    r = sub.add_parser("run", help="evaluate a run directory or Hugging Face folder with lm_eval")
    r.add_argument("model", help="run directory or Hugging Face folder")
    r.add_argument("--tasks-dir", required=True, help="folder written by write-task (--include_path)")
    r.add_argument("--tasks", nargs="*", help="task names (default: every task in --tasks-dir)")
    r.add_argument("--limit", type=int, help="documents per task")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the newest)")
    r.add_argument("--context", type=int, help="lm_eval max_length (default: the model's context)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--builtin-tasks", action="store_true", help="also allow lm_eval's own task names")
    r.add_argument("--json", action="store_true")
    args = p.parse_args(options)
    try:
        if args.command == "write-task":
            print(write_task(args.out, overrides, args.split, args.max_docs))
            return
        from .loading import load_for_eval

        if overrides:
            raise ValueError(f"overrides {overrides} apply to write-task only")
        tasks = args.tasks or sorted(f.stem for f in Path(args.tasks_dir).glob("newtonlm_*.yaml"))
        loaded = load_for_eval(args.model, step=args.step, context=args.context, device=args.device)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
        results = run_lm_eval(loaded, tasks, args.tasks_dir, args.limit, args.batch_size, device=args.device,
                              builtin_tasks=args.builtin_tasks)
    except ValueError as err:  # a problem the user can fix (ExportError, DataError ...): one line, exit 2
        print(f"newtonlm harness: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'task':<32} " + " ".join(f"{m:>16}" for m in METRICS))
    for task, metrics in results.items():
        print(f"{task:<32} " + " ".join(f"{metrics.get(m, math.nan):>16.4f}" for m in METRICS))


if __name__ == "__main__":
    main()
