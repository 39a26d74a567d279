"""OPT facts: the FFN is ``fc1`` / ``fc2`` inline in the decoder layer. No decode weight view (the PyTorch path
decodes it)."""

FFN_LINEARS = ("fc1", "fc2")  # the FFN's linear layers under its layer, as Wanda prunes them
