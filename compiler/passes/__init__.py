"""Compiler passes: one module each, one pure function ``run(plan: Plan) -> Plan``.

They run in the order of ``PIPELINE``; each records the choices it makes (with a
reason) in ``plan.decisions``, which ``plan.json`` and ``malt plan`` show.
"""

from . import batch_split, choose_attention, choose_parallelism, choose_compile, choose_device, choose_optimizer, choose_precision, estimate, pad_vocab, resolve_shape, run_length

PIPELINE = [
    ("resolve_shape", resolve_shape.run),
    ("pad_vocab", pad_vocab.run),
    ("run_length", run_length.run),
    ("choose_device", choose_device.run),
    ("choose_precision", choose_precision.run),
    ("choose_parallelism", choose_parallelism.run),
    ("choose_compile", choose_compile.run),
    ("choose_attention", choose_attention.run),
    ("choose_optimizer", choose_optimizer.run),
    ("batch_split", batch_split.run),
    ("estimate", estimate.run),
]
