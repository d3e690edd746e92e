"""Compiler passes: one module each, one pure function ``run(plan: Plan) -> Plan``.

They run in the order of ``PIPELINE``; each records the choices it makes (with a
reason) in ``plan.decisions``, which ``plan.json`` and ``malt plan`` show.
"""

from . import choose_loss  # noqa: I001  (data.sources[].metadata/.control, packing, objective: -100 targets)
from . import batch_split, choose_checkpoint_format, choose_checkpointing, choose_attention, choose_matmul, choose_parallelism, choose_compile, choose_device, choose_optimizer, choose_precision, estimate, pad_vocab, resolve_objective, resolve_shape, run_length

PIPELINE = [
    ("resolve_shape", resolve_shape.run),
    ("pad_vocab", pad_vocab.run),
    ("run_length", run_length.run),
    ("resolve_objective", resolve_objective.run),
    ("choose_device", choose_device.run),
    ("choose_precision", choose_precision.run),
    ("choose_parallelism", choose_parallelism.run),
    ("choose_compile", choose_compile.run),
    ("choose_attention", choose_attention.run),
    ("choose_matmul", choose_matmul.run),
    ("choose_loss", choose_loss.run),
    ("choose_optimizer", choose_optimizer.run),
    ("choose_checkpoint_format", choose_checkpoint_format.run),  # after choose_optimizer: a checkpoint holds its state
    ("choose_checkpointing", choose_checkpointing.run),
    ("batch_split", batch_split.run),
    ("settle_attention", choose_attention.settle),  # causal_attention only where its memory costs nothing else
    ("estimate", estimate.run),
]
