"""Choose the AdamW implementation: fused (one kernel over all parameters) where torch has it."""

from __future__ import annotations

from ..plan import Plan


GALORE_UPDATE_EVERY = 200  # the paper's T for its pre-training runs
GALORE_SCALE = 0.25        # the paper's α for pre-training


def run(plan: Plan) -> Plan:
    o = plan.recipe.optimizer
    if o.kind == "galore":
        rank = o.rank if o.rank is not None else max(1, plan.recipe.model.d_model // 4)
        galore = {"rank": rank, "update_every": o.update_every if o.update_every is not None else GALORE_UPDATE_EVERY,
                  "scale": o.scale if o.scale is not None else GALORE_SCALE}
        why = ((f"optimizer.rank {rank}" if o.rank is not None else f"rank d_model {plan.recipe.model.d_model} / 4 = {rank}, as the paper's "
                "models (128 at d_model 512, 256 at 1024)") + f"; projector from the gradient's top singular vectors every {galore['update_every']} steps, "
               f"update scaled by {galore['scale']:g}; Adam moments of the blocks' matrices in the projected space; "
               "embeddings, head and norms are plain AdamW")
        return plan.decide("optimizer", "galore", why, galore=galore, fused_adamw=False)
    if plan.device == "tpu":
        return plan.decide("fused_adamw", False, "tpu: torch's fused AdamW kernels are for CPU and CUDA; the foreach AdamW "
                           "traces into the XLA step graph", fused_adamw=False)
    # torch >= 2.4 has fused AdamW for CPU and CUDA tensors
    # bench/ablate.py, 5.3M params on a 2-core CPU: fused 1.01×, foreach 1.00× the step of the default for-loop AdamW
    # (the optimizer is about 2% of a step there); on GPUs the for-loop launches kernels per parameter
    why = (f"torch has a fused AdamW for {plan.device}: one kernel over all parameters"
           + (" (on a 2-core CPU 1.01× the tokens/s of the default for-loop AdamW at 5.3M parameters, bench/ablate.py)"
              if plan.device == "cpu" else ""))
    return plan.decide("fused_adamw", True, why, fused_adamw=True)
