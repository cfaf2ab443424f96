"""Method plugins shipped with fdsbench (installed as ``fdsbench.methods``)."""
