"""Choose the loss's form: the mean over every position, or over the positions whose target is not -100.

Targets are -100 where a position carries no loss: metadata prefixes and control tokens
(data.sources[].metadata, .control), best_fit padding, the inputs of prefix-LM objectives.
Only a recipe that has such targets gets the masked loss in its model.py; the others keep
the plain mean (no mask to build, nothing to count).
"""

from __future__ import annotations

from dataclasses import replace

from ..conditioning import masked_target_reasons
from ..plan import Plan


def run(plan: Plan) -> Plan:
    obj = plan.recipe.objective
    if plan.recipe.model.family == "bert":  # encoders (mlm, rtd): the labels are -100 wherever no token was selected
        every = plan.compile and plan.parallelism not in ("fsdp", "hsdp")  # compiled whole: static shapes
        plan = plan.decide("loss", "masked", f"objective {obj.kind}: only the {obj.mask_rate:.0%} selected tokens carry the masked-LM "
                           "loss; " + ("compiled, the " + ("generator's" if obj.kind == "rtd" else "encoder's") + " head decodes a fixed "
                                       "number of positions, the selected ones first (static shapes: the mean number selected "
                                       "+ 8 standard deviations + 8)" if every else "the encoder's head runs at those positions only")
                           + (", the discriminator's loss covers every token" if obj.kind == "rtd" else ""))
        return replace(plan, masked_targets=True)
    why = masked_target_reasons(plan)
    if why:
        plan = plan.decide("loss", "masked", "targets of -100 carry no loss (" + ", ".join(why) +
                           "): the loss is the mean over the other positions")
        return replace(plan, masked_targets=True)
    plan = plan.decide("loss", "every position", "no target is -100 (no metadata, control tokens without loss, padding "
                       "or prefix-LM inputs): the mean over every position, no mask")
    return replace(plan, masked_targets=False)
