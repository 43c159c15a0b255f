"""newtonlm.eval: see README (filled by later work)."""
