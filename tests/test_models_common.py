"""The shared interface of the four architectures at the demo size: loss, backward, overfitting a
fixed batch, save/load, generate(), Auto class registration and config errors."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from newtonlm.models import ARCHS, build_model, load_preset

VOCAB = 8192  # any vocabulary; the demo tokenizer gives 8000


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch):
    return build_model(load_preset(f"{arch}_demo"), VOCAB)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_loss_and_backward(arch):
    model = _model(arch).train()
    assert isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)
    assert model.config.vocab_size == VOCAB
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    ids = torch.randint(0, VOCAB, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, VOCAB)
    # next-token cross-entropy, computed here from the logits
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0  # ~uniform at init
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_a_fixed_batch(arch):
    model = _model(arch).train()
    ids = torch.randint(0, VOCAB, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_then_from_pretrained_gives_identical_logits(arch, tmp_path):
    model = _model(arch).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == arch
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        after = loaded(ids, use_cache=False).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate(arch):
    model = _model(arch).eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    seq = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert seq.shape == (2, 9) and torch.equal(seq[:, :5], prompt)
    with torch.no_grad():
        logits = model(seq, use_cache=False).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), seq[:, 5:])  # greedy = argmax of the forward


@pytest.mark.parametrize("arch,field,value,match", [
    ("llama", "num_attention_heads", 5, "not a multiple of the number of attention heads"),
    ("llama", "hidden_size", -128, "hidden_size=-128 for arch 'llama'; expected a positive integer"),
    ("mamba2", "head_dim", 48, "expand \\* hidden_size = 256 is not divisible by head_dim=48"),
    ("mamba2", "num_hidden_layers", -1, "num_hidden_layers=-1"),
    ("paragru", "num_heads", 3, "not divisible by num_heads=3"),
    ("paralstm", "intermediate_size", -5, "intermediate_size=-5"),
    ("paragru", "hiden_size", 64, "unknown field 'hiden_size'.*did you mean \\['hidden_size'\\]"),
    ("llama", "vocab_size", 100, "set by build_model"),
])
def test_bad_config_raises_a_clear_error(arch, field, value, match):
    with pytest.raises(ValueError, match=match):
        build_model({**load_preset(f"{arch}_demo"), field: value}, VOCAB)


def test_unknown_arch_and_bad_vocab_raise():
    with pytest.raises(ValueError, match="arch='rwkv'; expected one of"):
        build_model({"arch": "rwkv"}, VOCAB)
    with pytest.raises(ValueError, match="vocab_size=0"):
        build_model(load_preset("llama_demo"), 0)
