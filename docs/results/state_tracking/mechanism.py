"""Train the probe's gru_none_L1 on parity (seed 0) and read how its cell does it (about 1 min).

Run from the repository root: NEWTONLM_NO_CEXT=1 .venv/bin/python docs/results/state_tracking/mechanism.py
"""
import torch
from omegaconf import OmegaConf

from newtonlm.eval.synthetic import evaluate, train_model
from newtonlm.eval.synthetic.probe import ProbeConfig, variant_size

torch.set_num_threads(1)
raw = OmegaConf.to_container(OmegaConf.load("configs/eval/state_tracking.yaml"))
fields = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ProbeConfig), fields))
v = [v for v in cfg.variants if v.name == "gru_none_L1"][0]
model, info = train_model("parity", cfg.task, v.arch, variant_size(cfg.model, v), cfg.train, 0)
seq_acc = evaluate(model, "parity", cfg.task, 256, 256, 0)["seq_acc"]
print("loss", info["final_loss"], "seq_acc at 256:", seq_acc)
mix = model.model.layers[0].mixer
A = mix.cell.recurrent_weights()[0].detach()
Ah = A[2]
print(f"A_h: min {Ah.min():.2f} max {Ah.max():.2f}; channels with A_h < -1: {(Ah < -1).sum().item()}, "
      f"> 1: {(Ah > 1).sum().item()} of {Ah.numel()}; |A_z| max {A[0].abs().max():.2f}, "
      f"|A_r| max {A[1].abs().max():.2f}")
cap = {}
mix.cell.register_forward_hook(lambda m, i, o: cap.__setitem__("x", i[0].detach()))
with torch.no_grad():
    x = torch.tensor([[0] * 8, [1] * 8])  # steady drive: input 0 repeated, input 1 repeated
    model(input_ids=x, use_cache=False)
    u = mix.cell.input_drive(cap["x"])[:, -1]  # [2, 3, N] at the last position
z, r = torch.sigmoid(u[:, 0]), torch.sigmoid(u[:, 1])
for n in torch.argsort(Ah)[:4].tolist():
    print(f"channel {n}: A_h {Ah[n]:.2f} A_z {A[0, n]:.2f} A_r {A[1, n]:.2f}"
          f" | input 0: σ(u_z) {z[0, n]:.2e} σ(u_r) {r[0, n]:.2f} u_h {u[0, 2, n]:.2f}"
          f" | input 1: σ(u_z) {z[1, n]:.2e} σ(u_r) {r[1, n]:.2f} u_h {u[1, 2, n]:.2f}")
