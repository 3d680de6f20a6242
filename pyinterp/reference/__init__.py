"""Plain-torch references: the specification of every op, differentiable through torch's autograd.
They are also the `torch` backend. They favour clarity over memory (the encoder materialises N x M)."""
