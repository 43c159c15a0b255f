"""The dependency floors of pyproject.toml are true: the installed environment satisfies every
declared requirement (the floors and the environment cannot drift apart), and no floor lies below
the oldest release that has the APIs newtonlm uses (``NEEDED``, with the evidence)."""

import importlib.metadata as md
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli (a dependency of pytest there)
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# The oldest release with everything newtonlm calls, found in the released wheels and sdists (for
# transformers, deepspeed and tokenizers the release before it lacks the API; hydra-core and datasets
# were run at that version); update an entry when the code starts using a newer API.
NEEDED = {
    "transformers": ("5.24.0", "model outputs and generation take `cache=` (renamed from "
                     "`past_key_values` in 5.24.0); DynamicCache.get_conv_state / update_conv_state and "
                     "modeling_utils.slice_logits_to_keep (5.21.0); 'linear_attention' cache layers "
                     "(5.5.0); PreTrainedConfig as a dataclass (5.4.0); transformers.initialization (5.0.0)"),
    "torch": ("2.6", "transformers >= 5.24 disables PyTorch below 2.6 (utils.import_utils."
              "is_torch_available); newtonlm itself needs F.rms_norm (2.4)"),
    "deepspeed": ("0.17.2", "the `torch_autocast` config section (train.precision=bf16); 0.17.1 ignores it "
                  "without a word and trains in fp32"),
    "tokenizers": ("0.20.0", "Tokenizer.encode_batch_fast (data/tokenizer.py)"),
    "hydra-core": ("1.3.0", "version_base='1.3' (checked with omegaconf 2.2.3)"),
    "datasets": ("3.0.0", "load_dataset(builder, data_files=..., streaming=True) (data/readers.py)"),
}


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate()


def declared() -> dict[str, Requirement]:
    """The core dependencies that apply on this platform, by name."""
    reqs = [Requirement(r) for r in _project()["dependencies"]]
    return {r.name: r for r in reqs if _applies(r)}


def floor(req: Requirement) -> Version | None:
    """The lower bound of the requirement (from >=, >, == or ~=); None without one."""
    return max((Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=")),
               default=None)


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


@pytest.mark.parametrize("name", sorted(declared()))
def test_installed_version_satisfies_the_declared_requirement(name):
    req = declared()[name]
    version = installed(name)
    assert version is not None, f"{name} is a dependency in pyproject.toml ({req}) but is not installed"
    assert req.specifier.contains(version, prereleases=True), (
        f"installed {name}=={version} does not satisfy pyproject.toml's {req}")


def test_installed_extras_satisfy_their_requirements():
    """Optional dependencies (eval, dev) where installed: the same check (a missing one is fine)."""
    bad = []
    for extra, reqs in _project().get("optional-dependencies", {}).items():
        for req in map(Requirement, reqs):
            version = installed(req.name)
            if req.name == "newtonlm" or not _applies(req) or version is None:
                continue
            if not req.specifier.contains(version, prereleases=True):
                bad.append(f"[{extra}] {req} but {req.name}=={version} is installed")
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_declared_floor_has_the_apis_newtonlm_uses(name):
    needed, why = NEEDED[name]
    reqs = declared()
    assert name in reqs, f"newtonlm uses {name} ({why}); declare it in pyproject.toml's dependencies"
    low = floor(reqs[name])
    assert low is not None and low >= Version(needed), (
        f"pyproject.toml declares {reqs[name]}, but newtonlm needs {name}>={needed}: {why}")


def test_floor_of_a_requirement():
    assert floor(Requirement("x>=1.2,<2")) == Version("1.2")
    assert floor(Requirement("x==0.4.13")) == Version("0.4.13")
    assert floor(Requirement("x~=2.2")) == Version("2.2")
    assert floor(Requirement("x<3")) is None
