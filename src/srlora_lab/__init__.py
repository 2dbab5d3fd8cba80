"""srlora_lab: the laboratory around the srlora library.

compare and study (``srlora compare``, ``srlora study``), the built-in tasks and models, reports,
plots and the benchmark suite. It imports the library; the library never imports it. Install with
``pip install "srlora[lab]"``.
"""
