"""newtonlm.training: see README (filled by later work)."""
