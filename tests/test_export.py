"""Export (``newtonlm.export``): training checkpoints -> Hugging Face folders that load where newtonlm is
absent.

Fast unit tests first: the run-directory reader against the trainer's ``Checkpoints``, the bundle's
list of files against the imports of the kernel and model files, its string encoding and its loader.
Then one tiny training run per architecture (module-scoped, ~30-60 s), each at another ZeRO stage:
ParaGRU stage 0 (checkpoints at steps 1 and 2), ParaLSTM stage 2, Mamba2 stage 1, Llama stage 3
sharded over 2 ranks. The exported folders are loaded in one fresh ``python -I`` subprocess (cwd
outside the repo, ``HF_HUB_OFFLINE=1``, newtonlm and triton blocked on the meta path) and compared
with independent references: the training model rebuilt from the raw DeepSpeed files, and the
validation loss the trainer itself logged for the exported weights.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import start_process, start_trainer, wait_process
from safetensors.torch import load_file
from test_export_verify import make_run, run_tokenizer

from newtonlm import export as ex
from newtonlm.export import bundle, bundle_loader, source

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model.hidden_size=32", "model.num_hidden_layers=2", "train.max_steps=2", "train.seq_len=32",
          "train.micro_batch_size=2", "train.sample_tokens=0", "train.progress=false", "data.val_sequences=2",
          "data.num_workers=1", "data.tokenizer.vocab_size=512", "wandb=disabled"]
RUNS = {  # arch: (overrides, processes)
    "paragru": (["model=paragru_demo", "model.intermediate_size=64", "model.num_heads=2",
                 "train.save_every=1"], 1),
    "paralstm": (["model=paralstm_demo", "model.intermediate_size=64", "model.num_heads=2",
                  "train.zero_stage=2"], 1),
    "llama": (["model=llama_demo", "model.intermediate_size=64", "model.num_attention_heads=2",
               "model.num_key_value_heads=2", "train.zero_stage=3"], 2),
    "mamba2": (["model=mamba2_demo", "model.head_dim=16", "model.state_size=16", "model.chunk_size=16",
                "train.zero_stage=1"], 1),
}
ARCHS = tuple(RUNS)
REMOTE = ("paragru", "paralstm")
# fp32 logits of the exported model vs the training model (same ops on the same CPU: measured
# max |diff| 0 for all four; the tolerance only allows for other BLAS/thread layouts)
ATOL, RTOL = 1e-5, 1e-5
BF16_ATOL = 0.15  # bf16 weights and activations vs fp32, logits of magnitude ~1 (measured 0.0034, 0.0038)
TOKEN = "hf_exportTestSentinelToken0123456789"
GEN_TOKENS = 8
BF16 = ("paragru", "llama")

# ---------------------------------------------------------------- the run-directory format (fast)


class FakeEngine:
    """Writes a checkpoint as DeepSpeed does at ZeRO stage 0, one rank: the module's state dict and
    the client state in ``mp_rank_00_model_states.pt``."""

    def __init__(self, model):
        self.model = model

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # the trainer writes `latest` itself, after the COMPLETE marker
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"module": self.model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}},
                    "dp_world_size": 1, **client_state}, folder / "mp_rank_00_model_states.pt")


def test_the_run_directory_reader_reads_what_the_trainers_checkpoints_write(tmp_path):
    """The contract between newtonlm.training and newtonlm.export: checkpoint folder names, the
    COMPLETE marker, which checkpoint is the newest complete one, the client state."""
    from newtonlm.training import checkpoint

    assert source.MARKER == checkpoint.MARKER
    for step in (0, 1, 7, 300, 12_345_678):
        assert source.tag_for(step) == checkpoint.tag_for(step)
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    model = torch.nn.Linear(3, 2)
    ckpts = checkpoint.Checkpoints(run / "checkpoints", keep_last=2, is_main=True)
    config = {"model": {"arch": "paragru"}, "train": {"zero_stage": 0, "seq_len": 16}}
    weights = {}
    for step in (100, 200, 300, 400):
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.detach().clone()
        client = {"step": step, "tokens_seen": 64 * step, "skipped_total": 0, "consecutive_skips": 0,
                  "world_size": 1, "config": config, "data": [{}], "rng": [{}]}  # the keys train.py saves
        if step == 400:  # a save that crashed before the marker: DeepSpeed's files, no COMPLETE
            FakeEngine(model).save_checkpoint(ckpts.root, checkpoint.tag_for(step), client, False)
        else:
            ckpts.save(FakeEngine(model), step, client)
    (run / "checkpoints" / "step_12").mkdir()  # not a checkpoint folder name
    assert source.is_run_dir(run) and not source.is_run_dir(run / "checkpoints")
    assert [t for _, t in source.checkpoint_tags(ckpts.root)] == ckpts.all_tags() == [
        "step_00000200", "step_00000300", "step_00000400"]  # keep_last=2 pruned step 100
    assert source.complete_checkpoints(ckpts.root) == ckpts.complete() == [(200, "step_00000200"),
                                                                            (300, "step_00000300")]
    got = source.read_checkpoint(run)
    assert (got.tag, got.step, got.tokens_seen, got.zero_stage, got.world_size) == (
        ckpts.latest_complete(), 300, 19_200, 0, 1)
    assert got.config == config and torch.equal(got.state_dict["weight"], weights[300])
    assert (run / "checkpoints" / "latest").read_text() == got.tag  # DeepSpeed's pointer agrees
    assert torch.equal(source.read_checkpoint(run, step=200).state_dict["weight"], weights[200])
    with pytest.raises(source.ExportError, match="step_00000400 is partial"):
        source.read_checkpoint(run, step=400)
    with pytest.raises(source.ExportError, match=r"tokenizer.*holds no saved tokenizer"):
        source.read_tokenizer(run)


def test_the_exports_verifier_accepts_what_the_trainers_checkpoints_write(tmp_path):
    """The manifest (the COMPLETE marker, format 2) that the trainer's Checkpoints writes passes the
    export's own verifier; a truncated file, a changed byte and a missing file are named by it."""
    from newtonlm.training import checkpoint

    if not hasattr(checkpoint, "FORMAT"):
        pytest.skip("newtonlm/training/checkpoint.py does not write manifests yet")
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    ckpts = checkpoint.Checkpoints(run / "checkpoints", keep_last=3, is_main=True)
    config = {"model": {"arch": "paragru"}, "train": {"zero_stage": 0, "seq_len": 16}}
    for step in (1, 2):
        client = {"step": step, "tokens_seen": 64 * step, "world_size": 1, "config": config,
                  "tokenizer_fingerprint": "0123456789abcdef", "data": [{}], "rng": [{}]}
        ckpts.save(FakeEngine(torch.nn.Linear(3, 2)), step, client)
    folder = run / "checkpoints" / "step_00000002"
    file = folder / "mp_rank_00_model_states.pt"
    manifest = source.read_manifest(folder)
    assert manifest["format"] == source.MANIFEST_FORMAT and set(manifest["files"]) == {file.name}
    assert manifest["files"][file.name]["size"] == file.stat().st_size
    source.verify_files(folder, manifest)
    got = source.read_checkpoint(run)
    assert (got.step, got.tokenizer_fingerprint, got.notes) == (2, "0123456789abcdef", [])
    data = file.read_bytes()
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, same size: the CRC-32 sees it
    with pytest.raises(source.ExportError, match=f"{file} has crc32 [0-9a-f]{{8}}, the manifest records"):
        source.verify_files(folder, manifest)
    file.write_bytes(data[:100])
    with pytest.raises(source.ExportError, match=f"{file} has 100 bytes, the manifest records {len(data):,}"):
        source.read_checkpoint(run)
    assert ckpts.verify("step_00000002") is not None  # the trainer's own verifier agrees
    file.unlink()
    with pytest.raises(source.ExportError, match=f"{file} is missing"):
        source.verify_files(folder, manifest)


# the parts of newtonlm and the parts each may import (besides itself and newtonlm's top-level modules)
LAYERS = {"kernels": set(), "data": set(), "models": {"kernels"}, "training": {"kernels", "models", "data"},
          "export": {"kernels", "models", "data"}, "eval": {"export", "kernels", "models", "data"}}


def test_imports_follow_the_layering():
    """kernels <- models <- training, data <- training; export reads run directories on its own (never
    the trainer) and uses models, kernels and data; eval uses export, models and data."""
    import ast

    for part, allowed in LAYERS.items():
        for file in sorted((REPO / "newtonlm" / part).rglob("*.py")):
            package = ".".join(file.relative_to(REPO).parent.parts)
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                    module = ".".join(p for p in (base, node.module) if p)
                    modules = [module] + [f"{module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                else:
                    continue
                parts = {m.split(".")[1] for m in modules if m.startswith("newtonlm.")}
                bad = sorted((parts & set(LAYERS)) - allowed - {part})
                assert not bad, f"{file.relative_to(REPO)} line {node.lineno} imports newtonlm.{bad[0]}"


@pytest.mark.slow
def test_the_command_is_python_m_newtonlm_export():
    out = subprocess.run([sys.executable, "-m", "newtonlm.export", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m newtonlm.export"), out.stderr


# ---------------------------------------------------------------- the bundle (fast)


def test_the_bundle_list_covers_every_import_of_the_bundled_files():
    bundle.check_sources()  # raises BundleError naming file, line and import otherwise


def _source_copy(tmp_path: Path) -> tuple[Path, Path]:
    kernels, models = tmp_path / "kernels", tmp_path / "models"
    shutil.copytree(REPO / "newtonlm" / "kernels", kernels)
    models.mkdir()
    for name in bundle.MODEL_FILES:
        shutil.copy(REPO / "newtonlm" / "models" / name, models / name)
    return kernels, models


def test_an_import_the_bundle_does_not_cover_is_a_clear_error(tmp_path):
    kernels, models = _source_copy(tmp_path)
    with open(kernels / "function.py", "a") as fh:  # new imports at the end of two bundled files
        fh.write("\n\ndef _later():\n    from . import minimal  # noqa\n    import einops  # noqa\n")
    with open(models / "modeling_pararnn.py", "a") as fh:
        fh.write("\nfrom newtonlm.models.flops import flops_per_token  # noqa\n"
                 "from .flops import x  # noqa\n")
    with open(kernels / "scan.py", "a") as fh:
        fh.write("\nfrom newtonlm.kernels.cells import DIAG as _D  # noqa\n")
    (kernels / "reference.py").unlink()
    with pytest.raises(bundle.BundleError) as err:
        bundle.check_sources(kernels, models)
    message = str(err.value)
    lines = len((kernels / "function.py").read_text().splitlines())
    for expected in (
        f"newtonlm/kernels/function.py line {lines - 1} imports newtonlm.kernels.minimal, which is not in "
        "the bundle: add 'minimal.py' to newtonlm.export.bundle.KERNEL_FILES",
        f"newtonlm/kernels/function.py line {lines} imports einops, which a user of an exported model may "
        "not have",
        "newtonlm/kernels/reference.py is listed in newtonlm.export.bundle.KERNEL_FILES but does not exist",
        "newtonlm/kernels/scan.py line", "imports newtonlm.kernels.cells by its absolute name",
        "newtonlm/models/modeling_pararnn.py line", "imports newtonlm.models.flops; the modeling files may "
        "import from newtonlm only 'from newtonlm.kernels import ...'",
        "imports '.flops', which an exported model does not ship",
    ):
        assert expected in message, message


def test_text_literal_round_trips_and_hides_relative_imports_from_the_hub_loader(tmp_path):
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    texts = ["from .cells import X\n  from . import cpu_ext\n\timport .x\nfromage = 1\n",
             "a\\nb \\x66 '''q''''", "ends with a quote'", "two''",
             "\r\n\x00\x0c\x1b tab\t é ✓", "from\n.cells import X", ""]
    files = {}
    for i, text in enumerate(texts):
        literal = bundle.text_literal(text)
        assert ast_literal(literal) == text
        files[f"t{i}"] = literal
    module = tmp_path / "m.py"
    module.write_text("".join(f"{k} = {v}\n" for k, v in files.items()) + "from .real import y\n")
    assert get_relative_imports(module) == ["real"] and get_imports(module) == []


def ast_literal(literal: str):
    import ast

    return ast.literal_eval(literal)


def test_the_bundle_loader_runs_the_kernel_files_unchanged(tmp_path, monkeypatch):
    """newtonlm_kernels.py as written into an exported folder, imported here twice (as transformers
    imports it once per modeling file): one package, its files byte-identical to newtonlm/kernels, and
    its layers compute what newtonlm.kernels computes."""
    import importlib.util

    import newtonlm.kernels as nk

    monkeypatch.setenv("NEWTONLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "newtonlm_kernels.py").write_text(bundle.kernel_module_source(REPO / "newtonlm" / "kernels"))
    modules = []
    try:
        for name in ("bundle_copy_a", "bundle_copy_b"):
            spec = importlib.util.spec_from_file_location(name, tmp_path / "newtonlm_kernels.py")
            modules.append(importlib.util.module_from_spec(spec))
            spec.loader.exec_module(modules[-1])
        a, b = modules
        package = sys.modules[bundle_loader.package_name(a.FILES)]
        assert a._package is b._package is package and a.ParaGRU is b.ParaGRU
        folder = Path(package.__file__).parent
        assert folder == tmp_path / "cache" / "bundles" / package.__name__
        assert set(a.FILES) == set(bundle.KERNEL_FILES)
        for rel in bundle.KERNEL_FILES:
            assert (folder / rel).read_bytes() == (REPO / "newtonlm" / "kernels" / rel).read_bytes(), rel
        assert set(a.__all__) == set(nk.__all__) and a.ParaGRU is not nk.ParaGRU
        x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(0))
        for cls in ("ParaGRU", "ParaLSTM"):
            ours, theirs = (getattr(m, cls)(input_dim=16, state_dim=16, num_heads=2, init="lm")
                            for m in (nk, a))
            theirs.load_state_dict(ours.state_dict())
            for mode in ("sequential", "parallel"):
                outputs = []
                for layer in (ours, theirs):
                    layer.mode, xg = mode, x.clone().requires_grad_()
                    h = layer(xg)
                    h.square().sum().backward()
                    outputs.append((h.detach(), xg.grad))
                assert all(torch.equal(o, t) for o, t in zip(*outputs)), (cls, mode)
        # a damaged cached copy is replaced
        (folder / "cells.py").write_text("raise SystemExit('tampered')\n")
        assert bundle_loader.extract(a.FILES, package.__name__) == folder
        assert (folder / "cells.py").read_bytes() == (REPO / "newtonlm" / "kernels" / "cells.py").read_bytes()
    finally:
        for key in [k for k in sys.modules if k.startswith(bundle_loader.PREFIX)]:
            del sys.modules[key]


CHECK_SCRIPT = r'''
"""Load exported folders as a user without newtonlm would; save logits, generations, facts.

Phase 1 ("items"): newtonlm and triton blocked. Phase 2 ("interpreted"): triton allowed, under the
Triton interpreter (the GPU code path of the bundle, run on CPU)."""
import importlib.abc, json, os, sys
job = json.load(open(sys.argv[1]))
blocked = set(job["blocked"])


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import check_imports

torch.set_num_threads(1)


def check(item):
    kwargs = {k: (getattr(torch, v[6:]) if str(v).startswith("torch.") else v)
              for k, v in item["kwargs"].items()}
    tokenizer = AutoTokenizer.from_pretrained(item["dir"])
    model = AutoModelForCausalLM.from_pretrained(item["dir"], trust_remote_code=True, **kwargs)
    inputs = torch.load(item["inputs"])
    logits = generated = error = None
    try:
        with torch.no_grad():
            logits = model(inputs["input_ids"][: item.get("rows")]).logits.float()
            generated = model.generate(inputs["prompt"], do_sample=False, max_new_tokens=inputs["gen_tokens"],
                                       min_new_tokens=inputs["gen_tokens"])
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    torch.save({"logits": logits, "generated": generated, "error": error, "dtype": str(model.dtype),
                "module": type(model).__module__, "encoded": tokenizer(inputs["text"]).input_ids,
                "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
                "checked_imports": sorted(p.name for p in Path(item["dir"]).glob("*.py")
                                          if check_imports(p) is not None)},
               item["out"])


def repo_modules():
    files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
    return sorted(f for f in files if f.startswith(job["repo_pkg"]))


def bundled(module):
    """The kernel bundle's copies of ``module`` (package newtonlm_kernels_<hash>) that were imported."""
    return [m for n, m in sys.modules.items()
            if n.startswith("newtonlm_kernels_") and n.endswith("." + module)]


def fused_loaded():
    return bool(bundled("triton_fused"))


for item in job["items"]:
    check(item)
summary = {"blocked_loaded": sorted(n for n in sys.modules if n.split(".")[0] in blocked),
           "repo_modules": repo_modules(),
           "repo_on_path": [p for p in sys.path if p in (job["repo"], "")],
           "cpu_ext": sorted({m.status() for m in bundled("cpu_ext")}),
           "bundle_files": sorted({m.__file__ for m in bundled("cpu_ext")}),
           "triton_fused_loaded": fused_loaded()}
blocked.discard("triton")
os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are defined, i.e. imported
for item in job["interpreted"]:
    check(item)
summary["interpreted_triton_fused_loaded"] = fused_loaded()
summary["interpreted_repo_modules"] = repo_modules()
json.dump(summary, open(job["summary"], "w"))
'''


def _start_training(run_dir, tok_cache, overrides, nproc) -> subprocess.Popen:
    args = [*COMMON, *overrides, f"hydra.run.dir={run_dir}", f"data.tokenizer.cache_dir={tok_cache}"]
    return start_trainer(args, nproc)



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The first run trains and caches the tokenizer; the other three then run side by side."""
    root, tok_cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("tokenizers")
    first, *rest = RUNS
    wait_process(_start_training(root / first, tok_cache, *RUNS[first]), timeout=600)
    procs = [_start_training(root / arch, tok_cache, *RUNS[arch]) for arch in rest]
    for proc in procs:
        wait_process(proc, timeout=600)
    return {arch: root / arch for arch in RUNS}


def _export(*args) -> int:
    return ex.main([str(a) for a in args])


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    for arch in ARCHS:
        assert _export("--checkpoint", runs[arch], "--out", out / arch) == 0
    for arch in BF16:
        assert _export("--checkpoint", runs[arch], "--out", out / f"{arch}-bf16", "--dtype", "bf16") == 0
    return {**{arch: out / arch for arch in ARCHS}, **{f"{arch}-bf16": out / f"{arch}-bf16" for arch in BF16}}


# ---------------------------------------------------------------- independent references


def _run_facts(run_dir: Path) -> dict:
    """Config, tokenizer and the trainer's final validation record, read without the exporter."""
    from omegaconf import OmegaConf

    from newtonlm import data as nd

    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    tokenizer = nd.load_tokenizer(str(run_dir / "tokenizer"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val" and r.get("final")][-1]
    return {"config": config, "tokenizer": tokenizer, "vocab": nd.vocab_size_for_model(tokenizer), "val": val}


def _val_batches(run_dir: Path, facts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's validation batches as the trainer evaluated them: (input_ids, targets) [R*B, T]."""
    from newtonlm import data as nd

    cfg, t = facts["config"], facts["config"]["train"]
    world = RUNS[cfg["model"]["arch"]][1]
    batches = []
    for rank in range(world):
        _, val = nd.build_dataloaders(nd.load_data_config(cfg["data"]), facts["tokenizer"], t["seq_len"],
                                      t["micro_batch_size"], rank, world, t["seed"],
                                      model_vocab_size=facts["vocab"])
        batches += list(val)
    return torch.cat([b["input_ids"] for b in batches]), torch.cat([b["targets"] for b in batches])


def _training_model(run_dir: Path, facts: dict, tag: str = "step_00000002"):
    """The model as trained, from DeepSpeed's files: the full module states (ZeRO 0-2) or, for ZeRO-3
    (whose module states are empty placeholders), DeepSpeed's documented loader."""
    from newtonlm import models as nm

    model = nm.build_model(facts["config"]["model"], facts["vocab"]).eval()
    ckpt = run_dir / "checkpoints" / tag
    if (ckpt / "mp_rank_00_model_states.pt").is_file():
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["module"])
    else:
        from deepspeed.utils.zero_to_fp32 import load_state_dict_from_zero_checkpoint

        model = load_state_dict_from_zero_checkpoint(model, str(run_dir / "checkpoints"), tag=tag)
    return model


@pytest.fixture(scope="module")
def references(runs, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the isolated process: the same reduction order
    work = tmp_path_factory.mktemp("refs")
    refs = {}
    for arch in ARCHS:
        facts = _run_facts(runs[arch])
        ids, targets = _val_batches(runs[arch], facts)
        model = _training_model(runs[arch], facts)
        prompt = ids[:1, :6]
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(prompt, do_sample=False, max_new_tokens=GEN_TOKENS,
                                       min_new_tokens=GEN_TOKENS)
        text = "ROMEO: What light through yonder window breaks?"
        inputs = {"input_ids": ids, "prompt": prompt, "text": text, "gen_tokens": GEN_TOKENS}
        torch.save(inputs, work / f"{arch}.pt")
        refs[arch] = SimpleNamespace(facts=facts, model=model, targets=targets, logits=logits,
                                     inputs=work / f"{arch}.pt", generated=generated,
                                     encoded=facts["tokenizer"](text).input_ids)
    torch.set_num_threads(threads)
    return refs


def _isolated(tmp: Path, items: list[dict], interpreted: list[dict]) -> dict:
    """Run CHECK_SCRIPT in ``python -I`` outside the repo, offline, newtonlm (and, for ``items``,
    triton) hidden; a fresh HF_HOME and newtonlm cache (the bundled C source is compiled there)."""
    tmp.mkdir()
    (tmp / "check.py").write_text(CHECK_SCRIPT)
    job = {"items": items, "interpreted": interpreted, "blocked": ["newtonlm", "triton"], "repo": str(REPO),
           "repo_pkg": str(REPO / "newtonlm"), "summary": str(tmp / "summary.json")}
    (tmp / "job.json").write_text(json.dumps(job))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp / "home"), "HF_HOME": str(tmp / "hf"),
           "HF_HUB_OFFLINE": "1", "NEWTONLM_CACHE": str(tmp / "newtonlm-cache"), "OMP_NUM_THREADS": "1"}
    check = [sys.executable, "-I", str(tmp / "check.py"), str(tmp / "job.json")]
    wait_process(start_process(check, env, tmp), timeout=300)
    summary = json.loads((tmp / "summary.json").read_text())
    summary["results"] = {it["name"]: torch.load(it["out"]) for it in items + interpreted}
    return summary


@pytest.fixture(scope="module")
def loaded(exported, references, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolated")
    items = [{"name": arch, "dir": str(exported[arch]), "inputs": str(references[arch].inputs),
              "out": str(tmp / f"{arch}.out.pt"), "kwargs": {}} for arch in ARCHS]
    bf16 = [(arch, f"{arch}-bf16", {}) for arch in BF16]  # (reference, name, from_pretrained kwargs)
    bf16.append(("paragru", "paragru-bf16-as-fp32", {"dtype": "torch.float32"}))
    items += [{"name": name, "dir": str(exported[f"{arch}-bf16"]), "out": str(tmp / f"{name}.out.pt"),
               "inputs": str(references[arch].inputs), "kwargs": kwargs} for arch, name, kwargs in bf16]
    # one row only: the interpreter runs the kernel's programs one after the other
    fused = [{"name": "fused", "dir": str(exported["paragru"]), "inputs": str(references["paragru"].inputs),
              "out": str(tmp / "fused.out.pt"), "kwargs": {"cell_mode": "fused"}, "rows": 1}]
    return _isolated(tmp / "run", items, fused)


# ---------------------------------------------------------------- the exported folders


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_folder_holds_config_weights_tokenizer_card(arch, exported, references, runs):
    folder, facts = exported[arch], references[arch].facts
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == arch and config["vocab_size"] == facts["vocab"] == 512
    assert config["tie_word_embeddings"] is True
    tok = facts["tokenizer"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 2)
    if arch in REMOTE:
        cls = {"paragru": "ParaGRU", "paralstm": "ParaLSTM"}[arch]
        assert config["auto_map"] == {"AutoConfig": f"configuration_pararnn.{cls}Config",
                                      "AutoModelForCausalLM": f"modeling_pararnn.{cls}ForCausalLM"}
        assert {n for n in names if n.endswith(".py")} == {"modeling_pararnn.py", "configuration_pararnn.py",
                                                           "newtonlm_kernels.py"}
    else:
        assert "auto_map" not in config and not any(n.endswith(".py") for n in names)
    weights = load_file(folder / "model.safetensors")
    expected = references[arch].model.state_dict()
    out_name = "lm_head.weight"
    assert out_name not in weights and out_name in expected  # tied: stored once
    assert set(weights) == set(expected) - {out_name}
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
    card = (folder / "README.md").read_text()
    val = facts["val"]
    assert f"loss **{val['val_loss']:.4f}**" in card and f"perplexity **{val['val_ppl']:.2f}**" in card
    tokens = 2 * 32 * 2 * RUNS[arch][1]  # steps x micro-batch x seq_len x ranks
    assert f"| tokens seen | {tokens:,} |" in card
    stage = facts["config"]["train"]["zero_stage"]
    assert f"ZeRO stage {stage}, {RUNS[arch][1]} process(es)" in card
    n_params = sum(p.numel() for p in references[arch].model.parameters())
    assert f"{n_params:,} parameters" in card and str(runs[arch]) not in card


@pytest.mark.slow
def test_every_module_of_the_bundle_is_reachable_by_the_loader(exported):
    """transformers copies only files reached through 'from .x import' lines, recursively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    for arch in REMOTE:
        folder = exported[arch]
        reached = {Path(f).name for f in get_relative_import_files(str(folder / "modeling_pararnn.py"))}
        assert reached | {"modeling_pararnn.py"} == {p.name for p in folder.glob("*.py")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_loads_without_newtonlm_and_logits_match_training(arch, loaded, references):
    ref, got = references[arch], loaded["results"][arch]
    diff = (got["logits"] - ref.logits).abs().max().item()
    print(f"{arch}: max |logits diff| = {diff:.3g}")
    assert torch.allclose(got["logits"], ref.logits, atol=ATOL, rtol=RTOL), diff
    # the trainer's own validation loss, logged at the exported step, from the exported model's logits
    logits = got["logits"]
    loss = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), ref.targets.reshape(-1),
                           ignore_index=-100)
    assert loss.item() == pytest.approx(ref.facts["val"]["val_loss"], rel=1e-5)
    assert got["error"] is None and got["tied"] and got["encoded"] == ref.encoded
    assert got["dtype"] == "torch.float32"
    assert got["module"].startswith("transformers_modules.") == (arch in REMOTE)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_produces_the_training_models_tokens(arch, loaded, references):
    got, ref = loaded["results"][arch]["generated"], references[arch].generated
    assert got.shape == (1, 6 + GEN_TOKENS)
    assert torch.equal(got, ref)


@pytest.mark.slow
def test_isolated_process_used_no_newtonlm_and_no_triton(loaded):
    assert loaded["blocked_loaded"] == [] and loaded["repo_modules"] == [] and loaded["repo_on_path"] == []
    assert loaded["cpu_ext"] == ["loaded"]  # the bundled C source compiled in a fresh cache
    assert not loaded["triton_fused_loaded"]
    # one kernel package for every folder and both copies of newtonlm_kernels.py, from the fresh cache
    files = loaded["bundle_files"]
    assert len(files) == 1 and "/newtonlm-cache/bundles/newtonlm_kernels_" in files[0], files
    for arch in REMOTE:  # the Hub loader's dependency check passes for every file without triton
        assert loaded["results"][arch]["checked_imports"] == [
            "configuration_pararnn.py", "modeling_pararnn.py", "newtonlm_kernels.py"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", BF16)
def test_bf16_export_loads(arch, exported, loaded, references):
    folder = exported[f"{arch}-bf16"]
    weights = load_file(folder / "model.safetensors")
    expected = references[arch].model.state_dict()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name].bfloat16()), name
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    got = loaded["results"][f"{arch}-bf16"]
    assert got["dtype"] == "torch.bfloat16" and got["tied"]
    assert got["error"] is None and got["generated"].shape == (1, 6 + GEN_TOKENS)
    diff = (got["logits"] - references[arch].logits).abs().max().item()
    print(f"{arch} bf16: max |logits diff| vs fp32 = {diff:.3g}")
    assert diff < BF16_ATOL


@pytest.mark.slow
def test_bf16_export_loaded_as_fp32_is_the_rounded_training_model(loaded, references):
    model = references["paragru"].model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict({k: v.bfloat16().float() for k, v in saved.items()})
        with torch.no_grad():
            want = model(torch.load(references["paragru"].inputs)["input_ids"]).logits
    finally:
        model.load_state_dict(saved)
    got = loaded["results"]["paragru-bf16-as-fp32"]
    assert got["dtype"] == "torch.float32" and got["error"] is None
    assert torch.allclose(got["logits"], want, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_bundled_triton_kernels_run_under_the_interpreter(loaded, references):
    """The GPU path of the bundle (fused Newton kernels from the copied Triton modules), run by the
    Triton interpreter on CPU: the training model's logits and greedy tokens."""
    assert loaded["interpreted_triton_fused_loaded"] and loaded["interpreted_repo_modules"] == []
    got, ref = loaded["results"]["fused"], references["paragru"]
    assert got["error"] is None, got["error"]
    diff = (got["logits"] - ref.logits[:1]).abs().max().item()
    print(f"paragru fused (Triton interpreter): max |logits diff| = {diff:.3g}")
    assert torch.allclose(got["logits"], ref.logits[:1], atol=1e-4, rtol=1e-4), diff
    assert torch.equal(got["generated"], ref.generated)


def test_card_shows_eval_json_of_the_exported_checkpoint_only(tmp_path):
    from newtonlm.export.card import evaluation_table

    result = {"source": f"{tmp_path}/private/run (step_00000300)", "eval_len": 512, "tokens": 20480,
              "loss": 1.5, "ppl": 4.4816890703380645, "bits_per_byte": 0.5123, "curve": [{"loss": 1.0}]}
    (tmp_path / "eval.json").write_text(json.dumps({"short": result, "long": {**result, "eval_len": 2048}}))
    table, note = evaluation_table(tmp_path, "step_00000300")
    assert note is None and str(tmp_path) not in table
    assert table.splitlines()[2:] == ["| short | 512 | 20,480 | 1.5 | 4.482 | 0.5123 |",
                                      "| long | 2,048 | 20,480 | 1.5 | 4.482 | 0.5123 |"]
    table, note = evaluation_table(tmp_path, "step_00000400")
    assert table is None and note == ("eval.json holds results of checkpoint step_00000300, not of the "
                                      "exported step_00000400")
    (tmp_path / "eval.json").write_text(json.dumps({"hellaswag": {"acc": 0.25, "n": 100}}))
    table, _ = evaluation_table(tmp_path, "step_00000400")
    assert table.splitlines()[2:] == ["| hellaswag / acc | 0.25 |", "| hellaswag / n | 100 |"]


# ---------------------------------------------------------------- choosing the checkpoint


@pytest.mark.slow
def test_step_choice_and_fallback_to_the_newest_complete(runs, references, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["paragru"], run)
    assert _export("--checkpoint", run / "checkpoints", "--out", tmp_path / "s1", "--step", 1) == 0
    assert "| checkpoint | step 1 (`step_00000001`) |" in (tmp_path / "s1" / "README.md").read_text()
    step1 = _training_model(run, references["paragru"].facts, tag="step_00000001").state_dict()
    weights = load_file(tmp_path / "s1" / "model.safetensors")
    assert all(torch.equal(t, step1[n]) for n, t in weights.items())
    assert not torch.equal(weights["model.norm.weight"],
                           references["paragru"].model.state_dict()["model.norm.weight"])
    # a checkpoint folder as --checkpoint; then an unfinished newest save: the previous one is taken
    assert _export("--checkpoint", run / "checkpoints" / "step_00000002", "--out", tmp_path / "s2") == 0
    assert "| tokens seen | 128 |" in (tmp_path / "s2" / "README.md").read_text()
    (run / "checkpoints" / "step_00000002" / "COMPLETE").unlink()
    assert _export("--checkpoint", run, "--out", tmp_path / "latest") == 0
    assert "| tokens seen | 64 |" in (tmp_path / "latest" / "README.md").read_text()


# ---------------------------------------------------------------- errors


def _fails(capsys, *args) -> str:
    assert _export(*args) == 2
    return capsys.readouterr().err


def _damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "checkpoints" / "step_00000002"


@pytest.mark.slow
def test_missing_partial_and_corrupt_checkpoints_are_clear_errors(runs, tmp_path, capsys):
    """On real DeepSpeed checkpoints (ZeRO 0, 2, 3). With the trainer's manifests the damage is found
    by the verifier before loading (sizes); in runs without them (format-1 markers), by the loader."""
    out = tmp_path / "out"
    err = _fails(capsys, "--checkpoint", tmp_path / "nope", "--out", out)
    assert "does not exist" in err and "run directory" in err
    err = _fails(capsys, "--checkpoint", runs["paragru"], "--out", out, "--step", 7)
    assert "no checkpoint step_00000007" in err and "steps 1, 2" in err
    ck = _damaged_copy(runs["paragru"], tmp_path / "partial")
    (ck / "COMPLETE").unlink()
    err = _fails(capsys, "--checkpoint", ck, "--out", out)
    assert "is partial (no COMPLETE marker" in err and "steps 1" in err
    ck = _damaged_copy(runs["paragru"], tmp_path / "corrupt")
    manifests = source.read_manifest(ck) is not None
    data = (ck / "mp_rank_00_model_states.pt").read_bytes()
    (ck / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])
    err = _fails(capsys, "--checkpoint", tmp_path / "corrupt", "--out", out)
    assert f"{ck / 'mp_rank_00_model_states.pt'}" in err
    assert (f"has {len(data) // 2:,} bytes, the manifest records {len(data):,} (truncated)" if manifests
            else "corrupt or truncated") in err
    assert "the newest intact checkpoint is step_00000001, pass --step 1 to use it" in err or not manifests
    ck = _damaged_copy(runs["llama"], tmp_path / "shard")
    (ck / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    err = _fails(capsys, "--checkpoint", tmp_path / "shard", "--out", out)
    assert (f"{ck / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'} is missing (expected" if manifests else
            "ZeRO stage 3, world size 2) is partial") in err
    ck = _damaged_copy(runs["paralstm"], tmp_path / "shard-corrupt")
    (ck / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    err = _fails(capsys, "--checkpoint", tmp_path / "shard-corrupt", "--out", out)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt has 16 bytes" in err if manifests else \
        "corrupt or truncated" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_export_and_perplexity_commands_print_only_their_own_output(runs, tmp_path):
    """Fresh processes (DeepSpeed's accelerator warning comes once per process, at its import) on a
    ZeRO-2 run (DeepSpeed's zero_to_fp32 consolidates it): no DeepSpeed warning, no zero_to_fp32
    prints or bars, no transformers bars. stdout: the export's one summary line."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = tmp_path / "hf"
    export = [sys.executable, "-m", "newtonlm.export", "--checkpoint", str(runs["paralstm"]),
              "--out", str(out)]
    done = wait_process(start_process(export, env, tmp_path), timeout=600)
    assert done.stdout.startswith("exported paralstm step 2") and done.stdout.count("\n") == 1, done.stdout
    ppl = [sys.executable, "-m", "newtonlm.eval.perplexity", str(runs["paralstm"]), "--max-tokens", "64",
           "--quiet", "--json"]
    scored = wait_process(start_process(ppl, env, tmp_path), timeout=600)
    assert json.loads(scored.stdout)["tokens"] >= 64
    manifests = source.read_manifest(runs["paralstm"] / "checkpoints" / "step_00000002") is not None
    for stderr in (done.stderr, scored.stderr):
        # notes only for runs written before manifests and tokenizer fingerprints
        assert stderr == "" if manifests else all("note: " in line for line in stderr.splitlines()), stderr
        for noise in ("Setting accelerator", "Processing zero checkpoint", "Loading checkpoint shards",
                      "Gathering sharded weights", "Loading weights", "Writing model shards", "it/s"):
            assert noise not in stderr + done.stdout


@pytest.fixture
def fake_run(tmp_path_factory) -> Path:
    """A run directory written by hand in the trainer's layout (tests/test_export_verify.py)."""
    return make_run(tmp_path_factory.mktemp("fake"), run_tokenizer(), steps=(1,))


def test_existing_output_needs_overwrite_and_failures_leave_nothing(fake_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _fails(capsys, "--checkpoint", fake_run, "--out", out)
    assert "exists and is not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    err = _fails(capsys, "--checkpoint", fake_run, "--out", fake_run.parent, "--overwrite")
    assert "would replace the training run" in err
    from newtonlm.export import card

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full while writing the card")

    monkeypatch.setattr(card, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        _export("--checkpoint", fake_run, "--out", tmp_path / "new")
    with pytest.raises(RuntimeError, match="disk full"):
        _export("--checkpoint", fake_run, "--out", out, "--overwrite")
    assert not (tmp_path / "new").exists() and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden temporary folder left
    monkeypatch.undo()
    assert _export("--checkpoint", fake_run, "--out", out, "--overwrite") == 0
    assert "keep.txt" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- publishing


class FakeHub:
    """Records the HfApi calls and "uploads" into a local folder."""

    def __init__(self, root: Path, fail: bool = False):
        self.root, self.fail, self.calls = root, fail, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        if self.fail:
            raise OSError("connection reset")
        shutil.copytree(folder_path, self.root / repo_id / kwargs["revision"])
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")


def test_push_to_hub_uploads_the_folder_and_never_the_token(fake_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(tmp_path / "hub")
    args = ["--checkpoint", fake_run, "--out", tmp_path / "out", "--push-to-hub", "me/tiny-paragru",
            "--private", "--revision", "dev", "--commit-message", "first upload"]
    assert ex.main([str(a) for a in args], hub_api=hub) == 0
    model = {"repo_type": "model"}
    assert hub.calls == [
        ("create_repo", "me/tiny-paragru", {"private": True, "exist_ok": True, **model}),
        ("create_branch", "me/tiny-paragru", {"branch": "dev", "exist_ok": True, **model}),
        ("upload_folder", "me/tiny-paragru", {"revision": "dev", "commit_message": "first upload", **model})]
    uploaded = tmp_path / "hub" / "me" / "tiny-paragru" / "dev"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(p.name for p in (tmp_path / "out").iterdir())
    card = (uploaded / "README.md").read_text()
    assert 'from_pretrained("me/tiny-paragru", trust_remote_code=True)' in card
    printed = capsys.readouterr()
    assert "https://huggingface.co/me/tiny-paragru/commit/abc" in printed.out
    for text in (printed.out, printed.err, *(p.read_bytes().decode("latin-1") for p in uploaded.iterdir())):
        assert TOKEN not in text


def test_push_errors_are_clear(fake_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login there
    args = ["--checkpoint", fake_run, "--out", tmp_path / "out"]
    err = _fails(capsys, *args, "--push-to-hub", "me/tiny")
    assert "no Hugging Face login" in err and not (tmp_path / "out").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    err = _fails(capsys, *args, "--push-to-hub", "not a/valid//id")
    assert "not a valid repo id" in err
    failing = FakeHub(tmp_path, fail=True)
    assert ex.main([str(a) for a in [*args, "--push-to-hub", "me/tiny"]], hub_api=failing) == 2
    err = capsys.readouterr().err
    assert "upload to me/tiny failed: OSError: connection reset" in err and "hf upload me/tiny" in err
    assert (tmp_path / "out" / "model.safetensors").is_file() and TOKEN not in err
    with pytest.raises(SystemExit):
        ex.main([str(a) for a in [*args, "--private"]])
