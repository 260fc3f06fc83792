"""Saved activations of one training forward, per token, by formula. The coefficients were read off the tensors
autograd saves for a real adapted block (tests/unit/planning/test_activations.py counts them with
saved_tensors_hooks and holds the formula to them): a decoder block with adapters saves about 8 hidden-sized
tensors (norm inputs and outputs, residuals, q, the attention output), k and v, three intermediate-sized ones (gate,
up, their product; two for an encoder's plain MLP), and per adapted linear its dropout(x) copy and the experts'
small tensors; a routed method also keeps the router's input once per distinct input."""

from __future__ import annotations

from adamole_dist.planning.model_shape import ModelShape
from adamole_dist.planning.plan_config import PlanConfig

# the input a target reads: targets in one group share it (q, k, v read the same normed hidden state)
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out", "query": "attn_in",
                "key": "attn_in", "value": "attn_in", "attention.output.dense": "attn_out",
                "intermediate.dense": "mlp_in", "output.dense": "mlp_out"}
HIDDEN_SIZED_PER_BLOCK = 8  # norm inputs/outputs, residual sums, q, attention output
Q_SIZED_PER_BLOCK = 3  # of those, q's size in a decoder (q, rotated q, the attention output)
SAVED_BY_THE_BLOCK = {"attn_out"}  # input groups the block's own tensors keep anyway (the attention's output)


def default_target_names(shape: ModelShape) -> list[str]:
    return ["query", "key", "value", "attention.output.dense"] if shape.is_encoder else [
        "q_proj", "k_proj", "v_proj", "o_proj"]


def target_dims(shape: ModelShape, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted linear of a block; ValueError naming an unknown target."""
    linears = shape.linears()
    chosen = targets or default_target_names(shape)
    unknown = [t for t in chosen if t not in linears]
    if unknown:
        raise ValueError(f"target_modules ({','.join(unknown)}) are not linear layers of a {shape.model_type} "
                         f"block; it has {', '.join(linears)}")
    return {t: linears[t] for t in chosen}


def planned_target_names(shape: ModelShape, resolved: list[str]) -> list[str]:
    """The planner's names of a run's adapted modules (as adapters/targets.py resolved them: ``self_attn.q_proj``,
    ``attention.self.query``): each one's longest suffix that names a linear of the block; ValueError naming one
    the planner does not know."""
    names = sorted(shape.linears(), key=len, reverse=True)
    planned = []
    for target in resolved:
        known = [n for n in names if target == n or target.endswith("." + n)]
        if not known:
            raise ValueError(f"the planner does not model the adapted module {target} of a {shape.model_type} block")
        planned.append(known[0])
    return planned


def adapter_floats_per_token(shape: ModelShape, plan: PlanConfig) -> int:
    """What the adapters of one block save per token."""
    targets = target_dims(shape, plan.target_modules)
    routed = plan.method != "lora"
    n, r = plan.experts, plan.rank
    inner = 2 * n * r + 3 * n + 3 if routed else r + 3  # expert inputs/outputs; router logits, p, tau
    per_target = sum(d_in + inner for d_in, _ in targets.values())  # d_in: the dropout(x) copy
    router_inputs = {INPUT_GROUPS[t]: d_in for t, (d_in, _) in targets.items()} if routed else {}
    return per_target + sum(router_inputs.values())


def int8_held_input_floats_per_token(shape: ModelShape, plan: PlanConfig) -> int:
    """What an int8 base adds per token: bitsandbytes' 8-bit linear keeps its input for the backward even with its
    weight frozen (MatMul8bitFp's ``ctx.A`` on a CPU, MatMul8bitLt's ``ctx.tensors`` on a GPU; attributes of the
    autograd node, so saved_tensors_hooks never see them). One input per group of layers reading the same tensor,
    less the groups kept anyway: the attention's output, and a routed adapter's router input. A frozen fp32, bf16
    or 4-bit linear keeps nothing of its input."""
    if plan.quantize_base != "int8":
        return 0
    kept = set(SAVED_BY_THE_BLOCK)
    if plan.method != "lora":
        kept |= {INPUT_GROUPS[t] for t in target_dims(shape, plan.target_modules)}
    widths = {INPUT_GROUPS[name]: d_in for name, (d_in, _) in shape.linears().items() if name in INPUT_GROUPS}
    return sum(width for group, width in widths.items() if group not in kept)


def block_floats_per_token(shape: ModelShape, plan: PlanConfig) -> int:
    """Everything one block saves per token for its backward."""
    kv = shape.hidden if shape.is_encoder else shape.kv_dim
    mlp = 2 if shape.is_encoder else 3
    q_sized = 0 if shape.is_encoder else Q_SIZED_PER_BLOCK  # of the hidden-sized ones: q's size where it differs
    floats = (HIDDEN_SIZED_PER_BLOCK - q_sized) * shape.hidden + q_sized * shape.q_dim + 2 * kv
    floats += mlp * shape.intermediate
    if shape.sandwich_norms:  # the post-attention and both MLP norms' inputs; q and k before their norms
        floats += 3 * shape.hidden + shape.q_dim + kv
    if plan.attn_implementation == "eager" or shape.attention_dropout > 0:  # the [H x T] scores of each token
        floats += shape.heads * plan.max_length + 2 * (shape.q_dim - kv)  # + k, v repeated to every head (GQA)
    return floats + adapter_floats_per_token(shape, plan) + int8_held_input_floats_per_token(shape, plan)


def tokens_per_micro_batch(shape: ModelShape, plan: PlanConfig) -> int:
    choices = plan.choices or (4 if shape.is_encoder else 1)
    return plan.micro_batch_size * choices * plan.max_length


def offload_in_flight_bytes(shape: ModelShape, plan: PlanConfig, one_block: int) -> int:
    """What activation offloading leaves on the device: the block whose saved tensors are coming back (without
    gradient checkpointing all of one block's; with it, one block's input: the replay is counted as temporary)."""
    if not plan.gradient_checkpointing:
        return one_block
    return tokens_per_micro_batch(shape, plan) * shape.hidden * plan.activation_bytes


def autocast_weight_copies(shape: ModelShape, plan: PlanConfig) -> int:
    """One block's bf16 copies of its frozen linear weights that autocast makes and the matmul saves for the
    backward (a frozen fp32 weight is cast again at every use, and the cast is what the backward needs); a
    quantized base's layers dequantize in their own kernels instead."""
    if plan.precision != "autocast-bf16" or plan.quantize_base != "none":
        return 0
    return shape.block_linear_params() * 2


def saved_activation_bytes(shape: ModelShape, plan: PlanConfig) -> tuple[int, int]:
    """(all blocks' saved activations, one block's) in bytes for a micro batch. Gradient checkpointing keeps each
    block's input only (the recomputed block is counted separately, as one block)."""
    tokens = tokens_per_micro_batch(shape, plan)
    act_bytes = plan.activation_bytes
    one_block = tokens * block_floats_per_token(shape, plan) * act_bytes + autocast_weight_copies(shape, plan)
    outside = tokens * 2 * shape.hidden * act_bytes  # the final norm's input and output
    if plan.gradient_checkpointing:
        return tokens * shape.layers * shape.hidden * act_bytes + outside, one_block
    return shape.layers * one_block + outside, one_block
