"""torch.library registration of every op: Triton custom ops, fake functions, public ops with autograd."""
