"""Experiments around the library: ``srlora compare`` (LoRA vs PiSSA vs SRLoRA on real data).

Kept apart from the algorithm: ``assets`` finds/installs the offline models and data, ``tasks``
loads and splits datasets, ``runner`` trains one run, ``compare`` runs the grid and writes
results.json, ``report`` and ``plots`` turn results into a table and PNGs.
"""
