"""Dataset adapters shipped with fdsbench (installed as ``fdsbench.datasets``)."""
