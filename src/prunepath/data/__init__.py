"""Data resolution: text corpora, GLUE-style TSVs, instruction / summarisation JSON(L)."""
