"""The frozen teacher of a distillation run: a Llama-family decoder read from a malt run or a Hugging Face directory.

The student is the generated model.py; the teacher may have any Llama shape, so it
is this small, shape-parameterised copy of the same architecture (RMSNorm, rotary
embeddings, grouped-query attention, SwiGLU; Qwen2's q/k/v biases), with Hugging
Face's parameter names without the ``model.`` prefix, like the generated model.
``load_teacher`` builds it from ``plan.json`` (malt) or ``config.json`` (Hugging
Face), loads the weights with :func:`malt.runtime.checkpoint.init_from`'s readers,
and freezes it. tests/test_distill.py checks its logits against transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .run import RunError


@dataclass(frozen=True)
class TeacherShape:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_embeddings: bool


def shape_of(path: Path, kind: str) -> TeacherShape:
    """The teacher's shape from its plan.json (a malt run) or config.json (Hugging Face)."""
    if kind == "malt":
        plan = json.loads((path / "plan.json").read_text())
        m = plan["model"]
        phases = plan.get("phases") or []
        theta = phases[-1]["rope_theta"] if phases else m["rope_theta"]  # the rotary base the run ended with
        return TeacherShape(m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"], m["head_dim"], m["d_ff"],
                            m["padded_vocab"], m["norm_eps"], theta, m["qkv_bias"], m["tie_embeddings"])
    c = json.loads((path / "config.json").read_text())
    heads = c["num_attention_heads"]
    arch = (c.get("architectures") or [""])[0]
    rope = c.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
    if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise RunError(f"distill: the teacher {path} scales its rotary embeddings, which malt's teacher model does not")
    return TeacherShape(c["hidden_size"], c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads,
                        c.get("head_dim") or c["hidden_size"] // heads, c["intermediate_size"], c["vocab_size"],
                        float(c.get("rms_norm_eps", 1e-6)), float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                        arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias")), bool(c.get("tie_word_embeddings", False)))


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class _Linear(nn.Linear):
    """nn.Linear whose product, once ``onednn_matmuls`` set ``onednn``, runs in oneDNN where fp32 on the CPU (the teacher
    computes without gradients, so the product alone: no backward)."""

    onednn = False

    def forward(self, x):
        if (self.onednn and x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
                and (self.bias is None or self.bias.dtype == torch.float32) and not torch.is_grad_enabled()):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
            return y.view(*x.shape[:-1], self.weight.shape[0])
        return super().forward(x)


class _Attention(nn.Module):
    def __init__(self, s: TeacherShape):
        super().__init__()
        self.s = s
        self.q_proj = _Linear(s.d_model, s.n_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = _Linear(s.d_model, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = _Linear(s.d_model, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = _Linear(s.n_heads * s.head_dim, s.d_model, bias=False)

    def forward(self, x, cos, sin):
        s = self.s
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, s.n_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=s.n_kv_heads != s.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim))


class _MLP(nn.Module):
    def __init__(self, s: TeacherShape):
        super().__init__()
        self.gate_proj = _Linear(s.d_model, s.d_ff, bias=False)
        self.up_proj = _Linear(s.d_model, s.d_ff, bias=False)
        self.down_proj = _Linear(s.d_ff, s.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, s: TeacherShape):
        super().__init__()
        self.input_layernorm = _RMSNorm(s.d_model, s.norm_eps)
        self.self_attn = _Attention(s)
        self.post_attention_layernorm = _RMSNorm(s.d_model, s.norm_eps)
        self.mlp = _MLP(s)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Teacher(nn.Module):
    """A Llama-family decoder of any shape; ``forward(tokens)`` gives (batch, seq, vocab) logits."""

    def __init__(self, s: TeacherShape):
        super().__init__()
        self.shape = s
        self.embed_tokens = nn.Embedding(s.vocab, s.d_model)
        self.layers = nn.ModuleList(_Block(s) for _ in range(s.n_layers))
        self.norm = _RMSNorm(s.d_model, s.norm_eps)
        self.lm_head = _Linear(s.d_model, s.vocab, bias=False)
        if s.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens):
        T = tokens.shape[1]
        s = self.shape
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64, device=tokens.device).float() / s.head_dim))
        angles = torch.outer(torch.arange(T, dtype=torch.int64, device=tokens.device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def load_teacher(path, kind: str, device, log=print) -> Teacher:
    """The teacher of ``path`` (a malt run directory or a Hugging Face directory), frozen, in eval mode, on ``device``."""
    from .checkpoint import init_from

    path = Path(path)
    if not path.is_dir():
        raise RunError(f"distill: no teacher directory {path}", "objective.teacher names a malt run or a Hugging Face directory")
    try:
        shape = shape_of(path, kind)
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"distill: cannot read the teacher's shape from {path}: {e}")
    teacher = Teacher(shape)
    try:
        init_from(path, kind, teacher, None, log=lambda msg: log(msg.replace("init_from:", "distill: teacher", 1)))
    except RunError as e:  # init_from's readers speak of init_from: here the file is the teacher's
        raise RunError(e.message.replace("init_from:", "distill: teacher:", 1).replace("init_from ", "distill: teacher ", 1),
                       e.hint) from None
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def onednn_matmuls(teacher: Teacher) -> Teacher:
    """The teacher with its linear products in oneDNN where fp32 on the CPU (choose_matmul's onednn: on an AMD CPU of
    Zen 5 or later torch's fp32 matmul, MKL's sgemm, runs its AVX2 kernels at half the CPU's rate); a torch built
    without oneDNN keeps torch's."""
    if torch.backends.mkldnn.is_available():
        for module in teacher.modules():
            if isinstance(module, _Linear):
                module.onednn = True
    return teacher


def matmuls_in(teacher: Teacher, dtype: torch.dtype) -> Teacher:
    """The teacher with its nn.Linear weights and biases stored in ``dtype`` (bf16 under bf16 autocast), the rest
    (embedding, norms) as they are. Autocast casts every matmul's weight to its dtype in each forward, and caches
    the cast only for weights that need gradients, which a frozen teacher's do not: storing them cast gives the
    same logits bit for bit, without the casts, in half the memory. A head tied to the embedding stays as it is
    (the embedding's lookup reads the same tensor)."""
    embedding = teacher.embed_tokens.weight
    for module in teacher.modules():
        if isinstance(module, nn.Linear) and module.weight is not embedding:
            module.to(dtype)
    return teacher


def check_tokenizer(path, tokenizer, log=print) -> None:
    """The teacher must share the run's tokenizer: compare with its tokenizer.json when it has one."""
    from .tokenizer import differing_tokens

    tok_file = Path(path) / "tokenizer.json"
    if not tok_file.is_file():
        log(f"distill: {path} has no tokenizer.json; assuming the teacher uses this run's tokenizer")
        return
    differ = differing_tokens(tok_file, tokenizer, "distill: the teacher's tokenizer",
                              "copy the teacher's tokenizer.json back from a backup (a malt run's) or from where the "
                              "model came from (a Hugging Face model's); distillation needs it to check the token ids")
    if differ:
        raise RunError(f"distill: the teacher's tokenizer ({tok_file}) differs from this run's: {len(differ):,} token(s) "
                       f"have another id or are missing there, e.g. {differ[:5]}",
                       "distillation compares distributions token by token: use the teacher's tokenizer "
                       "(tokenizer: {kind: file, path: TEACHER/tokenizer.json})")
