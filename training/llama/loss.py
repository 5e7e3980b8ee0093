"""Cross-entropy of a linear output head, computed a chunk of tokens at a time: the full logits never exist.

`linear_cross_entropy(hidden, weight, targets)` equals `F.cross_entropy(hidden @ weight.T, targets)`, value
and gradients, in float32. For a Llama 2 batch of 4 x 512 tokens the logits are 2,048 x 32,000 float32
(262 MB), and the plain loss makes four tensors of that size each step: the logits, their log-softmax, the
zero-filled gradient that `nll_loss` scatters into, and the log-softmax gradient. Here the logits of
`chunk_size` tokens at a time go through one reused buffer, and their gradient is used at once (after
Liger-Kernel's fused linear cross-entropy): softmax - one_hot(target) is multiplied back into the gradients of
the hidden states and of the head's weight inside the forward pass, which are kept until backward. The matrix
products are the same as the plain loss's; what goes is the traffic and the page faults of the big tensors.

Positions without a target (`ignore_index`: the prompt of a fine-tuning example, padding) never reach the head:
they are dropped before it, so a batch whose answers are a third of its tokens pays a third of the head's
matrix products, forward and backward, where the plain loss computes every position's logits and masks them.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_CHUNK_SIZE = 256  # tokens: at a 32,000 vocabulary a 33 MB logits buffer, about the L3 cache of a CPU


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T; the gradients are computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, grad_enabled: bool) -> torch.Tensor:
        # needs_input_grad says which inputs require grad even under no_grad, where no gradient is wanted
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        n_tokens = hidden.shape[0]
        vocab_size = weight.shape[0]

        # The gradients are accumulated in float32 whatever the model's dtype, as the plain loss upcasts.
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden_grad \
            else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad \
            else None
        float32 = hidden.dtype == torch.float32 and weight.dtype == torch.float32
        logits_buffer = torch.empty(min(chunk_size, n_tokens), vocab_size, dtype=hidden.dtype, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            hidden_chunk = hidden[start:end]  # (chunk, dim)
            target_chunk = targets[start:end, None]  # (chunk, 1)
            logits = torch.mm(hidden_chunk, weight.t(), out=logits_buffer[: end - start]).float()  # (chunk, vocab)
            target_logits = logits.gather(1, target_chunk)  # (chunk, 1)
            # logsumexp as max + log(sum(exp(logits - max))), all in place: torch.logsumexp would allocate two
            # (chunk, vocab) temporaries per chunk.
            maxes = logits.amax(dim=-1, keepdim=True)  # (chunk, 1)
            exps = logits.sub_(maxes).exp_()
            sums = exps.sum(dim=-1, keepdim=True)  # (chunk, 1)
            total += (sums.log() + maxes - target_logits).sum()  # logsumexp - target logit, summed
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss_sum / d logits = softmax - one_hot(target), written over the logits
            probs = exps.div_(sums)
            probs.scatter_add_(1, target_chunk, torch.full_like(target_chunk, -1.0, dtype=probs.dtype))
            if not float32:
                probs = probs.to(hidden.dtype)
            if grad_hidden is not None:
                if float32:
                    torch.mm(probs, weight, out=grad_hidden[start:end])
                else:
                    grad_hidden[start:end] = torch.mm(probs, weight).float()
            if grad_weight is not None:
                if float32:
                    grad_weight.addmm_(probs.t(), hidden_chunk)
                else:
                    grad_weight += torch.mm(probs.t(), hidden_chunk).float()

        # Kept as attributes, not saved tensors: backward scales them in place, once.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.n_tokens = n_tokens
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n_tokens

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were already used; backward runs once")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # free them with the graph; a second backward would scale them twice
        scale = grad_output.float() / ctx.n_tokens
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)` without the full logits.

    hidden: (n_tokens, dim); weight: (vocab_size, dim), a bias-free output head's; targets: (n_tokens,) token
    ids, `ignore_index` where no loss is wanted. Returns the mean over the other targets, in float32 (NaN if
    there are none, as `F.cross_entropy`). With gradients enabled the gradients of `hidden` and `weight` are
    computed in this call, chunk by chunk, and held until backward, which may run once.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (n_tokens, dim) and weight (vocab_size, dim) do not fit: "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape (n_tokens,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one token")
    if torch.is_autocast_enabled(hidden.device.type):
        # What `nn.Linear` does under autocast: the head's products in the autocast dtype (bf16 on CPU and
        # GPU training), not in float32. The softmax and the gradients' sums stay float32, as below.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    valid = targets != ignore_index
    if not bool(valid.all()):
        # Only the positions with a target go through the head; index_select's backward puts their gradients
        # back in place and zeros elsewhere.
        index = valid.nonzero().squeeze(1)
        if index.numel() == 0:
            # F.cross_entropy's answer when every target is ignored: NaN, with zero gradients
            return (hidden.sum() + weight.sum()).float() * 0.0 + float("nan")
        hidden, targets = hidden.index_select(0, index), targets.index_select(0, index)
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight, targets, chunk_size, torch.is_grad_enabled())


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / T)[target] a row, and the distribution's entropy (no gradient)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool, grad_enabled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = torch.mm(hidden, weight.t()).float().div_(temperature)  # (n, vocab)
        maxes = logits.amax(dim=-1, keepdim=True)
        exps = torch.sub(logits, maxes).exp_()  # the one other (n, vocab) tensor: the probabilities, once divided
        sums = exps.sum(dim=-1, keepdim=True)
        logsumexp = sums.log().add_(maxes)  # (n, 1)
        logprobs = (logits.gather(1, targets[:, None]) - logsumexp).squeeze(1)
        entropy = None
        if with_entropy:  # H = logsumexp - E_p[logit], the expectation as one dot product a row
            entropy = logsumexp.squeeze(1) - torch.linalg.vecdot(exps, logits) / sums.squeeze(1)
            ctx.mark_non_differentiable(entropy)
        del logits
        ctx.save_for_backward(hidden, weight, targets)
        ctx.probs = exps.div_(sums) if grad_enabled else None  # used up by backward, in place
        ctx.temperature = temperature
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved probabilities carry no graph
    def backward(ctx: Any, grad_logprobs: torch.Tensor, _grad_entropy: Any) -> tuple[torch.Tensor | None, ...]:
        if ctx.probs is None:
            raise RuntimeError("token_logprobs' saved probabilities were already used; backward runs once")
        hidden, weight, targets = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        # d logprob / d logits = (one_hot(target) - softmax) / T, written over the probabilities
        grad = grad_logprobs.float()[:, None]
        grad_logits = probs.mul_(grad.neg()).scatter_add_(1, targets[:, None], grad).div_(ctx.temperature)
        grad_logits = grad_logits.to(weight.dtype)
        grad_hidden = torch.mm(grad_logits, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(grad_logits.t(), hidden) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of `targets` under softmax(hidden @ weight.T / temperature), and the entropies.

    hidden: (n, dim) (or (..., dim), with targets (...)); weight: (vocab_size, dim), a bias-free output head's.
    Returns float32 log-probs shaped like `targets`, and with `entropy` each row's entropy (not differentiable;
    else None). What `log_softmax(logits / T).gather(target)` gives, with two float32 (n, vocab_size) tensors
    (the logits, and the probabilities that backward turns into the logits' gradient in place; under autocast
    also the product's own output and the gradient's copy in its dtype) instead of the five float32 ones that
    path and its backward make (the scaled logits, the log-softmax, its exponential for the entropy, and two
    gradients). PPO takes the log-probs of every response token of policy and reference with this.
    """
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., dim), weight (vocab_size, dim) and targets (...) do not fit: "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if torch.is_autocast_enabled(hidden.device.type):  # the head's product in the autocast dtype, as nn.Linear
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    shape = targets.shape
    logprobs, entropies = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                               float(temperature), entropy, torch.is_grad_enabled())
    return logprobs.view(shape), None if entropies is None else entropies.view(shape)
