"""BERT-family facts (BERT, RoBERTa, XLM-RoBERTa, CamemBERT): the FFN is ``intermediate.dense`` + ``output.dense``.
No decode weight view: encoders are not decoded."""

FFN_LINEARS = ("intermediate.dense", "output.dense")  # the FFN's linear layers under its layer, as Wanda prunes them
